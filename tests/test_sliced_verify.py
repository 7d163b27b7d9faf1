"""`verify --by-layer`: the decoder graph cut into one segment per layer and run segment by segment
(exporter/verify/sliced.py) computes what the whole graph computes (that it still fails a wrong export:
tests/test_exact_parity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from exporter.cli import main
from exporter.verify import parity
from exporter.verify.parity import fp32_matmuls, prompt_ids, target_calls
from exporter.verify.runners import OnnxRunner
from exporter.verify.sliced import segments, sliced_calls
from runtime_py.export_format import onnx_variant_files, variant_record
from runtime_py.session import OnnxModel

PROMPTS = (1, 9, 20)


def _whole_and_sliced(export: Path, variant: str) -> tuple[list, list]:
    rewrite = fp32_matmuls if "accuracy_level" in variant_record(export, variant) else None
    prompts = [prompt_ids(n, 200, seed=i) for i, n in enumerate(PROMPTS)]
    whole, sequences = target_calls(OnnxRunner(OnnxModel(export, variant, prefill_chunk=1 << 30, rewrite=rewrite)),
                                    prompts, 5)
    return whole, sliced_calls(export, variant, sequences, list(PROMPTS), rewrite)


@pytest.mark.parametrize("layout", ["kv_equal_tied", "kv_double_untied"])  # standard (Scan) and contrib forms
def test_layer_by_layer_computes_the_whole_graph(layout: str, tiny_exports: dict[str, Path]) -> None:
    export = tiny_exports[layout]
    _, decoder = onnx_variant_files(export, "fp32")
    pieces = segments(onnx.load(str(decoder), load_external_data=False))
    config = json.loads((export / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    assert len(pieces) == layers + 1  # one per layer and the head: sliced, not one piece
    whole, sliced = _whole_and_sliced(export, "fp32")
    assert [len(calls) for calls in sliced] == [6, 6, 6]
    for n, got, want in zip(PROMPTS, sliced, whole):
        assert got[0].shape[0] == n  # these exports give every position's logits
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("variant", ["fp32", "q4"])
def test_layer_by_layer_on_a_draftable_decoder(variant: str, tiny_mtp_export: Path) -> None:
    """The decoder with hidden-state outputs and a defaulted `logit_positions` input, quantized too."""
    whole, sliced = _whole_and_sliced(tiny_mtp_export, variant)
    for got, want in zip(sliced, whole):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def _verify(checkpoint: Path, export: Path, variant: str, tmp_path: Path, *flags: str):
    report = tmp_path / f"{variant}.json"
    result = CliRunner().invoke(main, ["verify", str(checkpoint), str(export), "--variant", variant,
                                       "--prompt-lengths", "1,64", "--decode-steps", "8", "--json", str(report), *flags])
    return result, (json.loads(report.read_text()) if report.is_file() else None)


@pytest.mark.parametrize("variant", ["fp16", "q4"])
def test_verify_by_layer_passes_and_says_so(variant: str, tiny_untied_quantized: Path,
                                            tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result, report = _verify(tiny_checkpoints["kv_double_untied"], tiny_untied_quantized, variant, tmp_path, "--by-layer")
    assert result.exit_code == 0, result.output
    assert report["passed"] and report["mode"] == parity.BY_LAYER
    assert "ONNX side: one decoder layer's session at a time" in result.output


def test_by_layer_is_chosen_when_the_session_would_not_fit(tiny_untied_quantized: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    record = variant_record(tiny_untied_quantized, "fp16")
    assert not parity.needs_slicing(tiny_untied_quantized, "fp16", record)
    monkeypatch.setattr(parity.os, "sysconf", lambda name: 256 if name == "SC_PHYS_PAGES" else 4096)  # 1 MiB of RAM
    assert parity.needs_slicing(tiny_untied_quantized, "fp16", record)


def test_by_layer_applies_to_onnx_parity_only(tiny_untied_quantized: Path) -> None:
    result = CliRunner().invoke(main, ["verify", str(tiny_untied_quantized), "--against", str(tiny_untied_quantized),
                                       "--by-layer"])
    assert result.exit_code != 0 and "--by-layer/--whole-graph apply to ONNX parity" in result.output
    assert len(result.output.strip().splitlines()) == 1
