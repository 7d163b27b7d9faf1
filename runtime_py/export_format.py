"""The export folder's format: its manifest (`qwen_edge.json`), variants and the versions it records.

`qwen-edge export` writes a folder; `generate`, `bench`, `devices`, `verify` and `package` read it.
Everything they share about that folder is defined here, without torch, so an app-side Python or a
packaging job runs without PyTorch installed.

    OUT/qwen_edge.json                 this manifest (schema `EXPORT_FORMAT`)
    OUT/onnx/<graph>{suffix}.onnx      ONNX exports (+ `.onnx_data` beside each); a checkpoint with a
                                       vision tower adds `vision_encoder{suffix}.onnx` (variant key
                                       "vision_encoder")
    OUT/coreml/model{suffix}.mlpackage Core ML exports (functions prefill, decode[, prefill_visual])
    OUT/coreml/vision_encoder{suffix}.mlpackage  with --image-sizes: one function per size (`coreml_vision_function`)
    OUT/config.json, tokenizer.json, ...   the checkpoint's support files (`SUPPORT_FILES`)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from graphs.errors import QwenEdgeError
from graphs.file_checks import member, read_json

MANIFEST = "qwen_edge.json"
EXPORT_FORMAT = 1  # version of the manifest's schema
SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json",
)
COREML_MIN_DEPLOYMENT = "iOS18 / macOS15"  # Core ML states (ct.StateType)
MIN_IOS = "18.0"


def coreml_vision_function(width: int, height: int) -> str:
    """The Core ML vision package's function for images of width × height pixels."""
    return f"image_{width}x{height}"


@dataclass(frozen=True)
class RecurrentForm:
    """Where the two recurrent ops live in an ONNX graph, and the oldest ONNX Runtime that runs them."""

    name: str
    domain: str  # "" is the default ONNX domain
    min_onnxruntime: str
    # The kernels update conv and recurrent state in place when a call binds each state output to its
    # input's buffer (onnxruntime-genai runs them so on CPU). ONNX Runtime expands the standard ops
    # into a Scan, which makes no such promise.
    state_in_place: bool


RECURRENT_FORMS = {f.name: f for f in (
    RecurrentForm("standard", "", "1.32", False),  # opset 27 LinearAttention / CausalConvWithState
    RecurrentForm("contrib", "com.microsoft", "1.25", True),  # ONNX Runtime's contrib ops
)}
STANDARD_OPSET = 27  # the opset that defines the standard recurrent ops
TRACE_OPSET = 20  # the default-domain opset graphs are traced in; a contrib graph keeps it


def qwen_edge_version() -> str:
    try:
        return version("qwen-edge")
    except PackageNotFoundError:
        return "0+unknown"


def opset_imports(model: Any) -> dict[str, int]:
    """{domain: version} of an ONNX ModelProto, the default domain named "ai.onnx" (as manifests record it)."""
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def read_manifest(export_dir: Path) -> dict:
    """The export's `qwen_edge.json`, checked (see `check_manifest`); a folder without one was not
    written by `qwen-edge export`."""
    path = Path(export_dir) / MANIFEST
    if not path.exists():
        raise QwenEdgeError(f"{export_dir}: no {MANIFEST}; pass a folder written by 'qwen-edge export'")
    manifest = read_json(path, "re-run 'qwen-edge export'", strict=True)
    check_manifest(Path(export_dir), manifest)
    return manifest


FORMATS = ("onnx", "coreml")
_VARIANT_FILES = {"onnx": (("embed_tokens", ".onnx"), ("decoder", ".onnx")), "coreml": (("package", ".mlpackage"),)}
_FIELD_TYPES = {  # optional variant fields and their JSON types, as readers use them
    "activations": str, "compute_precision": str, "weight_bits": int, "block_size": int, "symmetric": bool,
    "accuracy_level": int, "bytes_on_disk": int, "opset_imports": dict,
}


