"""Core ML export: the package's shape (two functions, states, weight bit-widths) and its parity
against the PyTorch reference, executed on Linux by the NumPy MIL interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from exporter.cli import main
from exporter.coreml.check import InterpretedPackage, read_package_spec, stored_weights, verify_coreml
from exporter.coreml.drift import eager_call
from exporter.coreml.sequence import CoreMLSequence
from graphs import recurrent_ops
from graphs.checkpoint import open_checkpoint
from graphs.coreml_step import CoreMLStep
from graphs.errors import QwenEdgeError
from graphs.recurrent_ops import MATMUL_ONLY
from quant.coreml_weights import coreml_format, kmeans_lut
from quant.schemes import EMBEDDING_AND_HEAD, SCHEMES

from conftest import COREML_CONTEXT as CONTEXT


def test_solve_by_products_equals_triangular_solve():
    a = torch.randn(3, 2, 64, 64).tril(-1) * 0.3 + torch.eye(64)
    rhs = torch.randn(3, 2, 64, 8)
    torch.testing.assert_close(recurrent_ops.solve_unit_lower_by_products(a, rhs),
                               recurrent_ops.solve_unit_lower(a, rhs), atol=1e-4, rtol=1e-4)


def test_package_has_two_functions_and_the_states(default_coreml: Path):
    spec = read_package_spec(default_coreml / "coreml" / "model.mlpackage")
    assert set(spec.functions) == {"prefill", "decode"} and spec.default_function == "decode"
    manifest = json.loads((default_coreml / "qwen_edge.json").read_text())
    cfg = open_checkpoint(Path(__file__).parent.parent / "default_model" / "checkpoint").config
    expected = {f"conv_{i}" for i in cfg.linear_layers} | {f"recurrent_{i}" for i in cfg.linear_layers}
    expected |= {f"{kind}_{i}" for i in cfg.attention_layers for kind in ("key", "value")}
    for fn in spec.functions.values():
        assert set(fn.states) == expected == set(manifest["states"])
        assert all(dtype == "fp16" for dtype, _ in fn.states.values())
        assert fn.states[f"key_{cfg.attention_layers[0]}"][1] == [1, cfg.num_key_value_heads, CONTEXT, cfg.head_dim]
    assert spec.functions["prefill"].inputs["input_ids"][1] == [1, 64]
    assert spec.functions["decode"].inputs["attention_mask"][1] == [1, 1, 1, CONTEXT]
    assert len(spec.weight_files) == 1  # one weight blob: prefill and decode share it


def test_int4_weights_when_asked(default_coreml: Path):
    q4 = read_package_spec(default_coreml / "coreml" / "model_q4.mlpackage")
    linear_layers = len(open_checkpoint(Path(__file__).parent.parent / "default_model" / "checkpoint").config.linear_layers)
    for fn in q4.functions.values():
        # every projection, the embedding and the LM head in int4; in_proj_a, in_proj_b and the conv stay float
        assert fn.weight_bits.get("int4", 0) > 0 and fn.weight_bits["fp32"] == 3 * linear_layers
    fp32 = read_package_spec(default_coreml / "coreml" / "model.mlpackage")
    assert "int4" not in fp32.functions["decode"].weight_bits


@pytest.mark.parametrize("variant", ["fp32"])
def test_default_model_passes_the_linux_checker(default_coreml: Path, variant: str):
    report, _ = verify_coreml("default", default_coreml, variant)
    assert [p.prompt_length for p in report.prompts] == [64, 130]
    assert report.passed, [(p.prompt_length, [s.max_abs_diff for s in p.steps]) for p in report.prompts]
    assert all(s.ref_token == s.onnx_token for p in report.prompts for s in p.steps)


def _step_with_stored_weights(checkpoint: Path, package: Path, capacity: int, recurrent_io: bool = False):
    """The eager step with every compressed weight replaced by what the package stores (decoded)."""
    ck = open_checkpoint(checkpoint)
    model = ck.build_decoder(kernels=MATMUL_ONLY, logits="last")
    stored = stored_weights(package, ck.config)
    float_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, weight in stored.items():
            model.get_parameter(name).copy_(torch.from_numpy(weight.astype(np.float32)))
    return CoreMLStep(model, capacity, recurrent_io).eval(), stored, float_weights, ck.config


def _check_stored_weights(stored: dict, float_weights: dict, scheme: str, max_error: float) -> None:
    """Exactly the scheme's weights are compressed, each close to its float original (a 4-bit grid).
    A tied table is one constant, named after the LM head."""
    tied = "lm_head.weight" not in float_weights
    want = {name for name in {*float_weights, "lm_head.weight"} if SCHEMES[scheme].bits_for(name)}
    assert set(stored) == want - ({"embed_tokens.weight"} if tied else set())
    for name, weight in stored.items():
        ref = float_weights["embed_tokens.weight" if name not in float_weights else name].numpy()
        error = np.linalg.norm(weight.astype(np.float32) - ref) / np.linalg.norm(ref)
        assert 0 < error < max_error, (name, error)  # compressed (not exact), yet the same tensor


def test_int4_package_computes_with_its_stored_weights(default_coreml: Path, default_checkpoint: Path):
    """The q4 package, run by the interpreter, equals the eager step holding the package's own int4 weights."""
    package = default_coreml / "coreml" / "model_q4.mlpackage"
    step, stored, float_weights, _ = _step_with_stored_weights(default_checkpoint, package, CONTEXT)
    _check_stored_weights(stored, float_weights, "q4", 0.2)
    interpreted = InterpretedPackage(package)
    interpreted.reset()
    mil, eager = CoreMLSequence(interpreted.call, 64, CONTEXT), CoreMLSequence(eager_call(step), 64, CONTEXT)
    ids = list(range(3, 73))
    got, want = mil.prefill(ids), eager.prefill(ids)
    for token in (5, 9, 200):
        np.testing.assert_allclose(got, want, atol=2e-3 * max(1.0, np.abs(want).max()))
        assert got.argmax() == want.argmax()
        got, want = mil.decode(token), eager.decode(token)


