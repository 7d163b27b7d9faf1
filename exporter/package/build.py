"""`qwen-edge package`: an export folder in, a self-describing app bundle out; and `package verify`.

A bundle holds what one platform's app needs (model files, tokenizer, chat template, generation
defaults) and `manifest.json`, which says what the model is (shape, state layout, graph I/O), what it
needs (minimum ONNX Runtime version and opsets, iOS version), and the size and SHA-256 of every
other file. It is written atomically (exporter/atomic.py) and deterministically: file lists are
sorted, the manifest has no timestamps and every conversion is byte-reproducible, so packaging the
same export twice gives identical hashes.

Targets:
    android  merged ONNX graphs (input_ids in) + ORT format + required_operators.config + genai_config.json
             (exporter/package/android.py)
    ios      the Core ML package(s) of the export + the same ONNX graphs, for ONNX Runtime on iOS
    web      the onnx-community layout transformers.js loads (exporter/package/web.py)

`package verify` is exporter/package/verify.py. Nothing here imports torch.

Mobile and web runtimes are older than ONNX Runtime 1.32, so every bundle carries the recurrent ops in
the `com.microsoft` form; a `standard` export is converted while packaging (same op, same weights,
another domain) rather than refused, since the conversion is lossless and checked by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import onnx

from exporter.atomic import atomic_output_dir, check_destination
from exporter.onnx.forms import CONTRIB_DOMAIN, to_contrib
from exporter.package.verify import BUNDLE_FORMAT, BUNDLE_MANIFEST, file_records
from graphs.config import load_text_config
from graphs.errors import QwenEdgeError
from graphs.state import layer_state_layout
from runtime_py.export_format import (MANIFEST as EXPORT_MANIFEST, MIN_IOS, RECURRENT_FORMS, opset_imports,
                                      qwen_edge_version, read_manifest, write_manifest)

TARGETS = ("android", "ios", "web")
COREML_DIR = "coreml"


def package_export(export_dir: Path, out: Path, target: str, variants: list[str] | None = None,
                   force: bool = False, coreml_dir: Path | None = None) -> dict:
    """Write the `target` bundle of `export_dir` into `out` (atomically). Returns its manifest.

    `coreml_dir` (ios only) is a `--format coreml` export of the same checkpoint; without it the
    Core ML packages are looked for in `export_dir/coreml/`.
    """
    export_dir, out = Path(export_dir), Path(out)
    if target not in TARGETS:
        raise QwenEdgeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if coreml_dir is not None and target != "ios":
        raise QwenEdgeError(f"--coreml applies to the ios target only, not {target}; drop it")
    export = read_manifest(export_dir)
    names = _pick_variants(export, export_dir, variants)
    coreml = _coreml_source(export_dir, Path(coreml_dir) if coreml_dir else None) if target == "ios" else None
    check_destination(out, force)
    writers = {"android": _write_android, "ios": partial(_write_ios, coreml=coreml), "web": _write_web}
    with atomic_output_dir(out, force) as tmp:
        details = writers[target](export_dir, tmp, export, names)
        manifest = _manifest(export_dir, tmp, export, target, names, details)
        (tmp / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _pick_variants(export: dict, export_dir: Path, wanted: list[str] | None) -> list[str]:
    have = list(export.get("variants", {}))
    if not have:
        raise QwenEdgeError(f"{export_dir}: its {EXPORT_MANIFEST} lists no variants; re-export it with 'qwen-edge export'")
    for name in wanted or []:
        if name not in have:
            raise QwenEdgeError(f"{export_dir}: has no '{name}' variant (it has {', '.join(have)}); "
                                f"pick from those or export with --quant {name}")
    return list(dict.fromkeys(wanted)) if wanted else have


def _copy_support_files(export_dir: Path, out: Path, export: dict) -> list[str]:
    names = sorted(export.get("support_files", []))
    for name in names:
        shutil.copyfile(export_dir / name, out / name)
    return names


def _write_android(export_dir: Path, out: Path, export: dict, names: list[str]) -> dict:
    from exporter.package.android import write_android

    graphs = write_android(export_dir, out, {n: export["variants"][n] for n in names}, load_text_config(export_dir),
                           _generation_defaults(export_dir), _context_length(export_dir))
    return {"format": "onnx+ort", "graphs": graphs, "support_files": _copy_support_files(export_dir, out, export)}


def _coreml_source(export_dir: Path, coreml_dir: Path | None) -> tuple[list[Path], dict | None]:
    """The Core ML packages for an ios bundle, and the record of the export that made them."""
    source = coreml_dir or export_dir
    packages = sorted(p for p in (source / COREML_DIR).glob("*.mlpackage") if p.is_dir())
    if not packages:
        raise QwenEdgeError(f"{source}: has no Core ML package ({COREML_DIR}/*.mlpackage); export the checkpoint "
                            "with --format coreml and pass that folder as --coreml")
    if coreml_dir is None:
        return packages, read_manifest(export_dir).get("coreml")
    record = read_manifest(coreml_dir)
    if record.get("format") != "coreml":
        raise QwenEdgeError(f"{coreml_dir}: is not a Core ML export (format {record.get('format')!r}); "
                            "pass a folder written by 'qwen-edge export --format coreml'")
    if (coreml_dir / "config.json").read_bytes() != (export_dir / "config.json").read_bytes():
        raise QwenEdgeError(f"{coreml_dir}: was exported from another model than {export_dir} (config.json differs); "
                            "export both from the same checkpoint")
    return packages, record


def _write_ios(export_dir: Path, out: Path, export: dict, names: list[str],
               coreml: tuple[list[Path], dict | None]) -> dict:
    """Core ML package(s) plus the ONNX graphs (and genai_config.json) of the Android bundle, without
    the ORT-format files: ONNX Runtime's iOS packages are full builds that load .onnx directly."""
    from exporter.package.android import write_onnx_graphs

    packages, coreml_record = coreml
    (out / COREML_DIR).mkdir()
    for package in packages:
        shutil.copytree(package, out / COREML_DIR / package.name, copy_function=shutil.copyfile)
    graphs = write_onnx_graphs(export_dir, out, {n: export["variants"][n] for n in names},
                                 load_text_config(export_dir), _generation_defaults(export_dir),
                                 _context_length(export_dir))
    return {"format": "coreml+onnx", "graphs": graphs, "support_files": _copy_support_files(export_dir, out, export),
            "coreml": {"packages": [f"{COREML_DIR}/{p.name}" for p in packages], "export_record": coreml_record}}


