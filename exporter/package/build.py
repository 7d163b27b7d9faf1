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
import shutil
from functools import partial
from pathlib import Path

from exporter.atomic import atomic_output_dir, check_destination
from exporter.onnx.forms import CONTRIB_DOMAIN
from exporter.package.manifest import BUNDLE_FORMAT, BUNDLE_MANIFEST, derived_fields, file_records, quantization_claim
from exporter.package.verify import bundle_entries
from graphs.config import load_text_config
from graphs.errors import QwenEdgeError
from graphs.file_checks import read_json
from runtime_py.export_format import MANIFEST as EXPORT_MANIFEST, qwen_edge_version, read_manifest
from runtime_py.tokenizer import check_support_files

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
    check_support_files(export_dir)  # a bundle whose tokenizer or chat template the app cannot use is refused
    coreml = _coreml_source(export_dir, Path(coreml_dir) if coreml_dir else None) if target == "ios" else None
    inputs = [export_dir] + ([Path(coreml_dir)] if coreml_dir else [])
    check_destination(out, force, inputs)
    writers = {"android": _write_android, "ios": partial(_write_ios, coreml=coreml), "web": _write_web}
    with atomic_output_dir(out, force, inputs) as tmp:
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
    if not (coreml_dir / "config.json").is_file() or not (export_dir / "config.json").is_file():
        raise QwenEdgeError(f"{coreml_dir}: both exports need their config.json; re-export the checkpoint")
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
        _check_plain_tree(package)
        shutil.copytree(package, out / COREML_DIR / package.name, copy_function=shutil.copyfile)
    graphs = write_onnx_graphs(export_dir, out, {n: export["variants"][n] for n in names},
                                 load_text_config(export_dir), _generation_defaults(export_dir),
                                 _context_length(export_dir))
    return {"format": "coreml+onnx", "graphs": graphs, "support_files": _copy_support_files(export_dir, out, export),
            "coreml": {"packages": [f"{COREML_DIR}/{p.name}" for p in packages], "export_record": coreml_record}}


def _check_plain_tree(folder: Path) -> None:
    """A Core ML package is copied whole: it must hold only folders and regular files (a link could
    bring any file of the machine into the bundle)."""
    _, _, others = bundle_entries(folder)
    if folder.is_symlink() or others:
        others = others or ["(the package itself)"]
        raise QwenEdgeError(f"{folder}: holds {others[0]!r}, a link or special file; a package holds regular files "
                            "only, so re-export it with 'qwen-edge export --format coreml'")


def _write_web(export_dir: Path, out: Path, export: dict, names: list[str]) -> dict:
    from exporter.package.web import write_web_layout

    write_web_layout(export_dir, out, names, convert=export.get("recurrent_ops") != "contrib")
    graphs = {n: {**{k: export["variants"][n][k] for k in ("embed_tokens", "decoder", "vision_encoder")
                     if k in export["variants"][n]},
                  "converted_to_contrib": export.get("recurrent_ops") != "contrib"} for n in names}
    support = sorted(p.name for p in out.iterdir() if p.is_file())
    return {"format": "onnx", "graphs": graphs, "support_files": support}


def _context_length(export_dir: Path) -> int:
    """The model's context window (config.json), the length genai allocates for."""
    return load_text_config(export_dir).max_position_embeddings


def _generation_defaults(export_dir: Path) -> dict:
    path = export_dir / "generation_config.json"
    if not path.exists():
        return {}
    value = read_json(path, "re-run 'qwen-edge export'")
    if not isinstance(value, dict):
        raise QwenEdgeError(f"{path}: must hold a JSON object; re-run 'qwen-edge export'")
    return value


def _model_record(export: dict, export_dir: Path) -> dict:
    return {"name": export.get("source_checkpoint", export_dir.name), "architecture": "qwen3_5"}


def _manifest(export_dir: Path, root: Path, export: dict, target: str, names: list[str], details: dict) -> dict:
    """The claims only the build knows (versions, provenance, quantization options) plus every field
    that follows from the bundle's files (exporter/package/manifest.py), computed as `verify` does."""
    files, _, _ = bundle_entries(root)
    files = [f for f in files if f != BUNDLE_MANIFEST]
    derived = derived_fields(root, [f for f in files if f.endswith(".onnx")], "coreml" in details)
    variants = {n: {"quantization": quantization_claim(export["variants"][n]), **details["graphs"][n]} for n in names}
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "target": target,
        "format": details["format"],
        "qwen_edge_version": qwen_edge_version(),
        "model": {**_model_record(export, export_dir), "shape": derived["model.shape"]},
        "logits": derived["logits"],
        "recurrent_ops": {"form": "contrib", "domain": CONTRIB_DOMAIN, "exported_as": export.get("recurrent_ops")},
        "variants": variants,
        "graphs": derived["graphs"],
        "state_layout": derived["state_layout"],
        "generation_defaults": derived["generation_defaults"],
        "support_files": details["support_files"],
        "min_runtime": derived["min_runtime"],
        "files": file_records(root, files),
    }
    if "coreml" in details:
        manifest["coreml"] = details["coreml"]
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
    return manifest
