"""Property-based tests of every reader of untrusted input: any input gives a result or a QwenEdgeError,
never another exception, and a tampered bundle never verifies.

200 examples each in `make test`; for a long run (10,000 each):

    QWEN_EDGE_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/test_fuzz.py

(tests/conftest.py reads the variable into the hypothesis profile.)
"""

from __future__ import annotations

import copy
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from exporter.package.manifest import CLAIMS
from exporter.package.verify import BUNDLE_MANIFEST, check_bundle
from graphs.checkpoint import index_tensors
from graphs.config import LIMITS, text_config_from_dict
from graphs.errors import QwenEdgeError
from graphs.file_checks import parse_json
from runtime_py.export_format import MANIFEST, onnx_variant_files, read_manifest
from runtime_py.tokenizer import TextTokenizer
from tests.conftest import tiny_config

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "default_model" / "checkpoint"

# Any JSON document (nested, mixed types, awkward numbers and strings).
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(["../../etc/passwd", "/etc/hostname", "onnx/../x", "a\\b", "",
                                                     "onnx//x.onnx", "config.json", "float16", "onnx"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                         max_size=4), max_leaves=12)


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) into a JSON document, the root included."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _paths(value, prefix + (i,))
    return found


def _parent(doc: object, path: tuple) -> tuple[object, object]:
    """A deep copy of `doc` and, inside it, the container that holds `path`'s last key."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    return doc, node


def _replace(doc: object, path: tuple, value: object) -> object:
    if not path:
        return value
    doc, node = _parent(doc, path)
    node[path[-1]] = value
    return doc


def _delete(doc: object, path: tuple) -> object:
    if not path:
        return doc
    doc, node = _parent(doc, path)
    del node[path[-1]]
    return doc


@st.composite
def mutated(draw: st.DrawFn, base: object) -> object:
    """`base` with one to three parts replaced by arbitrary JSON, deleted, or a number changed."""
    doc = base
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        action = draw(st.sampled_from(["replace", "delete", "nudge"]))
        if action == "replace":
            doc = _replace(doc, path, draw(JSON))
        elif action == "delete":
            doc = _delete(doc, path)
        else:
            doc = _replace(doc, path, draw(st.sampled_from([0, -1, 1, 2**31, 10**9, 0.5, 1e308, True, None])))
    return doc


CONFIGS = [json.loads((DEFAULT_MODEL / "config.json").read_text()), tiny_config(), tiny_config(multimodal=True)]


@given(st.sampled_from(CONFIGS).flatmap(mutated) | JSON)
def test_config_reader_accepts_or_refuses_cleanly(raw: object) -> None:
    try:
        cfg = text_config_from_dict(raw)
    except QwenEdgeError:
        return
    assert 1 <= cfg.num_hidden_layers <= LIMITS["num_hidden_layers"] == 1024
    assert len(cfg.layer_types) == cfg.num_hidden_layers
    assert all(1 <= getattr(cfg, k) <= LIMITS[k] for k in ("hidden_size", "vocab_size", "head_dim", "intermediate_size"))
    assert 0 < cfg.rms_norm_eps <= 1 and cfg.rotary_dim % 2 == 0


def _safetensors_bytes(header: object, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


VALID_HEADER = {"__metadata__": {"format": "pt"},
                "model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                "model.norm.weight": {"dtype": "BF16", "shape": [2], "data_offsets": [32, 36]}}


@given(st.one_of(
    st.builds(_safetensors_bytes, mutated(VALID_HEADER), st.binary(max_size=64)),
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=64)),
    st.binary(max_size=128),
))
def test_safetensors_header_reader_accepts_or_refuses_cleanly(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(blob)
        try:
            decoder, vision = index_tensors(Path(tmp))
        except QwenEdgeError:
            return
    assert all(isinstance(e.shape, tuple) for e in [*decoder.values(), *vision.values()])


VALID_INDEX = {"metadata": {"total_size": 36}, "weight_map": {"model.embed_tokens.weight": "model-1.safetensors",
                                                              "model.norm.weight": "model-2.safetensors"}}


@given(mutated(VALID_INDEX) | JSON, st.booleans())
def test_index_reader_stays_inside_the_checkpoint(index: object, as_text: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ck"
        folder.mkdir()
        for name in ("model-1.safetensors", "model-2.safetensors"):
            (folder / name).write_bytes(_safetensors_bytes(VALID_HEADER, bytes(36)))
        (Path(tmp) / "outside.safetensors").write_bytes(_safetensors_bytes(VALID_HEADER, bytes(36)))
        text = json.dumps(index) if as_text else json.dumps(index)[: len(json.dumps(index)) // 2]
        (folder / "model.safetensors.index.json").write_text(text)
        try:
            decoder, vision = index_tensors(folder)
        except QwenEdgeError:
            return
        assert all(e.file.parent == folder for e in [*decoder.values(), *vision.values()])


EXPORT_MANIFEST = {
    "export_format": 1, "qwen_edge_version": "0.1.0", "format": "onnx", "source_checkpoint": "checkpoint",
    "recurrent_ops": "standard", "recurrent_ops_domain": "ai.onnx", "min_onnxruntime": "1.32", "logits": "last position",
    "variants": {
        "fp32": {"embed_tokens": "onnx/embed_tokens.onnx", "decoder": "onnx/decoder_model_merged.onnx",
                 "activations": "float32", "opset_imports": {"ai.onnx": 27}, "bytes_on_disk": 7646504},
        "q4": {"embed_tokens": "onnx/embed_tokens_q4.onnx", "decoder": "onnx/decoder_model_merged_q4.onnx",
               "activations": "float32", "opset_imports": {"ai.onnx": 27, "com.microsoft": 1}, "weight_bits": 4,
               "block_size": 32, "symmetric": True, "accuracy_level": 4, "bytes_on_disk": 1278041}},
    "support_files": ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"],
}


@given(mutated(EXPORT_MANIFEST) | JSON)
def test_export_manifest_reader_accepts_or_refuses_cleanly(manifest: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        (folder / MANIFEST).write_text(json.dumps(manifest))
        try:
            checked = read_manifest(folder)
            for name in checked["variants"]:
                if checked.get("format", "onnx") == "onnx":
                    paths = onnx_variant_files(folder, name)
                    assert all(p.resolve().is_relative_to(folder.resolve()) for p in paths)
        except QwenEdgeError:
            return
        for name in checked.get("support_files", []):
            assert (folder / name).resolve().parent == folder.resolve()


@given(st.text(max_size=40), st.booleans())
def test_strict_json_refuses_repeated_keys_and_nan(key: str, twice: bool) -> None:
    text = '{"%s": 1, "%s": 2}' % (json.dumps(key)[1:-1], json.dumps(key)[1:-1]) if twice else '{"a": NaN}'
    with pytest.raises(QwenEdgeError):
        parse_json(text.encode(), Path("manifest.json"), "re-package", strict=True)


# ---- package verify --------------------------------------------------------------------------------

def _is_claim(path: tuple) -> bool:
    """Is `path` (or a part of it) a field only the build knows (exporter/package/manifest.CLAIMS)?"""
    dotted = ".".join("*" if i == 1 and path[0] == "variants" else str(k) for i, k in enumerate(path))
    return any(dotted == c or dotted.startswith(c + ".") for c in CLAIMS)


@given(data=st.data())
def test_verify_rejects_every_tampered_manifest(tiny_bundle: Path, data: st.DataObject) -> None:
    """Any change to the manifest is caught, except a well-typed change of a provenance claim; with the
    hash pinned, any change at all is caught."""
    path = tiny_bundle / BUNDLE_MANIFEST
    original = path.read_bytes()
    manifest = json.loads(original)
    _, pinned = check_bundle(tiny_bundle)
    inner = data.draw(st.sampled_from(_paths(manifest)[1:]))
    new = data.draw(JSON | st.sampled_from([0, 1, -1, "", [], {}, None, True]))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "add":
        parent = inner[:-1]
        node = manifest
        for key in parent:
            node = node[key]
        if not isinstance(node, dict):
            return
        inner = parent + (data.draw(st.text(min_size=1, max_size=8)),)
    tampered = _delete(manifest, inner) if action == "delete" else _replace(manifest, inner, new)
    if tampered == manifest:
        return
    try:
        path.write_text(json.dumps(tampered, indent=2, sort_keys=True) + "\n")
        if not _is_claim(inner):
            with pytest.raises(QwenEdgeError):
                check_bundle(tiny_bundle)
        with pytest.raises(QwenEdgeError, match="pinned"):
            check_bundle(tiny_bundle, pinned)
    finally:
        path.write_bytes(original)


def test_claims_are_what_only_the_pin_proves(tiny_bundle: Path) -> None:
    """A well-typed change of a provenance claim passes `verify` (documented) and fails with the pin."""
    path = tiny_bundle / BUNDLE_MANIFEST
    original = path.read_bytes()
    _, pinned = check_bundle(tiny_bundle)
    manifest = json.loads(original)
    manifest["model"]["name"] = "someone-else/another-model"
    try:
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        check_bundle(tiny_bundle)
        with pytest.raises(QwenEdgeError, match="pinned"):
            check_bundle(tiny_bundle, pinned)
    finally:
        path.write_bytes(original)


@given(mutated({"files": [{"path": "a", "bytes": 1, "sha256": "0" * 64}], "bundle_format": 1, "target": "web"})
       | JSON | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
def test_verify_of_any_manifest_is_a_clean_error(tiny_bundle: Path, manifest: object) -> None:
    path = tiny_bundle / BUNDLE_MANIFEST
    original = path.read_bytes()
    try:
        path.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        with pytest.raises(QwenEdgeError):
            check_bundle(tiny_bundle)
    finally:
        path.write_bytes(original)


# ---- chat templates ----------------------------------------------------------------------------------

PIECES = st.sampled_from([
    "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}",
    "{% if add_generation_prompt %}assistant:{% endif %}", "{{ bos_token }}", "{{ raise_exception('no') }}",
    "{{ messages.x.y }}", "{% for %}", "{{ 1 / 0 }}", "{{ messages|tojson }}", "{% set x = [1, 2] %}{{ x|join(',') }}",
    "{{ ''.__class__.__mro__ }}", "{{ [].append(1) }}", "{% macro f(a) %}{{ a }}{% endmacro %}{{ f(1) }}",
    "{{ messages[5] }}", "{% endif %}", "{{ 'a' * 3 }}", "{{ x }}", "{#", "{{ range(3)|list }}", "}}", "{%",
])


@given(st.lists(PIECES | st.text(max_size=8), max_size=6).map("".join),
       st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]),
                                       "content": st.text(max_size=20) | st.none()}), max_size=3))
def test_chat_template_rendering_renders_or_refuses_cleanly(template: str, messages: list[dict]) -> None:
    tokenizer = TextTokenizer.__new__(TextTokenizer)  # only the template part is exercised
    tokenizer.config, tokenizer.chat_template = {"bos_token": "<s>"}, template
    try:
        text = tokenizer.apply_chat_template(messages)
    except QwenEdgeError:
        return
    assert isinstance(text, str)
