"""App bundles: the Android bundle runs in onnxruntime-genai with qwen-edge's greedy tokens, .ort matches
.onnx, packaging is deterministic, and `package verify` rejects tampered bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from exporter.cli import main
from exporter.package.build import package_export
from exporter.package.verify import BUNDLE_MANIFEST, verify_bundle
from graphs.errors import QwenEdgeError
from quant.schemes import SCHEMES
from runtime_py.export_format import read_manifest
from runtime_py.generate import generate, stop_ids
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer
from tests.genai_driver import genai_greedy, genai_model

PROMPTS = [("On Monday the", False), ("What is 12 plus 7?", True)]  # (text, wrap in the chat template)


@pytest.fixture(scope="module")
def android_bundle(default_all_variants: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's fp32 and int4 variants; the export has standard ops, so this also converts them."""
    out = tmp_path_factory.mktemp("bundles") / "android"
    package_export(default_all_variants, out, "android", ["fp32", "q4"])
    return out


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_android_bundle_layout(android_bundle: Path) -> None:
    manifest = json.loads((android_bundle / BUNDLE_MANIFEST).read_text())
    assert manifest["target"] == "android" and manifest["recurrent_ops"]["exported_as"] == "standard"
    listed = {f["path"] for f in manifest["files"]}
    assert {"onnx/model.onnx", "onnx/model.onnx_data", "onnx/model.ort", "onnx/model_q4.onnx", "onnx/model_q4.ort",
            "genai_config.json", "required_operators.config", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "config.json"} <= listed
    for rel in ("onnx/model.onnx", "onnx/model_q4.onnx"):
        graph = onnx.load(str(android_bundle / rel), load_external_data=False)
        recurrent = [n for n in graph.graph.node if n.op_type in ("LinearAttention", "CausalConvWithState")]
        assert recurrent and all(n.domain == "com.microsoft" for n in recurrent)
        assert manifest["graphs"][rel]["inputs"][0]["name"] == "input_ids"
        assert manifest["graphs"][rel]["opset_imports"]["ai.onnx"] < 27
    assert manifest["min_runtime"]["onnxruntime"] == "1.25"
    operators = (android_bundle / "required_operators.config").read_text()
    assert "com.microsoft;1;" in operators and "LinearAttention" in operators and "/tmp" not in operators
    # state layout: 8 layers, two tensors each, the recurrent state always fp32
    layout = manifest["state_layout"]
    assert len(layout) == manifest["model"]["shape"]["num_hidden_layers"]
    assert all(len(layer["tensors"]) == 2 for layer in layout)
    assert {t["input"] for layer in layout for t in layer["tensors"]} == {
        i["name"] for i in manifest["graphs"]["onnx/model.onnx"]["inputs"] if i["name"].startswith("past")}
    # the tied int4 embedding still reads the LM head's bytes: one data file, no second copy of the table
    q4 = onnx.load(str(android_bundle / "onnx/model_q4.onnx"), load_external_data=False)
    places = {t.name: {e.key: e.value for e in t.external_data} for t in q4.graph.initializer if t.external_data}
    assert places["embed_tokens.weight_quantized"]["offset"] == places["lm_head.weight_q4"]["offset"]
    assert {p["location"] for p in places.values()} == {"model_q4.onnx_data"}


@pytest.mark.parametrize("variant", ["fp32", "q4"])
def test_genai_generates_the_same_greedy_tokens(android_bundle: Path, default_all_variants: Path, variant: str) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    manifest = verify_bundle(android_bundle)
    model = genai_model(android_bundle, manifest["variants"][variant]["onnx"])
    genai_tokenizer = og.Tokenizer(model)
    ours = OnnxModel(default_all_variants, variant)
    tokenizer = TextTokenizer(default_all_variants)
    for text, chat in PROMPTS:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        prompt = tokenizer.encode(text)
        assert [int(t) for t in genai_tokenizer.encode(text)] == prompt
        expected = generate(ours, prompt, 24, stop_ids=stop_ids(default_all_variants))
        got = genai_greedy(model, prompt, 24)
        assert got[: len(expected)] == expected and len(expected) >= 5
        # genai emits the end-of-sequence token itself; qwen-edge generate stops before it
        assert got[len(expected):] in ([], got[len(expected):len(expected) + 1])


