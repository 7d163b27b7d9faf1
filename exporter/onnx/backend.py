"""The ONNX side of `qwen-edge export` (exporter/pipeline.py): onnx-community Qwen3.5 files.

    OUT/onnx/embed_tokens{suffix}.onnx (+ .onnx_data)
    OUT/onnx/decoder_model_merged{suffix}.onnx (+ .onnx_data)

Each activation dtype is traced once into a scratch folder; a float variant is that graph re-saved
under its published name, a quantized variant a transform of it (quant/onnx_weights.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime

from exporter.onnx.external_data import external_info, set_external
from exporter.onnx.trace import name_nodes_and_strip_trace_metadata, save_graph, trace_decoder, trace_embed
from exporter.pipeline import files_bytes
from exporter.progress import Stages
from graphs.checkpoint import Checkpoint, expected_shapes
from graphs.config import TextConfig
from graphs.errors import QwenEdgeError
from graphs.qwen3_5 import Qwen35Decoder
from quant.onnx_weights import pack_blockwise, quantize_projections, quantized_embed_graph
from quant.schemes import QuantOptions, Scheme
from runtime_py.export_format import RECURRENT_FORMS, opset_imports


@dataclass(frozen=True)
class OnnxOptions:
    """ONNX-only export options."""

    recurrent_ops: str = "standard"  # exporter/onnx/forms.py
    quant: QuantOptions = field(default_factory=QuantOptions)
    all_logits: bool = False  # logits of every position (default: the last one)

    def __post_init__(self) -> None:
        if self.recurrent_ops not in RECURRENT_FORMS:
            raise QwenEdgeError(f"--recurrent-ops {self.recurrent_ops!r}: use one of {', '.join(RECURRENT_FORMS)}")


class OnnxBackend:
    format = "onnx"

    def __init__(self, options: OnnxOptions = OnnxOptions()) -> None:
        self.options = options
        self.cfg: TextConfig | None = None

    def check(self, schemes: tuple[Scheme, ...]) -> None:
        for scheme in schemes:
            if not scheme.onnx:
                raise QwenEdgeError(f"--quant {scheme.name!r} is a Core ML weight option; export it with --format coreml")

    def prepare_stages(self, activations: str) -> list[str]:
        return [f"trace {activations} graphs"]

    def load(self, checkpoint: Checkpoint) -> Qwen35Decoder:
        self.cfg = checkpoint.config
        return checkpoint.build_decoder(logits="all" if self.options.all_logits else "last")

    def prepare(self, model: Qwen35Decoder, activations: str, folder: Path, stages: Stages) -> Path:
        if activations == "float16":
            model.half()
        float_dir = folder / f".float-{activations}"
        float_dir.mkdir()

        def trace() -> None:
            save_graph(trace_embed(model), float_dir / "embed.onnx")
            save_graph(trace_decoder(model, self.options.recurrent_ops), float_dir / "decoder.onnx")

        stages.run(trace)
        return float_dir

    def write_variant(self, float_dir: Path, scheme: Scheme, folder: Path) -> dict:
        (folder / "onnx").mkdir(exist_ok=True)
        if scheme.weight_bits is None:
            _copy_float_graphs(float_dir, folder, scheme)
        else:
            _write_quantized(scheme, float_dir, folder, self.options.quant, self.cfg.tie_word_embeddings)
        return _variant_record(scheme, self.options.quant, folder, self.cfg)

    def release(self, float_dir: Path) -> None:
        shutil.rmtree(float_dir)

    def manifest_fields(self, cfg: TextConfig) -> dict:
        form = RECURRENT_FORMS[self.options.recurrent_ops]
        return {
            "recurrent_ops": form.name,
            "recurrent_ops_domain": form.domain or "ai.onnx",
            "min_onnxruntime": form.min_onnxruntime,
            "logits": "all positions" if self.options.all_logits else "last position",
            "exported_with_onnxruntime": onnxruntime.__version__,
        }


def _copy_float_graphs(float_dir: Path, out_dir: Path, scheme: Scheme) -> None:
    """The float variant is the traced graph itself, re-saved under its published name."""
    for src, dst in zip(("embed.onnx", "decoder.onnx"), scheme.files):
        graph = ir.load(float_dir / src)
        name_nodes_and_strip_trace_metadata(graph)
        save_graph(graph, out_dir / dst)


def _write_quantized(scheme: Scheme, float_dir: Path, out_dir: Path, opts: QuantOptions, tied: bool) -> None:
    """Quantize the saved float graphs of the scheme's activation dtype into the scheme's files."""
    embed_name, decoder_name = scheme.files
    decoder = ir.load(float_dir / "decoder.onnx")
    lm_head = quantize_projections(decoder, scheme, opts)
    name_nodes_and_strip_trace_metadata(decoder)
    decoder_path = save_graph(decoder, out_dir / decoder_name)
    doc = f"Qwen3.5 token embedding, {scheme.name} (qwen-edge)"
    table_format = scheme.weight_format("embed_tokens.weight", opts.block_size)
    if table_format is None:  # a recipe that keeps the table float: the traced embedding as it is
        embed = ir.load(float_dir / "embed.onnx")
        name_nodes_and_strip_trace_metadata(embed)
        save_graph(embed, out_dir / embed_name)
    elif tied:  # the gather reads the LM head's quantized bytes from the decoder's data file
        embed = quantized_embed_graph(lm_head, lm_head.k, doc)
        _share_lm_head_bytes(embed, decoder_path, lm_head.bits)
        onnx.save(embed, str(out_dir / embed_name))
    else:
        table = onnx.numpy_helper.to_array(onnx.load(str(float_dir / "embed.onnx")).graph.initializer[0])
        packed = pack_blockwise(table.T, table_format, opts)
        embed = quantized_embed_graph(packed, packed.k, doc)
        onnx.save(embed, str(out_dir / embed_name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(embed_name).name + "_data", size_threshold=1024)


def _share_lm_head_bytes(embed: onnx.ModelProto, decoder_path: Path, lm_head_bits: int) -> None:
    """Point the embedding's initializers at the LM head's bytes in the saved decoder's data file."""
    decoder = onnx.load(str(decoder_path), load_external_data=False)
    by_name = {t.name: t for t in decoder.graph.initializer}
    pairs = {"embed_tokens.weight_quantized": f"lm_head.weight_q{lm_head_bits}",
             "embed_tokens.weight_scales": "lm_head.weight_scales",
             "embed_tokens.weight_zero_points": "lm_head.weight_zero_points"}
    for tensor in embed.graph.initializer:
        info = external_info(by_name[pairs[tensor.name]])
        set_external(tensor, info["location"], int(info.get("offset", 0)), int(info["length"]))


def _variant_record(scheme: Scheme, quant: QuantOptions, root: Path, cfg: TextConfig) -> dict:
    embed, decoder = scheme.files
    record = {"embed_tokens": embed, "decoder": decoder, "activations": scheme.activations,
              "opset_imports": opset_imports(onnx.load(str(root / decoder), load_external_data=False))}
    if scheme.weight_bits:
        record.update(weight_bits=scheme.weight_bits, block_size=quant.block_size, symmetric=quant.symmetric,
                      accuracy_level=quant.accuracy_level,
                      weight_formats=scheme.family_formats(expected_shapes(cfg), quant.block_size))
    record["bytes_on_disk"] = files_bytes(root, [f for name in (embed, decoder) for f in (name, name + "_data")])
    return record


def export_onnx(checkpoint: str | Path, out: Path, schemes: str = "fp32", options: OnnxOptions = OnnxOptions(), *,
                force: bool = False, progress: bool = True) -> Path:
    """`qwen-edge export CHECKPOINT OUT --quant SCHEMES` from Python."""
    from exporter.pipeline import ExportRequest, run_export
    from quant.schemes import parse_schemes

    return run_export(ExportRequest(checkpoint, out, tuple(parse_schemes(schemes)), force, progress), OnnxBackend(options))
