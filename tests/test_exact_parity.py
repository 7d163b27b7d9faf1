"""Parity of compressed variants against the checkpoint read through their own rounding: a correct
export matches to fp32 precision, a wrong weight does not, on random weights where the raw
checkpoint cannot tell int4 rounding from a defect."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from exporter.cli import main
from quant.onnx_weights import pack_blockwise, unpack_blockwise
from quant.schemes import WeightFormat
from tests.conftest import DEFAULT_VARIANTS


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_unpack_inverts_pack_within_a_rounding_step(bits, symmetric):
    k, n, block = 80, 6, 32  # K not a multiple of the block: the last block is padded
    weight = np.random.default_rng(bits).standard_normal((k, n)).astype(np.float32)
    fmt = WeightFormat(bits, block, symmetric)
    packed = pack_blockwise(weight, fmt)
    back = unpack_blockwise(packed, k, fmt)
    assert back.shape == (k, n)
    step = np.repeat(np.abs(packed.scales).T, block, axis=0)[:k]  # each weight's block scale
    # rounding to the nearest level; symmetric grids (-8..7, -128..127) clip the far end by up to a step
    assert (np.abs(back - weight) <= (1.0 if symmetric else 0.5) * step + 1e-6).all()
    assert np.abs(back - weight).max() > 0  # it is rounded, not passed through
    assert unpack_blockwise(pack_blockwise(back, fmt), k, fmt) == pytest.approx(back, abs=1e-6)


def _verify(checkpoint, export, variant, tmp_path, *flags):
    report = tmp_path / f"{variant}.json"
    result = CliRunner().invoke(main, ["verify", str(checkpoint), str(export), "--variant", variant,
                                       "--prompt-lengths", "1,64", "--decode-steps", "8", "--json", str(report), *flags])
    return result, json.loads(report.read_text())


@pytest.mark.parametrize("variant", DEFAULT_VARIANTS.split(","))
def test_every_variant_verifies_against_its_own_weights(variant, tiny_untied_quantized, tiny_checkpoints, tmp_path):
    """Untied, asymmetric, block 64, accuracy level 4: every scheme passes at the default tolerance."""
    result, report = _verify(tiny_checkpoints["kv_double_untied"], tiny_untied_quantized, variant, tmp_path)
    assert result.exit_code == 0, result.output
    assert report["passed"] and all(p["greedy_agreement"] == 1.0 for p in report["prompts"])
    worst = max(s["max_abs_diff"] / max(1, s["logit_scale"]) for p in report["prompts"] for s in p["steps"])
    assert worst <= report["rtol"]
    if variant in ("q8", "q4", "q4mix"):  # fp32 activations: the graphs compute exactly their rounded weights
        assert report["rtol"] == 1e-4 and "fp32 compute" in report["reference"]
    assert ("stores them" in report["reference"]) == (variant != "fp32")


@pytest.mark.parametrize("mode", ["--whole-graph", "--by-layer"])  # the decoder whole, or one layer at a time
def test_a_wrong_weight_fails_parity(mode, tiny_untied_quantized, tiny_checkpoints, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(tiny_untied_quantized, export)
    path = export / "onnx" / "decoder_model_merged_q4.onnx"
    model = onnx.load(str(path))
    scales = next(t for t in model.graph.initializer if "layers.1." in t.name and t.name.endswith("scales"))
    wrong = onnx.numpy_helper.to_array(scales) * 1.05  # one projection's scales 5 % off
    scales.CopyFrom(onnx.numpy_helper.from_array(wrong.astype(np.float32), scales.name))
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + "_data")
    result, report = _verify(tiny_checkpoints["kv_double_untied"], export, "q4", tmp_path, mode)
    assert result.exit_code == 1 and not report["passed"]


def test_verify_reads_the_formats_the_manifest_records(tiny_untied_quantized, tiny_checkpoints, tmp_path):
    """The reference follows the manifest's `weight_formats`, not the variant's name: a variant renamed
    in the manifest verifies as before, and a malformed entry is one clear error."""
    export = tmp_path / "export"
    shutil.copytree(tiny_untied_quantized, export)
    manifest_path = export / "qwen_edge.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["variants"]["renamed"] = manifest["variants"]["q4mix"]
    manifest_path.write_text(json.dumps(manifest))
    result, report = _verify(tiny_checkpoints["kv_double_untied"], export, "renamed", tmp_path)
    assert result.exit_code == 0 and report["passed"], result.output
    manifest["variants"]["q4"]["weight_formats"]["q_proj"] = {"bits": "4"}
    manifest_path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(tiny_checkpoints["kv_double_untied"]), str(export), "--variant", "q4"])
    assert result.exit_code == 1 and "'weight_formats'" in result.output and len(result.output.strip().splitlines()) == 1