def _logits(session: ort.InferenceSession, ids: list[list[int]]) -> list[np.ndarray]:
    """Prefill `ids[0]`, then feed each later row one call at a time; logits of every call."""
    inputs = {i.name: i for i in session.get_inputs()}
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    state = {name: np.zeros([1 if d == "batch_size" else (0 if isinstance(d, str) else d) for d in i.shape],
                            dtypes[i.type]) for name, i in inputs.items() if name.startswith("past")}
    out, past = [], 0
    for chunk in ids:
        t = len(chunk)
        feed = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, past + t), np.int64),
                "position_ids": np.broadcast_to(np.arange(past, past + t), (3, 1, t)).astype(np.int64), **state}
        names = [o.name for o in session.get_outputs()]
        result = dict(zip(names, session.run(None, feed)))
        out.append(result["logits"])
        state = {n.replace("present.", "past_key_values.") if n.startswith("present.") else "past_" + n[len("present_"):]: v
                 for n, v in result.items() if n.startswith("present")}
        past += t
    return out


@pytest.mark.parametrize("variant", ["fp32", "q4"])
def test_ort_format_gives_the_onnx_logits(android_bundle: Path, default_contrib_export: Path, variant: str) -> None:
    files = verify_bundle(android_bundle)["variants"][variant]
    calls = [[5, 17, 300, 41, 9, 77, 3], [12], [640]]
    onnx_logits = _logits(ort.InferenceSession(str(android_bundle / files["onnx"]), providers=["CPUExecutionProvider"]), calls)
    ort_logits = _logits(ort.InferenceSession(str(android_bundle / files["ort"]), providers=["CPUExecutionProvider"]), calls)
    # The merged graph also matches the two graphs it was built from, as exported in the contrib form
    # (the bundle's form; exports are deterministic, so these are the same weights).
    reference = OnnxModel(default_contrib_export, variant)
    state = reference.new_state(1)
    export_logits = [reference.forward(np.array([c], np.int64), state) for c in calls]
    for a, b, c in zip(onnx_logits, ort_logits, export_logits):
        scale = max(1.0, float(np.abs(a).max()))
        assert np.abs(a - b).max() <= 1e-5 * scale
        assert np.argmax(a) == np.argmax(c)
        if variant == "fp32":
            # int4 with int8 activations (accuracy level 4) turns 1e-6 input noise into ~0.03 logit jumps
            # (measured: standard vs contrib kernels), so only fp32 is held to the tight bound here.
            assert np.abs(a - c).max() <= 1e-5 * scale


@pytest.mark.parametrize("variant", ["q4", "fp16"])
def test_untied_embedding_with_its_own_data_file_merges_exactly(tiny_untied_quantized: Path, tmp_path: Path,
                                                                 variant: str) -> None:
    """Untied: embed_tokens has its own data file, appended (page-aligned) to the decoder's in the merged graph."""
    manifest = package_export(tiny_untied_quantized, tmp_path / "b", "android", [variant])
    files = manifest["variants"][variant]
    calls = [[5, 17, 300, 41, 9], [12], [200]]
    session = ort.InferenceSession(str(tmp_path / "b" / files["onnx"]), providers=["CPUExecutionProvider"])
    merged = _logits(session, calls)
    reference = OnnxModel(tiny_untied_quantized, variant)
    state = reference.new_state(1)
    for got, chunk in zip(merged, calls):
        want = reference.forward(np.array([chunk], np.int64), state)
        assert np.array_equal(got, want)
    graph = onnx.load(str(tmp_path / "b" / files["onnx"]), load_external_data=False)
    table = graph.graph.node[0].input[0]  # the embedding's gather comes first; its table is the embed's data
    place = next({e.key: e.value for e in t.external_data} for t in graph.graph.initializer if t.name == table)
    assert place["location"] == Path(files["onnx"]).name + "_data" and int(place["offset"]) % 4096 == 0