def test_tiny_model_passes_the_linux_checker_in_fp16(tiny_coreml: Path, tiny_checkpoints: dict[str, Path]):
    report, spec = verify_coreml(tiny_checkpoints["kv_double_untied"], tiny_coreml, "fp16")
    assert [p.prompt_length for p in report.prompts] == [64, 130]
    assert report.passed and report.rtol == 5e-2
    decode = spec.functions["decode"]
    assert decode.inputs["recurrent_in"][0] == decode.outputs["recurrent_out"][0] == "fp32"
    assert not any(name.startswith("recurrent") for name in decode.states)


def test_palettized_package_computes_with_its_stored_lut(tiny_coreml: Path, tiny_checkpoints: dict[str, Path]):
    """p4 stores its projections as 4-bit LUT weights and the LM head and embedding as 6-bit ones (its
    recipe); in fp16 compute the interpreter stays within the fp16 parity bound (5e-2 of the logit
    scale) of the eager step holding those same LUT weights."""
    package = tiny_coreml / "coreml" / "model_p4.mlpackage"
    widths = read_package_spec(package).functions["decode"].weight_bits
    assert widths.get("lut-uint4", 0) > 0 and widths.get("lut-uint6", 0) == 2  # LM head and embedding
    step, stored, float_weights, _ = _step_with_stored_weights(tiny_checkpoints["kv_double_untied"], package,
                                                                CONTEXT, recurrent_io=True)
    _check_stored_weights(stored, float_weights, "p4", 0.2)
    for name, weight in stored.items():
        fmt = coreml_format(SCHEMES["p4"], name, weight.shape)
        group = weight[:fmt.block_size]  # one table of 2^bits entries per group of output channels
        assert (fmt.bits, fmt.block_size) == ((6, 1) if name in EMBEDDING_AND_HEAD else (4, 16)), name
        assert len(np.unique(group)) <= 1 << fmt.bits < len(np.unique(weight)), name
    interpreted = InterpretedPackage(package)
    interpreted.reset()
    shape = step.recurrent_io_shape()
    mil = CoreMLSequence(interpreted.call, 64, CONTEXT, shape)
    eager = CoreMLSequence(eager_call(step), 64, CONTEXT, shape)
    got, want = mil.prefill([5, 17, 42, 99, 3]), eager.prefill([5, 17, 42, 99, 3])
    for token in (7, 11):
        assert np.abs(got - want).max() <= 5e-2 * max(1.0, np.abs(want).max())
        got, want = mil.decode(token), eager.decode(token)


def test_interpreter_matches_the_eager_step_call_by_call(default_coreml: Path):
    """The interpreter and the eager module it was exported from give the same logits (fp32 compute)."""
    model = open_checkpoint(Path(__file__).parent.parent / "default_model" / "checkpoint").build_decoder(
        kernels=MATMUL_ONLY, logits="last")
    step = CoreMLStep(model, CONTEXT).eval()
    package = InterpretedPackage(default_coreml / "coreml" / "model.mlpackage")
    package.reset()
    ids = list(range(3, 40))
    eager, mil = CoreMLSequence(eager_call(step), 64, CONTEXT), CoreMLSequence(package.call, 64, CONTEXT)
    np.testing.assert_allclose(mil.prefill(ids), eager.prefill(ids), atol=2e-3)
    np.testing.assert_allclose(mil.decode(5), eager.decode(5), atol=2e-3)


def test_unknown_op_is_a_clear_error(default_coreml: Path, monkeypatch: pytest.MonkeyPatch):
    import exporter.coreml.check as check
    import exporter.coreml.mil_interpreter as interpreter

    package_path = default_coreml / "coreml" / "model.mlpackage"
    monkeypatch.setattr(check, "SUPPORTED_OPS", check.SUPPORTED_OPS - {"softmax"})
    with pytest.raises(QwenEdgeError, match="softmax"):  # refused when the package is loaded
        InterpretedPackage(package_path)
    monkeypatch.undo()
    package = InterpretedPackage(package_path)
    package.reset()
    monkeypatch.delitem(interpreter.HANDLERS, "softmax")
    with pytest.raises(QwenEdgeError, match="op type 'softmax'"):  # and never skipped while running
        CoreMLSequence(package.call, 64, CONTEXT).decode(1)