def _write_web(export_dir: Path, out: Path, export: dict, names: list[str]) -> dict:
    from exporter.package.web import write_web_layout

    with contrib_view(export_dir, export) as source:
        write_web_layout(source, out, names)
    graphs = {n: {**{k: export["variants"][n][k] for k in ("embed_tokens", "decoder", "vision_encoder")
                     if k in export["variants"][n]},
                  "converted_to_contrib": export.get("recurrent_ops") != "contrib"} for n in names}
    support = sorted(p.name for p in out.iterdir() if p.is_file())
    return {"format": "onnx", "graphs": graphs, "support_files": support}


def _context_length(export_dir: Path) -> int:
    """The model's context window (config.json), the length genai allocates for."""
    config = json.loads((export_dir / "config.json").read_text())
    text = config.get("text_config", config)
    return int(text.get("max_position_embeddings", config.get("max_position_embeddings", 4096)))


@contextmanager
def contrib_view(export_dir: Path, export: dict) -> Iterator[Path]:
    """The export itself when its recurrent ops are contrib; otherwise a temporary view of it whose
    graphs are converted (exporter/onnx/forms.to_contrib) and whose other files are links."""
    if export.get("recurrent_ops") == "contrib":
        yield export_dir
        return
    with tempfile.TemporaryDirectory(prefix="qwen-edge-contrib-") as tmp:
        view = Path(tmp) / export_dir.name
        for src in sorted(export_dir.rglob("*")):
            if src.relative_to(export_dir).as_posix() == EXPORT_MANIFEST:
                continue  # written below, as the view's own file
            dst = view / src.relative_to(export_dir)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".onnx":
                model = onnx.load(str(src), load_external_data=False)
                to_contrib(model)
                onnx.save(model, str(dst))
            else:
                _link_or_copy(src, dst)
        contrib = RECURRENT_FORMS["contrib"]
        write_manifest(view, dict(export, recurrent_ops=contrib.name, recurrent_ops_domain=contrib.domain,
                                  min_onnxruntime=contrib.min_onnxruntime))
        yield view


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (free; ONNX Runtime loads weights through it), else a symbolic link (the temporary
    folder may be on another file system; file readers follow it, though ONNX Runtime refuses weight
    data behind one), else a copy."""
    for link in (os.link, os.symlink):
        try:
            link(src.resolve(), dst)
            return
        except OSError:
            continue
    shutil.copyfile(src, dst)


def _generation_defaults(export_dir: Path) -> dict:
    path = export_dir / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _graph_record(path: Path) -> dict:
    """Inputs, outputs (name, dims, dtype) and opset imports, read from the graph itself."""
    model = onnx.load(str(path), load_external_data=False)

    def tensors(values) -> list[dict]:  # noqa: ANN001
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "dims": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output),
            "opset_imports": opset_imports(model)}


def _model_record(export_dir: Path, export: dict) -> dict:
    cfg = load_text_config(export_dir)
    shape = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
        "linear_value_head_dim", "linear_conv_kernel_dim", "tie_word_embeddings")}
    shape["layer_types"] = list(cfg.layer_types)
    return {"name": export.get("source_checkpoint", export_dir.name), "architecture": "qwen3_5", "shape": shape}


def _manifest(export_dir: Path, root: Path, export: dict, target: str, names: list[str], details: dict) -> dict:
    graph_files = sorted(p for p in root.rglob("*.onnx") if p.is_file())
    graphs = {p.relative_to(root).as_posix(): _graph_record(p) for p in graph_files}
    opsets: dict[str, int] = {}
    for record in graphs.values():
        for domain, version in record["opset_imports"].items():
            opsets[domain] = max(opsets.get(domain, 0), version)
    runtime = {"onnxruntime": RECURRENT_FORMS["contrib"].min_onnxruntime, "opset_imports": dict(sorted(opsets.items()))}
    if "coreml" in details:
        runtime["ios"] = MIN_IOS
    quant_keys = ("activations", "weight_bits", "block_size", "symmetric", "accuracy_level")
    variants = {n: {"quantization": {k: export["variants"][n][k] for k in quant_keys if k in export["variants"][n]},
                    **details["graphs"][n]} for n in names}
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "target": target,
        "format": details["format"],
        "qwen_edge_version": qwen_edge_version(),
        "model": _model_record(export_dir, export),
        "logits": export.get("logits"),
        "recurrent_ops": {"form": "contrib", "domain": CONTRIB_DOMAIN, "exported_as": export.get("recurrent_ops")},
        "variants": variants,
        "graphs": graphs,
        "state_layout": layer_state_layout(load_text_config(export_dir)),
        "generation_defaults": _generation_defaults(export_dir),
        "support_files": details["support_files"],
        "min_runtime": runtime,
        "files": file_records(root),
    }
    if "coreml" in details:
        manifest["coreml"] = details["coreml"]
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
    return manifest