def test_packaging_twice_gives_identical_hashes(default_export: Path, tmp_path: Path) -> None:
    # different output paths (ORT's .ort writer is sensitive to heap layout, which paths can shift)
    first = package_export(default_export, tmp_path / "one", "android")
    second = package_export(default_export, tmp_path / "a-longer-folder" / "two", "android")
    assert first["files"] == second["files"]
    assert (tmp_path / "one" / BUNDLE_MANIFEST).read_bytes() == (tmp_path / "a-longer-folder" / "two" / BUNDLE_MANIFEST).read_bytes()


@pytest.fixture
def small_bundle(default_export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    code, output = _cli("package", str(default_export), "--target", "android", str(out))
    assert code == 0, output
    code, output = _cli("package", "verify", str(out))
    assert code == 0 and output.startswith("ok:"), output
    return out


def _rejected(bundle: Path, *expected: str) -> None:
    code, output = _cli("package", "verify", str(bundle))
    assert code == 1
    assert output.startswith("error: ") and output.count("\n") == 1, output
    for text in expected:
        assert text in output


def test_verify_rejects_one_changed_byte(small_bundle: Path) -> None:
    data = small_bundle / "onnx" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    _rejected(small_bundle, "onnx/model.onnx_data", "SHA-256")


def test_verify_rejects_a_missing_file(small_bundle: Path) -> None:
    (small_bundle / "tokenizer.json").unlink()
    _rejected(small_bundle, "tokenizer.json: missing")


def test_verify_rejects_a_symlink_leaving_the_bundle(small_bundle: Path) -> None:
    (small_bundle.parent / "outside.json").write_text("{}")
    (small_bundle / "tokenizer.json").unlink()
    (small_bundle / "tokenizer.json").symlink_to(small_bundle.parent / "outside.json")
    _rejected(small_bundle, "tokenizer.json: a symbolic link, where the manifest lists a file")


@pytest.mark.parametrize("path", ["../outside.json", "/etc/hostname", "onnx/../../outside.json"])
def test_verify_rejects_a_path_outside_the_bundle(small_bundle: Path, path: str) -> None:
    (small_bundle.parent / "outside.json").write_text("{}")
    manifest_path = small_bundle / BUNDLE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"path": path, "bytes": 2, "sha256": "0" * 64})
    manifest_path.write_text(json.dumps(manifest))
    _rejected(small_bundle, f"{path}: path outside the bundle")


def test_verify_rejects_unlisted_files_and_non_bundles(small_bundle: Path, tmp_path: Path) -> None:
    (small_bundle / "extra.bin").write_bytes(b"x")
    _rejected(small_bundle, "extra.bin: not listed")
    _rejected(tmp_path / "nothing-here", "no manifest.json")


def test_package_bad_input(default_export: Path, tmp_path: Path) -> None:
    with pytest.raises(QwenEdgeError, match="has no 'q8' variant"):
        package_export(default_export, tmp_path / "b", "android", ["q8"])
    with pytest.raises(QwenEdgeError, match="no qwen_edge.json"):
        package_export(tmp_path, tmp_path / "b", "android")
    (tmp_path / "taken").mkdir()
    code, output = _cli("package", str(default_export), "--target", "android", str(tmp_path / "taken"))
    assert code == 1 and "already exists" in output and "--force" in output
    code, output = _cli("package", str(default_export), "--target", "ios", str(tmp_path / "ios"))
    assert code == 1 and "no Core ML package" in output and "--format coreml" in output
    assert not (tmp_path / "ios").exists() and not list(tmp_path.glob(".ios.partial-*"))


