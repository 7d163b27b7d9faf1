"""The fields of a bundle's `manifest.json` that follow from the bundle's own files.

The builder writes them and `package verify` recomputes them from the files it finds, so a manifest
that describes graphs, opsets, a model shape or a state layout other than the ones the bundle holds
is caught even when every file's hash is right. Torch-free (onnx protobufs only, no weights loaded).

    graphs              per .onnx file: inputs and outputs (name, dims, dtype), opset imports
    min_runtime         ONNX Runtime for the contrib ops, the highest opset of each domain, iOS with Core ML
    model               the shape config.json describes (architecture and name are claims, not derived)
    state_layout        graphs/state.py's layout for that config
    logits              'last position' or 'all positions', from the graphs' logits output
    generation_defaults generation_config.json of the bundle ({} without one)
    files, total_bytes  path, size and SHA-256 of every file but the manifest
    support_files       the copied tokenizer/config files at the bundle's top level (web: every top-level file)
    coreml.packages     the bundle's coreml/*.mlpackage folders

Only the build knows the CLAIMS (provenance): `verify` checks their types, and only a pinned
manifest hash (`package verify --manifest-sha256`) proves their values. Every other field is either
derived above or checked against the files (variant file names, quantization, recurrent-op form).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import onnx

from exporter.onnx.forms import CONTRIB_DOMAIN, RECURRENT_OPS, all_nodes
from graphs.config import TextConfig, text_config_from_dict
from graphs.errors import QwenEdgeError
from graphs.file_checks import read_json
from graphs.state import layer_state_layout, state_tensors
from runtime_py.export_format import MIN_IOS, RECURRENT_FORMS, opset_imports

BUNDLE_MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1  # version of the manifest's schema
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
              "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "tie_word_embeddings")
DERIVED = ("graphs", "min_runtime", "model.shape", "state_layout", "logits", "generation_defaults", "total_bytes")
TOP_LEVEL_KEYS = {"bundle_format", "target", "format", "qwen_edge_version", "model", "logits", "recurrent_ops",
                  "variants", "graphs", "state_layout", "generation_defaults", "support_files", "min_runtime", "files",
                  "total_bytes"}  # plus "coreml" in an ios bundle
CLAIMS = ("qwen_edge_version", "model.name", "recurrent_ops.exported_as", "variants.*.converted_to_contrib",
          "coreml.export_record")
QUANT_KEYS = ("activations", "weight_bits", "block_size", "symmetric", "accuracy_level")
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(root: Path, paths: Iterable[str]) -> list[dict]:
    """Path, size and SHA-256 of each file (bundle-relative POSIX paths), sorted by path."""
    return [{"path": rel, "bytes": (root / rel).stat().st_size, "sha256": sha256(root / rel)} for rel in sorted(paths)]


def load_graph(path: Path, fix: str = "re-package the export") -> onnx.ModelProto:
    """The graph protobuf at `path` (weights not loaded); a missing or damaged file is a QwenEdgeError."""
    if not Path(path).is_file():
        raise QwenEdgeError(f"{path}: graph file missing (or not a regular file); {fix}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and onnx's own errors on a damaged file
        raise QwenEdgeError(f"{path}: not a readable ONNX graph ({str(exc)[:160]}); {fix}") from None


def graph_record(model: onnx.ModelProto) -> dict:
    """Inputs, outputs (name, dims, dtype) and opset imports, read from the graph itself."""

    def dtype(v: onnx.ValueInfoProto) -> str:
        try:
            return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        except (KeyError, ValueError, TypeError):
            return f"onnx type {v.type.tensor_type.elem_type}"

    def tensors(values) -> list[dict]:  # noqa: ANN001
        return [{"name": v.name, "dtype": dtype(v), "dims": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]

    return {"inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output),
            "opset_imports": opset_imports(model)}


def standard_recurrent_nodes(model: onnx.ModelProto) -> int:
    """Recurrent nodes outside com.microsoft (a bundle claims the contrib form for every graph)."""
    return sum(1 for n in all_nodes(model.graph) if n.op_type in RECURRENT_OPS and n.domain != CONTRIB_DOMAIN)


def quantization_of(model: onnx.ModelProto) -> dict:
    """What the graph's MatMulNBits nodes say about its weights: bits, block size, accuracy level, symmetry."""
    found: dict[str, set] = {"weight_bits": set(), "block_size": set(), "accuracy_level": set(), "symmetric": set()}
    for node in all_nodes(model.graph):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        found["weight_bits"].add(attrs.get("bits", 4))
        found["block_size"].add(attrs.get("block_size"))
        found["accuracy_level"].add(attrs.get("accuracy_level", 0))
        found["symmetric"].add(len(node.input) < 4 or not node.input[3])
    return {k: next(iter(v)) if len(v) == 1 else sorted(v, key=str) for k, v in found.items() if v}


def quantization_claim(record: dict) -> dict:
    """A bundle variant's `quantization`, from its ONNX export record: a recipe with several formats
    (`weight_formats`, quant/schemes.py) claims every bits and block size its MatMulNBits nodes use,
    as `quantization_of` reads them (the record's `block_size` is only the default block)."""
    claim = {k: record[k] for k in QUANT_KEYS if k in record}
    formats = [f for f in record.get("weight_formats", {}).values() if f]
    for key, field in (("weight_bits", "bits"), ("block_size", "block_size")):
        values = sorted({f[field] for f in formats}, key=str)  # as quantization_of orders them
        if values and key in claim:
            claim[key] = values[0] if len(values) == 1 else values
    return claim


def activations_of(model: onnx.ModelProto, cfg: TextConfig) -> str | None:
    """The activation dtype a graph computes in: that of its state inputs held in the activation dtype
    (graphs/state.py; logits are float32 in every variant)."""
    names = {t.past_name for t in state_tensors(cfg) if t.dtype("float16") == "float16"}
    for tensor in graph_record(model)["inputs"]:
        if tensor["name"] in names:
            return tensor["dtype"]
    return None


def bundle_config(root: Path) -> TextConfig:
    return text_config_from_dict(read_json(root / "config.json", "re-package the export"))


def derived_fields(root: Path, graph_paths: list[str], coreml: bool) -> dict:
    """Every manifest field that follows from the files under `root` (see the module docstring)."""
    models = {rel: load_graph(root / rel) for rel in sorted(graph_paths)}
    graphs = {rel: graph_record(m) for rel, m in models.items()}
    opsets: dict[str, int] = {}
    for record in graphs.values():
        for domain, version in record["opset_imports"].items():
            opsets[domain] = max(opsets.get(domain, 0), version)
    runtime = {"onnxruntime": RECURRENT_FORMS["contrib"].min_onnxruntime, "opset_imports": dict(sorted(opsets.items()))}
    if coreml:
        runtime["ios"] = MIN_IOS
    cfg = bundle_config(root)
    shape = {k: getattr(cfg, k) for k in SHAPE_KEYS}
    shape["layer_types"] = list(cfg.layer_types)
    logits = sorted({_logits_mode(r) for r in graphs.values() if _logits_mode(r)})
    generation = root / "generation_config.json"
    return {
        "graphs": graphs,
        "min_runtime": runtime,
        "model.shape": shape,
        "state_layout": layer_state_layout(cfg),
        "logits": logits[0] if len(logits) == 1 else logits or None,
        "generation_defaults": read_json(generation, "re-package the export") if generation.exists() else {},
    }


def _logits_mode(record: dict) -> str | None:
    for output in record["outputs"]:
        if output["name"] == "logits" and len(output["dims"]) == 3:
            return "last position" if output["dims"][1] == 1 else "all positions"
    return None