def check_manifest(export_dir: Path, manifest: object) -> None:
    """Refuse a manifest whose fields readers would trip over, or whose paths leave the export folder."""
    path = export_dir / MANIFEST

    def bad(problem: str) -> QwenEdgeError:
        return QwenEdgeError(f"{path}: {problem}; this is not a manifest 'qwen-edge export' wrote, so re-export")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("export_format", EXPORT_FORMAT) != EXPORT_FORMAT:
        raise QwenEdgeError(f"{path}: export_format {manifest.get('export_format')!r:.20} is not {EXPORT_FORMAT}; "
                            "re-export with this qwen-edge version")
    fmt = manifest.get("format", "onnx")
    if fmt not in FORMATS:
        raise bad(f"format {fmt!r:.40} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx" and manifest.get("recurrent_ops", "standard") not in tuple(RECURRENT_FORMS):
        raise bad(f"recurrent_ops {manifest.get('recurrent_ops')!r:.40} is not one of {', '.join(RECURRENT_FORMS)}")
    variants = manifest.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise bad("'variants' must be a non-empty object")
    for name, record in variants.items():
        if not isinstance(record, dict):
            raise bad(f"variant {name!r:.40} is not an object")
        for key, suffix in _VARIANT_FILES[fmt]:
            where = f"{path} (variant {name!r:.40}, {key})"
            if not isinstance(record.get(key), str) or not record[key].endswith(suffix):
                raise bad(f"variant {name!r:.40} needs '{key}', a {suffix} path")
            member(export_dir, record[key], where)
        for key, kind in _FIELD_TYPES.items():
            if key in record and (type(record[key]) is not kind):
                raise bad(f"variant {name!r:.40}: '{key}' must be {kind.__name__}")
        precision = record.get("activations" if fmt == "onnx" else "compute_precision")
        if precision not in ("float32", "float16") or record.get("bytes_on_disk", -1) < 0:
            raise bad(f"variant {name!r:.40} needs its precision (float32 or float16) and bytes_on_disk")
    support = manifest.get("support_files", [])
    if (not isinstance(support, list) or len(set(map(str, support))) != len(support)
            or not all(isinstance(n, str) and n in SUPPORT_FILES for n in support)):
        raise bad(f"'support_files' must list distinct names among {', '.join(SUPPORT_FILES)}")
    for name in support:
        member(export_dir, name, f"{path} (support_files)")
    if fmt == "coreml":
        _check_coreml_fields(manifest, bad)


def _check_coreml_fields(manifest: dict, bad) -> None:  # noqa: ANN001
    for key in ("prefill_chunk", "context_capacity"):
        if type(manifest.get(key)) is not int or manifest[key] < 1:
            raise bad(f"'{key}' must be a positive integer")
    if manifest.get("recurrent_state") not in ("state", "io"):
        raise bad("'recurrent_state' must be 'state' or 'io'")
    try:
        inputs = manifest["functions"]["decode"]["inputs"]
        shape = inputs["recurrent_in"] if manifest["recurrent_state"] == "io" else [1]
        if not isinstance(inputs, dict) or not all(type(d) is int and d >= 0 for d in shape):
            raise TypeError
    except (KeyError, TypeError):
        raise bad("'functions.decode.inputs' must describe the decode function's inputs") from None


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write `qwen_edge.json` as a new file (replacing, never writing through, a link to another export's)."""
    path = Path(folder) / MANIFEST
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, path)
    return path


def export_variants(export_dir: Path) -> list[str]:
    """Variant names an export folder holds, in the order they were exported."""
    return list(read_manifest(export_dir)["variants"])


def variant_record(export_dir: Path, variant: str) -> dict:
    """One variant's entry of the manifest, or a clear error naming what the export holds."""
    variants = read_manifest(export_dir)["variants"]
    if variant not in variants:
        raise QwenEdgeError(f"{export_dir}: has no '{variant}' variant (it has {', '.join(variants)}); "
                            f"pick one of those or export with --quant {variant}")
    return variants[variant]


def onnx_variant_files(export_dir: Path, variant: str) -> tuple[Path, Path]:
    """(embed_tokens, decoder) graph paths of one ONNX variant."""
    record = variant_record(export_dir, variant)
    if "decoder" not in record:
        raise QwenEdgeError(f"{export_dir}: variant '{variant}' is not an ONNX export; "
                            "pass a folder written by 'qwen-edge export --format onnx'")
    return Path(export_dir) / record["embed_tokens"], Path(export_dir) / record["decoder"]


def mtp_variant_file(export_dir: Path, variant: str) -> Path | None:
    """The MTP head graph of one ONNX variant, or None when the export has no head."""
    record = variant_record(export_dir, variant)
    return Path(export_dir) / record["mtp"] if "mtp" in record else None


ONNX_GRAPH_KEYS = ("embed_tokens", "decoder", "mtp")  # the graph entries of an ONNX variant record


def variant_files(export_dir: Path, record: dict) -> list[str]:
    """Every file an ONNX variant reads: its graphs and their weight data (shared files once)."""
    names = set()
    for key in ONNX_GRAPH_KEYS:
        if key in record:
            names.add(record[key])
            if (Path(export_dir) / (record[key] + "_data")).is_file():
                names.add(record[key] + "_data")
    return sorted(names)


def fingerprint_files(export_dir: Path, names: list[str]) -> str:
    """SHA-256 over the names and bytes of `names` (what identifies a variant's model)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with (Path(export_dir) / name).open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def variant_fingerprint(export_dir: Path, variant: str) -> str:
    """The variant's fingerprint: recorded at export (`fingerprint`), else computed from its files."""
    record = variant_record(export_dir, variant)
    return record.get("fingerprint") or fingerprint_files(export_dir, variant_files(export_dir, record))


def onnx_vision_file(export_dir: Path, variant: str) -> Path:
    """The vision encoder graph of one ONNX variant; a clear error for an export without one."""
    record = variant_record(export_dir, variant)
    if "vision_encoder" not in record:
        raise QwenEdgeError(f"{export_dir}: this export has no vision encoder (text-only); --image and --video need "
                            "an export of a qwen3_5 checkpoint that carries its vision tower (model.visual.* weights)")
    return Path(export_dir) / record["vision_encoder"]
