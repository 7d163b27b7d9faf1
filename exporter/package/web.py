"""The web target of `qwen-edge package`: the onnx-community folder that transformers.js 4.x loads.

transformers.js picks its model class from `config.json`. A Qwen3.5 export is two graphs
(`embed_tokens`, `decoder_model_merged`), which transformers.js only loads for a
`*ForConditionalGeneration` architecture opened through `AutoModelForCausalLM`: that is its
text-only path (no vision encoder). So the config is written in the published multimodal form
(`model_type` `qwen3_5`, the text settings under `text_config`) whatever the checkpoint's form was.

Browsers fetch external weights by file name, one data file per graph (`X.onnx` reads `X.onnx_data`,
then `X.onnx_data_1`, ...), and the file count must be declared in `transformers.js_config`. So every
graph is re-saved here with its own data files, split below the 2 GB a browser can fetch at once. An
export's tied quantized embedding reads the LM head's bytes from the decoder's data file; here it
gets its own copy, which costs that table's size once more on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from exporter.onnx.external_data import relocate, stored_tensors
from exporter.onnx.forms import to_contrib
from graphs.errors import QwenEdgeError
from graphs.file_checks import read_json
from runtime_py.export_format import read_manifest

# Below 2 GiB: a browser's ArrayBuffer and onnxruntime-web's fetch of one external data file.
DATA_CHUNK_BYTES = 2_000_000_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Token-id settings transformers.js reads from the top level of config.json.
TOP_LEVEL_KEYS = ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def write_web_layout(export_dir: Path, out_dir: Path, variants: list[str], convert: bool = False) -> None:
    """Fill `out_dir` with config, generation config, tokenizer files and `onnx/*` for `variants`.

    `export_dir` is a `qwen-edge export --recurrent-ops contrib` folder, or (convert=True) a standard
    one whose graphs are converted on the way (exporter/onnx/forms.to_contrib, in memory: the export
    is only read). The first variant is the default dtype transformers.js loads when the app does not
    pass one.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = read_manifest(export_dir)
    ops = manifest.get("recurrent_ops", "standard")
    if ops != "contrib" and not convert:
        raise QwenEdgeError(f"{export_dir}: graphs use the {ops} recurrent ops, which transformers.js's "
                            "onnxruntime cannot run; re-export with --recurrent-ops contrib")
    if not variants:
        raise QwenEdgeError("no variants given for the web bundle; pass at least one, e.g. q4")
    exported = manifest.get("variants", {})
    for variant in variants:
        if variant not in exported:
            raise QwenEdgeError(f"{export_dir}: has no '{variant}' variant (it has {', '.join(exported)}); "
                                f"pick one of those or export with --quant {variant}")
    web = web_config(_read_json(export_dir, "config.json"), variants[0])
    for name in TOKENIZER_FILES:
        if not (export_dir / name).is_file():
            raise QwenEdgeError(f"{export_dir}: {name} missing; export from a checkpoint that has one")
    (out_dir / "onnx").mkdir(parents=True, exist_ok=True)
    data_chunks: dict[str, int] = {}
    for variant in dict.fromkeys(variants):
        for rel in (exported[variant]["embed_tokens"], exported[variant]["decoder"]):
            chunks = rehome_external_data(export_dir / rel, out_dir / rel, convert=convert)
            if chunks:
                data_chunks[Path(rel).name] = chunks
    if data_chunks:
        web["transformers.js_config"]["use_external_data_format"] = dict(sorted(data_chunks.items()))
    _write_json(out_dir / "config.json", web)
    _write_json(out_dir / "generation_config.json", _generation_config(export_dir, web.get("text_config", {})))
    _write_tokenizer_files(export_dir, out_dir)


def web_config(config: dict, default_dtype: str) -> dict:
    """The checkpoint config in the form transformers.js loads as a text-only Qwen3.5 model.

    `transformers.js_config.use_external_data_format` is added once the graphs are written."""
    if config.get("model_type") == "qwen3_5":
        web = dict(config)
    elif config.get("model_type") == "qwen3_5_text":
        text = {k: v for k, v in config.items() if k != "architectures"}
        web = {"model_type": "qwen3_5", "text_config": text}
        web.update({k: config[k] for k in TOP_LEVEL_KEYS if k in config})
    else:
        raise QwenEdgeError(f"config.json: model_type {config.get('model_type')!r} is not Qwen3.5; "
                            "package an export of a qwen3_5 or qwen3_5_text checkpoint")
    web["architectures"] = ["Qwen3_5ForConditionalGeneration"]
    # transformers.js reads vision_config.spatial_merge_size when it computes text positions, even
    # without images; an empty one makes it use its default. No vision graph is shipped.
    web.setdefault("vision_config", {})
    web["transformers.js_config"] = {"dtype": default_dtype}
    return web


def rehome_external_data(src: Path, dst: Path, chunk_bytes: int = DATA_CHUNK_BYTES, convert: bool = False) -> int:
    """Save graph `src` as `dst` with its external tensors copied into `dst`'s own data files
    (convert: in the contrib form).

    Returns the number of data files written (0 when every tensor is stored inside the graph).
    Tensors sharing the same source bytes share them in the output too.
    """
    if not src.is_file():
        raise QwenEdgeError(f"{src}: graph file missing from the export; re-run 'qwen-edge export'")
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf DecodeError or its own errors on a damaged file
        raise QwenEdgeError(f"{src}: not a readable ONNX graph ({str(exc)[:200]}); re-run 'qwen-edge export'") from None
    if convert:
        to_contrib(model)
    files = relocate([(t, src.parent) for t in stored_tensors(model.graph)], dst.parent, dst.name + "_data",
                     chunk_bytes=chunk_bytes)
    dst.write_bytes(model.SerializeToString())
    return len(files)


def _generation_config(export_dir: Path, text: dict) -> dict:
    """The export's generation config; without one, the token ids the text config names."""
    if (export_dir / "generation_config.json").is_file():
        return _read_json(export_dir, "generation_config.json")
    return {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if text.get(k) is not None}


def _write_tokenizer_files(export_dir: Path, out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json; the chat template goes inside the latter, where
    transformers.js reads it (it does not read chat_template.jinja)."""
    shutil.copyfile(export_dir / "tokenizer.json", out_dir / "tokenizer.json")
    tok_config = _read_json(export_dir, "tokenizer_config.json")
    template = export_dir / "chat_template.jinja"
    if template.is_file():
        tok_config["chat_template"] = template.read_text()
    _write_json(out_dir / "tokenizer_config.json", tok_config)


def _read_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.exists():
        raise QwenEdgeError(f"{folder}: {name} missing; pass a folder written by 'qwen-edge export'")
    value = read_json(path, "re-run 'qwen-edge export'")
    if not isinstance(value, dict):
        raise QwenEdgeError(f"{path}: expected a JSON object; re-run 'qwen-edge export'")
    return value


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
