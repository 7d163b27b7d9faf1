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

import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from graphs.errors import QwenEdgeError

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


RECURRENT_FORMS = {f.name: f for f in (
    RecurrentForm("standard", "", "1.32"),  # opset 27 LinearAttention / CausalConvWithState
    RecurrentForm("contrib", "com.microsoft", "1.25"),  # ONNX Runtime's contrib ops
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
    """The export's `qwen_edge.json`; a folder without one was not written by `qwen-edge export`."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise QwenEdgeError(f"{export_dir}: no {MANIFEST}; pass a folder written by 'qwen-edge export'")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise QwenEdgeError(f"{path}: not valid JSON ({exc}); re-run 'qwen-edge export'") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("variants", {}), dict):
        raise QwenEdgeError(f"{path}: not a qwen-edge export manifest; re-run 'qwen-edge export'")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write `qwen_edge.json` as a new file (replacing, never writing through, a link to another export's)."""
    path = Path(folder) / MANIFEST
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, path)
    return path


def export_variants(export_dir: Path) -> list[str]:
    """Variant names an export folder holds, in the order they were exported."""
    return list(read_manifest(export_dir).get("variants", {}))


def variant_record(export_dir: Path, variant: str) -> dict:
    """One variant's entry of the manifest, or a clear error naming what the export holds."""
    variants = read_manifest(export_dir).get("variants", {})
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


def onnx_vision_file(export_dir: Path, variant: str) -> Path:
    """The vision encoder graph of one ONNX variant; a clear error for an export without one."""
    record = variant_record(export_dir, variant)
    if "vision_encoder" not in record:
        raise QwenEdgeError(f"{export_dir}: this export has no vision encoder (text-only); --image and --video need "
                            "an export of a qwen3_5 checkpoint that carries its vision tower (model.visual.* weights)")
    return Path(export_dir) / record["vision_encoder"]
