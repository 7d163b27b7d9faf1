"""Quantized variants: what is quantized and what is not, the shared tied embedding, last-position
logits, and the quality gates measured on the trained default model."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from exporter.cli import main
from graphs.config import load_text_config
from runtime_py.session import OnnxModel
from tests.conftest import ALL_SCHEMES, DEFAULT_VARIANTS

SUFFIX = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}


def _load(export, name):
    return onnx.load(str(export / "onnx" / name), load_external_data=False)


@pytest.mark.parametrize("scheme", ALL_SCHEMES.split(","))
def test_every_scheme_writes_its_files_and_runs(scheme, default_all_variants):
    onnx_dir = default_all_variants / "onnx"
    assert (onnx_dir / f"decoder_model_merged{SUFFIX[scheme]}.onnx").is_file()
    assert (onnx_dir / f"embed_tokens{SUFFIX[scheme]}.onnx").is_file()
    model = OnnxModel(default_all_variants, scheme)
    state = model.new_state(1)
    logits = model.forward(np.array([[5, 6, 7, 8]]), state)
    assert logits.shape == (1, 1, 1024) and np.isfinite(logits).all()


@pytest.mark.parametrize("scheme", ALL_SCHEMES.split(","))
def test_recurrent_state_is_fp32_in_every_variant(scheme, default_all_variants):
    graph = _load(default_all_variants, f"decoder_model_merged{SUFFIX[scheme]}.onnx").graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    activation = onnx.TensorProto.FLOAT16 if scheme in ("fp16", "q4f16") else onnx.TensorProto.FLOAT
    for name, elem in types.items():
        if "recurrent" in name or name == "logits":
            assert elem == onnx.TensorProto.FLOAT, name
        elif "conv" in name or "past_key_values" in name or name == "inputs_embeds":
            assert elem == activation, name


@pytest.mark.parametrize("scheme,bits", [("q8", 8), ("q4", 4), ("q4f16", 4)])
def test_large_projections_and_lm_head_are_matmulnbits_small_ones_stay_float(scheme, bits, default_all_variants):
    cfg = load_text_config(default_all_variants)
    graph = _load(default_all_variants, f"decoder_model_merged{SUFFIX[scheme]}.onnx").graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    expected = 6 * len(cfg.linear_layers) + 7 * len(cfg.attention_layers) + 1  # + LM head
    assert len(nbits) == expected
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
    assert "/lm_head/MatMulNBits" in {n.name for n in nbits}
    assert "/layers/3/self_attn/q_proj/MatMulNBits" in {n.name for n in nbits}
    float_matmuls = [n for n in graph.node if n.op_type == "MatMul" and any(i in {t.name for t in graph.initializer}
                                                                             for i in n.input)]
    leaves = sorted({n.name.split("/")[-2] for n in float_matmuls})  # nodes are named by module path
    assert leaves == ["in_proj_a", "in_proj_b"]
    # Only MatMulNBits reads integer weights; conv weights and norms are float initializers.
    nbits_inputs = {i for n in nbits for i in n.input}
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.UINT8:
            assert t.name in nbits_inputs, t.name
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    shapes = {tuple(t.dims) for t in graph.initializer if t.data_type in float_types}
    assert (cfg.conv_dim, 1, cfg.linear_conv_kernel_dim) in shapes  # depthwise conv kernel
    assert (cfg.hidden_size,) in shapes and (cfg.head_dim,) in shapes  # norms


@pytest.mark.parametrize("scheme,bits", [("q8", 8), ("q4", 4), ("q4f16", 4)])
def test_tied_embedding_is_stored_once(scheme, bits, default_all_variants):
    """The gather reads the LM head's quantized bytes in the decoder's data file: no copy anywhere."""
    onnx_dir = default_all_variants / "onnx"
    embed = _load(default_all_variants, f"embed_tokens{SUFFIX[scheme]}.onnx")
    decoder = _load(default_all_variants, f"decoder_model_merged{SUFFIX[scheme]}.onnx")
    assert [n.op_type for n in embed.graph.node] == ["GatherBlockQuantized"]
    assert not (onnx_dir / f"embed_tokens{SUFFIX[scheme]}.onnx_data").exists()
    head = {t.name: {e.key: e.value for e in t.external_data} for t in decoder.graph.initializer}
    for tensor in embed.graph.initializer:
        ref = {e.key: e.value for e in tensor.external_data}
        assert ref["location"] == f"decoder_model_merged{SUFFIX[scheme]}.onnx_data"
        source = {"embed_tokens.weight_quantized": f"lm_head.weight_q{bits}",
                  "embed_tokens.weight_scales": "lm_head.weight_scales"}[tensor.name]
        assert ref == head[source]
    # and the embedding lookup really is the LM head's table: row i of the gather is column i of the head
    model = OnnxModel(default_all_variants, scheme)
    emb = model.embed_ids(np.array([[3, 700]])).astype(np.float32)
    fp32 = OnnxModel(default_all_variants, "fp32").embed_ids(np.array([[3, 700]]))
    assert np.abs(emb - fp32).max() < (0.02 if bits == 8 else 0.3) * np.abs(fp32).max()


def test_untied_quantized_embedding_has_its_own_table(tiny_untied_quantized, tiny_checkpoints):
    from tests.hf_oracle import HfRunner, hf_causal_lm

    embed = _load(tiny_untied_quantized, "embed_tokens_q4f16.onnx")
    assert [n.op_type for n in embed.graph.node] == ["GatherBlockQuantized"]
    assert (tiny_untied_quantized / "onnx" / "embed_tokens_q4f16.onnx_data").is_file()
    assert {e.value for t in embed.graph.initializer for e in t.external_data if e.key == "location"} == {
        "embed_tokens_q4f16.onnx_data"}
    zero_points = [t for t in _load(tiny_untied_quantized, "decoder_model_merged_quantized.onnx").graph.initializer
                   if t.name.endswith("zero_points")]
    assert zero_points, "asymmetric quantization writes zero points"
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    ref = HfRunner(hf_causal_lm(tiny_checkpoints["kv_double_untied"])).forward(ids)
    for scheme in ALL_SCHEMES.split(","):
        model = OnnxModel(tiny_untied_quantized, scheme)
        got = model.forward(ids, model.new_state(1))
        assert got.shape == ref.shape and np.isfinite(got).all()
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # quantized, yet clearly the same model


def test_float_variants_pass_their_gates_on_a_tiny_random_model(tiny_untied_quantized, tiny_checkpoints):
    """fp32 and fp16 hold their gates even on a random-weight model (the int gates need a trained one:
    random weights give chaotic logits, where int4 measured KL ≈ 0.9)."""
    from exporter.verify.quality import measure_quality

    ids = np.random.default_rng(0).integers(0, 320, size=300).tolist()
    report = measure_quality(tiny_untied_quantized, tiny_checkpoints["kv_double_untied"], ["fp32", "fp16"],
                             tokens=300, window=64, greedy_prompts=2, token_ids=ids)
    assert report.passed, [v.failures for v in report.variants]


def test_last_position_logits_by_default(default_all_variants, tiny_exports):
    """A 512-token prefill allocates 1 × vocab logits, not 512 × vocab. The default model has an MTP
    head, so its decoder is draftable: its logit rows are `logit_positions`, whose default is [-1]."""
    graph = _load(default_all_variants, "decoder_model_merged.onnx").graph
    dims = graph.output[0].type.tensor_type.shape.dim
    assert dims[1].dim_param == "logit_positions"
    default = next(t for t in graph.initializer if t.name == "logit_positions")
    assert onnx.numpy_helper.to_array(default).tolist() == [-1]
    model = OnnxModel(default_all_variants, "fp32")
    long = model.forward(np.arange(512)[None] % 1000, model.new_state(1))
    assert long.shape == (1, 1, 1024)
    all_positions = OnnxModel(tiny_exports["kv_equal_tied"])
    assert all_positions.all_logits and not model.all_logits


def test_quality_gates_pass_on_the_default_model(default_all_variants, tmp_path):
    json_path, junit_path = tmp_path / "q.json", tmp_path / "q.xml"
    result = CliRunner().invoke(main, ["verify", str(default_all_variants), "--against", "default",
                                       "--json", str(json_path), "--junit", str(junit_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    by_name = {v["variant"]: v for v in report["variants"]}
    assert list(by_name) == DEFAULT_VARIANTS.split(",")
    assert by_name["fp32"]["top1_agreement"] == 1.0 and by_name["fp32"]["mean_kl"] < 1e-8
    assert by_name["q4"]["mean_kl"] > by_name["q8"]["mean_kl"] > by_name["fp32"]["mean_kl"]  # ordered by precision
    for v in report["variants"]:
        assert v["positions"] >= 1000 and v["passed"]
    suite = ET.parse(junit_path).getroot()
    assert suite.get("tests") == str(3 * len(by_name)) and suite.get("failures") == "0"


def test_impossible_gate_fails_the_command(default_all_variants, tmp_path):
    junit_path = tmp_path / "q.xml"
    result = CliRunner().invoke(main, ["verify", str(default_all_variants), "--against", "default", "--variants", "q4",
                                       "--tokens", "300", "--gate", "q4.min_top1=1.01", "--junit", str(junit_path)])
    assert result.exit_code == 1
    assert "FAIL: top-1 agreement" in result.output
    failures = ET.parse(junit_path).getroot().findall(".//failure")
    assert [f.get("message").split()[-1] for f in failures] == ["1.01"]


def test_quality_against_a_float_export(default_all_variants):
    result = CliRunner().invoke(main, ["verify", str(default_all_variants), "--against", str(default_all_variants),
                                       "--variants", "fp16,q4", "--tokens", "300"])
    assert result.exit_code == 0, result.output
    assert "(fp32)" in result.output


@pytest.mark.parametrize("args,message", [
    (["--quant", "q3"], "--quant 'q3' is not a scheme"),
    (["--block-size", "48"], "Invalid value for '--block-size'"),
    (["--quant", ""], "--quant is empty"),
])
def test_bad_quant_options_are_one_line(args, message, tmp_path):
    result = CliRunner().invoke(main, ["export", "default", str(tmp_path / "out"), *args])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
