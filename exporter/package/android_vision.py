"""The Android bundle of an export with a vision tower: what onnxruntime-genai 0.18's Qwen3.5
vision-language pipeline (model type `qwen3_5`) loads.

genai runs three graphs for it: `vision` (pixel patches + grid -> image features), `embedding`
(input_ids + image features -> inputs_embeds: its own contract, the image features scattered into
the <|image_pad|> rows; during decode it feeds an empty [0, hidden] feature tensor) and the decoder
on inputs_embeds. Its image processor is onnxruntime-extensions', configured by
`genai_processor_config.json` (PROCESSOR_CONFIG). So per variant the bundle carries

    onnx/vision{suffix}.onnx (+ .onnx_data)      the export's vision_encoder, recurrent ops untouched
    onnx/embedding{suffix}.onnx (+ .onnx_data)   embed_tokens + the scatter (a protobuf edit)
    onnx/decoder{suffix}.onnx (+ .onnx_data)     the export's decoder, com.microsoft recurrent ops
    onnx/*.ort                                   ORT-format twins, as for the text bundle

instead of the merged text graph (the same decoder weights would otherwise ship twice), and
genai_config.json gets the `vision` and `embedding` sections. Plain ONNX Runtime runs the same files
(embedding, then decoder). Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from exporter.onnx.external_data import relocate, stored_tensors
from exporter.onnx.forms import as_plain_decoder, to_contrib
from graphs.config import VisionConfig
from graphs.errors import QwenEdgeError
from runtime_py.vision_preprocess import PixelSettings

DATA_ALIGNMENT = 4096
GENAI_VLM_TYPE = "qwen3_5"
# onnxruntime-extensions' pipeline, named by genai_config.json; not `processor_config.json`, which is
# transformers' combined processor file and may come with the export's support files.
PROCESSOR_CONFIG = "genai_processor_config.json"


def graph_names(decoder_name: str) -> dict[str, str]:
    """`onnx/decoder_model_merged_q4.onnx` -> the bundle's vision / embedding / decoder paths."""
    path = Path(decoder_name)
    suffix = path.stem.removeprefix("decoder_model_merged")
    return {role: str(path.with_name(f"{role}{suffix}.onnx")) for role in ("vision", "embedding", "decoder")}