def test_drift_of_fp16_state_short_run():
    from exporter.coreml.drift import measure_drift

    report = measure_drift("default", "state", steps=24, prompt_len=10)
    assert report.greedy_agreement == 1.0 and report.max_relative_diff < 1e-2


def test_recurrent_io_mode_matches_state_mode(tmp_path: Path):
    model = open_checkpoint(Path(__file__).parent.parent / "default_model" / "checkpoint").build_decoder(
        kernels=MATMUL_ONLY, logits="last")
    io_step = CoreMLStep(model, 128, recurrent_io=True).eval()
    state_step = CoreMLStep(model, 128).eval()
    ids = list(range(10, 80))
    a = CoreMLSequence(eager_call(io_step), 64, 128, io_step.recurrent_io_shape())
    b = CoreMLSequence(eager_call(state_step), 64, 128)
    np.testing.assert_allclose(a.prefill(ids), b.prefill(ids), atol=2e-2)
    assert a.recurrent.dtype == np.float32 and a.recurrent.shape[0] == len(model.cfg.linear_layers)


def test_kmeans_lut_clusters():
    values = np.concatenate([np.full(50, -1.0), np.full(50, 2.0)]).astype(np.float32)
    lut, idx = kmeans_lut(values, nbits=1)
    np.testing.assert_allclose(np.sort(lut), [-1.0, 2.0])
    np.testing.assert_allclose(lut[idx], values)


@pytest.mark.parametrize("args, message", [
    (["--chunk", "48"], "does not divide --context"),
    (["--quant", "q3"], "not a Core ML weight option"),
    (["--recurrent-state", "fp64"], "not a mode"),
    (["--all-logits"], "ONNX options"),
])
def test_bad_options_fail_clearly_with_nothing_written(tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "--format", "coreml", "default", str(out), "--context", "256", *args])
    assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_verify_coreml(default_coreml: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["verify", "--format", "coreml", "default", str(default_coreml),
                                       "--decode-steps", "2", "--prompt-lengths", "3", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "prefill:" in result.output and "PASS" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["package"]["functions"]) == {"prefill", "decode"}


def test_quality_gates_through_the_interpreter(default_coreml: Path, tmp_path: Path):
    """`verify --format coreml OUT --against REF`: every weight option of the default model holds its
    default gate on held-out text, run token by token through the MIL interpreter; an impossible gate
    (fp32 top-1 above 100 %) fails the command. 256 tokens keep it fast; BENCHMARKS.md has 1,024."""
    import xml.etree.ElementTree as ET

    json_path, junit_path = tmp_path / "q.json", tmp_path / "q.xml"
    result = CliRunner().invoke(main, ["verify", "--format", "coreml", str(default_coreml), "--against", "default",
                                       "--tokens", "256", "--gate", "fp32.min_top1=1.01",
                                       "--json", str(json_path), "--junit", str(junit_path)])
    assert result.exit_code == 1, result.output
    report = json.loads(json_path.read_text())
    assert report["format"] == "coreml" and report["runner"] == "mil"
    by_name = {v["variant"]: v for v in report["variants"]}
    assert set(by_name) == set(SCHEMES)
    for name, scheme in SCHEMES.items():
        if name != "fp32":
            assert by_name[name]["passed"] and by_name[name]["gate"] == vars(scheme.gate_for("coreml")), by_name[name]
    assert by_name["fp32"]["failures"] == ["top-1 agreement 100.00% < 101.00%"]
    assert by_name["fp32"]["mean_kl"] < 1e-6 and by_name["q4"]["mean_kl"] > by_name["fp32"]["mean_kl"]
    assert [f.get("message").split()[-1] for f in ET.parse(junit_path).getroot().findall(".//failure")] == ["1.01"]


def test_quality_of_an_onnx_export_asks_for_the_right_format(default_coreml: Path):
    result = CliRunner().invoke(main, ["verify", str(default_coreml), "--against", "default"])
    assert result.exit_code == 1 and "add --format coreml" in result.output


@pytest.mark.parametrize("variant", ["q8", "q4", "q4f16", "p4", "q4mix"])
def test_compressed_packages_pass_the_linux_checker_against_their_own_weights(
        tiny_coreml: Path, tiny_checkpoints: dict[str, Path], variant: str, monkeypatch: pytest.MonkeyPatch):
    """Random untied weights: against the float checkpoint int4 moves the logits far beyond any
    tolerance; against the package's own decoded weights every option passes the default one."""
    report, _ = verify_coreml(tiny_checkpoints["kv_double_untied"], tiny_coreml, variant, (64,), 8)
    assert "stores them" in report.reference
    assert report.passed, [(p.prompt_length, [s.max_abs_diff for s in p.steps]) for p in report.prompts]
    if variant == "q4":  # the same check with the float weights in the reference fails
        import exporter.coreml.check as check

        monkeypatch.setattr(check, "stored_weights", lambda package, cfg: {})
        assert not verify_coreml(tiny_checkpoints["kv_double_untied"], tiny_coreml, variant, (64,), 8)[0].passed