def test_ios_bundle_carries_the_core_ml_export(default_export: Path, default_coreml: Path, tmp_path: Path) -> None:
    """The real Core ML export (every weight option) beside the ONNX export of the same checkpoint."""
    from exporter.coreml.check import read_package_spec

    manifest = package_export(default_export, tmp_path / "ios", "ios", coreml_dir=default_coreml)
    listed = {f["path"] for f in manifest["files"]}
    for name in ("model", "model_q4"):
        inside = {str(p.relative_to(default_coreml)) for p in (default_coreml / "coreml" / f"{name}.mlpackage").rglob("*")
                  if p.is_file()}
        assert inside and inside <= listed  # every file of each package is hashed
    assert "onnx/model.onnx" in listed and not any(p.endswith(".ort") for p in listed)
    assert manifest["min_runtime"]["ios"] == "18.0" and manifest["format"] == "coreml+onnx"
    record = manifest["coreml"]["export_record"]
    assert record["format"] == "coreml" and set(record["variants"]) == set(SCHEMES)
    verify_bundle(tmp_path / "ios")
    spec = read_package_spec(tmp_path / "ios" / "coreml" / "model_q4.mlpackage")  # the bundled copy still reads
    assert set(spec.functions) == {"prefill", "decode"}
    weights = next((tmp_path / "ios" / "coreml" / "model.mlpackage").rglob("weight.bin"))
    weights.write_bytes(b"")
    with pytest.raises(QwenEdgeError, match="weight.bin: 0 bytes"):
        verify_bundle(tmp_path / "ios")
    with pytest.raises(QwenEdgeError, match="not a Core ML export"):
        package_export(default_export, tmp_path / "ios2", "ios", coreml_dir=_coreml_stand_in(default_export, tmp_path))
    assert not (tmp_path / "ios2").exists()


def _coreml_stand_in(onnx_export: Path, tmp_path: Path) -> Path:
    """An ONNX export with a coreml/ folder added: not what --coreml must name."""
    fake = tmp_path / "not-coreml"
    shutil.copytree(onnx_export, fake)
    (fake / "coreml" / "model.mlpackage").mkdir(parents=True)
    return fake


def test_standard_graph_converts_to_exactly_the_contrib_export(default_export: Path, default_contrib_export: Path) -> None:
    """to_contrib (used when packaging a standard export) writes the graph `--recurrent-ops contrib` writes."""
    from exporter.onnx.forms import to_contrib

    def nodes(model: onnx.ModelProto) -> list:
        return [(n.op_type, n.domain, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
                for n in model.graph.node]

    name = "onnx/decoder_model_merged.onnx"
    standard = onnx.load(str(default_export / name), load_external_data=False)
    contrib = onnx.load(str(default_contrib_export / name), load_external_data=False)
    assert to_contrib(standard) and not to_contrib(contrib)
    assert nodes(standard) == nodes(contrib)
    assert sorted((o.domain, o.version) for o in standard.opset_import) == sorted(
        (o.domain, o.version) for o in contrib.opset_import)


def test_web_bundle_of_a_standard_export_runs_in_transformers_js(default_export: Path, tmp_path: Path) -> None:
    """`package --target web` converts a standard export; transformers.js (Node) then gives qwen-edge's tokens."""
    from test_package_web import JS_DIR, run_transformers_js, runtime_tokens, without_stop

    out = tmp_path / "web"
    code, output = _cli("package", str(default_export), "--target", "web", str(out))
    assert code == 0, output
    manifest = verify_bundle(out)
    assert manifest["recurrent_ops"]["exported_as"] == "standard" and manifest["format"] == "onnx"
    assert {"config.json", "tokenizer.json", "onnx/decoder_model_merged.onnx"} <= {f["path"] for f in manifest["files"]}
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.skip("node or tests/js/node_modules missing (make installs them)")
    prompt, chat = PROMPTS[1]
    js = run_transformers_js(node, out, prompt, chat, "fp32")
    ids, expected = runtime_tokens(default_export, "fp32", prompt, chat)
    assert js["prompt_ids"] == ids
    assert without_stop(js["generated_ids"], js["eos_token_id"]) == expected


def test_packaging_leaves_the_export_untouched(default_export: Path, tmp_path: Path) -> None:
    """Packaging a standard export converts its graphs; no byte of the export may change (a linked view's
    manifest once overwrote the export's own through a hard link)."""
    from exporter.package.verify import sha256

    def hashes() -> dict[str, str]:
        return {p.relative_to(default_export).as_posix(): sha256(p) for p in default_export.rglob("*") if p.is_file()}

    before = hashes()
    for target in ("web", "android"):
        package_export(default_export, tmp_path / target, target)
    assert hashes() == before
    assert read_manifest(default_export)["recurrent_ops"] == "standard"