def _save(model: onnx.ModelProto, sources: list[tuple[onnx.TensorProto, Path]], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    relocate(sources, out_path.parent, out_path.name + "_data", align=DATA_ALIGNMENT)
    onnx.save(model, str(out_path))


def copy_graph(src: Path, out_path: Path, decoder: bool = False) -> bool:
    """Re-home a graph's weights beside `out_path`; a `decoder` also gets its recurrent ops in
    com.microsoft and the plain decoder's inputs and outputs (exporter/onnx/forms.py). Returns
    whether any recurrent op was moved."""
    if not src.is_file():
        raise QwenEdgeError(f"{src}: graph file missing from the export; re-run 'qwen-edge export'")
    model = onnx.load(str(src), load_external_data=False)
    converted = to_contrib(model) if decoder else False
    if decoder:
        as_plain_decoder(model)
    _save(model, [(t, src.parent) for t in stored_tensors(model.graph)], out_path)
    return converted


def embedding_graph(embed_path: Path, out_path: Path, image_token_id: int) -> None:
    """embed_tokens with the image features scattered in: (input_ids, image_features) -> inputs_embeds.

        input_ids ─► embed_tokens ─► text_embeds ─┐
        input_ids == image_token_id ─► NonZero ─► [K, 2] (batch, position) ─► ScatterND ◄─ image_features
    """
    model = onnx.load(str(embed_path), load_external_data=False)
    graph = model.graph
    output = graph.output[0]
    hidden = output.type.tensor_type.shape.dim[2].dim_value
    dtype = output.type.tensor_type.elem_type
    for node in graph.node:
        node.output[:] = ["text_embeds" if o == output.name else o for o in node.output]
    graph.initializer.append(helper.make_tensor("image_token_id", TensorProto.INT64, [], [image_token_id]))
    graph.node.extend([
        helper.make_node("Equal", ["input_ids", "image_token_id"], ["is_image"], name="/embedding/Equal"),
        helper.make_node("NonZero", ["is_image"], ["image_positions_t"], name="/embedding/NonZero"),
        helper.make_node("Transpose", ["image_positions_t"], ["image_positions"], perm=[1, 0],
                         name="/embedding/Transpose"),
        helper.make_node("ScatterND", ["text_embeds", "image_positions", "image_features"], [output.name],
                         name="/embedding/ScatterND"),
    ])
    graph.input.append(helper.make_tensor_value_info("image_features", dtype, ["num_image_tokens", hidden]))
    graph.name = "embedding"
    graph.doc_string = "Qwen3.5 token embedding with image features scattered into the image pad rows (qwen-edge)"
    sources = [(t, embed_path.parent) for t in stored_tensors(graph)
               if t.data_location == TensorProto.EXTERNAL]
    _save(model, sources, out_path)


def processor_config(settings: PixelSettings) -> dict:
    """onnxruntime-extensions' image pipeline equal to the export's image processor settings."""
    return {"processor": {"name": "qwen2_5_image_processor", "transforms": [
        {"operation": {"name": "decode_image", "type": "DecodeImage", "attrs": {"color_space": "RGB"}}},
        {"operation": {"name": "convert_to_rgb", "type": "ConvertRGB"}},
        {"operation": {"name": "resize", "type": "Resize", "attrs": {
            "smart_resize": 1, "min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels,
            "patch_size": settings.patch_size, "merge_size": settings.merge_size}}},
        {"operation": {"name": "rescale", "type": "Rescale", "attrs": {"rescale_factor": 1 / 255}}},
        {"operation": {"name": "normalize", "type": "Normalize", "attrs": {
            "mean": list(settings.mean), "std": list(settings.std), "qwen2_5_vl": 1}}},
        {"operation": {"name": "patch_image", "type": "PatchImage", "attrs": {
            "patch_size": settings.patch_size, "temporal_patch_size": settings.temporal_patch_size,
            "merge_size": settings.merge_size}}},
    ]}}


def vision_genai_config(text_config: dict, vision: VisionConfig, names: dict[str, str]) -> dict:
    """The text bundle's genai_config.json turned into the vision-language pipeline's."""
    config = json.loads(json.dumps(text_config))
    model = config["model"]
    model["type"] = GENAI_VLM_TYPE
    model.update(image_token_id=vision.image_token_id, video_token_id=vision.video_token_id,
                 vision_start_token_id=vision.vision_start_token_id)
    decoder = model["decoder"]
    decoder["filename"] = Path(names["decoder"]).as_posix()
    decoder["inputs"] = {"inputs_embeds": "inputs_embeds",
                         **{k: v for k, v in decoder["inputs"].items() if k != "input_ids"}}
    model["embedding"] = {"filename": names["embedding"], "inputs": {"input_ids": "input_ids",
                                                                      "image_features": "image_features"},
                          "outputs": {"inputs_embeds": "inputs_embeds"}}
    model["vision"] = {"filename": names["vision"], "config_filename": PROCESSOR_CONFIG,
                       "spatial_merge_size": vision.spatial_merge_size, "patch_size": vision.patch_size,
                       "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
                       "outputs": {"image_features": "image_features"}}
    return config


def write_vision_graphs(export_dir: Path, out: Path, variants: dict[str, dict], vision: VisionConfig,
                        settings: PixelSettings, text_genai_config: dict) -> dict[str, dict]:
    """The three graphs of each variant, PROCESSOR_CONFIG and genai_config.json (first variant).
    Returns the manifest's per-variant records (bundle paths of the three graphs, converted_to_contrib)."""
    records: dict[str, dict] = {}
    for name, entry in variants.items():
        if "vision_encoder" not in entry:
            raise QwenEdgeError(f"{export_dir}: variant '{name}' has no vision encoder while others do; re-export")
        names = graph_names(entry["decoder"])
        copy_graph(export_dir / entry["vision_encoder"], out / names["vision"])
        embedding_graph(export_dir / entry["embed_tokens"], out / names["embedding"], vision.image_token_id)
        converted = copy_graph(export_dir / entry["decoder"], out / names["decoder"], decoder=True)
        records[name] = {**names, "converted_to_contrib": converted}
    first = records[next(iter(variants))]
    (out / PROCESSOR_CONFIG).write_text(json.dumps(processor_config(settings), indent=2) + "\n")
    config = vision_genai_config(text_genai_config, vision, first)
    (out / "genai_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return records
