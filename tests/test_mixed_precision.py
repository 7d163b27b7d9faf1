"""The mixed-precision recipe (`q4mix`): the format of every compressed weight, as the manifest records
it, is what the ONNX graphs and the Core ML package really store (read back from the files), on tiny
random checkpoints saved like transformers' own; and on the trained default model the recipe holds
the q4 gate."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from exporter.coreml.backend import CoreMLOptions, export_coreml
from exporter.coreml.check import load_program
from exporter.onnx.backend import OnnxOptions, export_onnx
from graphs.config import load_text_config
from quant.coreml_weights import param_of_constant
from quant.schemes import FAMILIES, SCHEMES, QuantOptions, family_of

MIX = SCHEMES["q4mix"]


def _manifest_formats(export: Path) -> dict[str, dict | None]:
    return json.loads((export / "qwen_edge.json").read_text())["variants"]["q4mix"]["weight_formats"]


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute}


def test_recipe_is_defined_once_and_differs_from_q4():
    def formats(scheme: str) -> dict:
        return {f: SCHEMES[scheme].weight_format("lm_head.weight" if f == "lm_head" else f"layers.0.x.{f}.weight",
                                                 QuantOptions()) for f in FAMILIES}

    mix = formats("q4mix")
    assert len({(fmt.bits, fmt.block_size) if fmt else None for fmt in mix.values()}) > 1  # really mixed
    assert mix != formats("q4")
    assert MIX.weight_format("layers.0.linear_attn.in_proj_a.weight", QuantOptions()) is None  # small ones stay float


@pytest.fixture(scope="module")
def tiny_mix_onnx(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untied Hv = 2·Hk layout, so the embedding has its own quantized table."""
    return export_onnx(tiny_checkpoints["kv_double_untied"], tmp_path_factory.mktemp("mix") / "onnx", "q4mix",
                       OnnxOptions("contrib"), progress=False)


def test_onnx_graphs_store_the_recorded_formats(tiny_mix_onnx: Path):
    recorded = _manifest_formats(tiny_mix_onnx)
    assert list(recorded) == list(FAMILIES)  # every family of the model is recorded
    onnx_dir = tiny_mix_onnx / "onnx"
    decoder = onnx.load(str(onnx_dir / "decoder_model_merged_q4mix.onnx"), load_external_data=False).graph
    stored: dict[str, set] = {}
    for node in decoder.node:
        if node.op_type == "MatMulNBits":  # named /<module path>/MatMulNBits
            family = family_of(node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight")
            stored.setdefault(family, set()).add((_attrs(node)["bits"], _attrs(node)["block_size"]))
    float_families = {n.name.split("/")[-2] for n in decoder.node if n.op_type == "MatMul"
                      and family_of(n.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight")}
    for family, fmt in recorded.items():
        if fmt is None:
            assert family not in stored and family in float_families
        else:
            assert stored[family] == {(fmt["bits"], fmt["block_size"])}, family
    embed = onnx.load(str(onnx_dir / "embed_tokens_q4mix.onnx"), load_external_data=False).graph
    head = recorded["lm_head"]
    if head is None:
        assert [n.op_type for n in embed.node] == ["Gather"]
    else:
        (gather,) = embed.node
        assert gather.op_type == "GatherBlockQuantized"
        assert (_attrs(gather)["bits"], _attrs(gather)["block_size"]) == (head["bits"], head["block_size"])


def test_onnx_mix_runs_close_to_the_float_model(tiny_mix_onnx: Path, tiny_checkpoints: dict[str, Path]):
    import numpy as np

    from exporter.verify.runners import ReferenceRunner
    from graphs.checkpoint import open_checkpoint
    from runtime_py.session import OnnxModel

    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    model = OnnxModel(tiny_mix_onnx, "q4mix")
    got = model.forward(np.array([ids]), model.new_state(1))[0, -1]
    want = ReferenceRunner(open_checkpoint(tiny_checkpoints["kv_double_untied"]).build_decoder()).forward(ids)[-1]
    assert np.isfinite(got).all() and np.corrcoef(got, want)[0, 1] > 0.9  # int4, yet clearly the same model


@pytest.fixture(scope="module")
def tiny_mix_coreml(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_coreml(tiny_checkpoints["kv_equal_tied"], tmp_path_factory.mktemp("mix") / "coreml", "q4mix",
                         CoreMLOptions(chunk=16, context=64), progress=False)


def test_coreml_package_stores_the_recorded_formats(tiny_mix_coreml: Path):
    from coremltools.converters.mil.mil import types

    recorded = _manifest_formats(tiny_mix_coreml)
    assert list(recorded) == list(FAMILIES)
    cfg = load_text_config(tiny_mix_coreml)
    _, program = load_program(tiny_mix_coreml / "coreml" / "model_q4mix.mlpackage")
    for function in ("prefill", "decode"):
        stored: dict[str, set] = {}
        for op in program.functions[function].operations:
            if op.op_type == "constexpr_blockwise_shift_scale" and (param := param_of_constant(op.name, cfg)):
                data, scale = op.inputs["data"], op.inputs["scale"].val
                bits = int(types.builtin_to_string(data.dtype).removeprefix("int").removeprefix("uint"))
                block = data.shape[-1] // scale.shape[-1]
                stored.setdefault(family_of(param), set()).add((bits, None if bits == 8 and scale.shape[-1] == 1
                                                                else block))
        for family, fmt in recorded.items():
            if fmt is None:
                assert family not in stored, family
            else:
                assert stored[family] == {(fmt["bits"], fmt["block_size"])}, (function, family)


def test_streamed_mix_equals_in_memory(tiny_mix_onnx: Path, tiny_checkpoints: dict[str, Path], tmp_path: Path):
    """q4mix's per-family formats go through the streamed weight pass byte for byte as in memory, on
    the untied layout (its own embedding table, packed per row). The tied layout's shared gather is
    checked the same way for q4 (tests/test_streamed_export.py); q4mix changes only block sizes."""
    from tests.test_streamed_export import assert_same_files

    ref = export_onnx(tiny_checkpoints["kv_double_untied"], tmp_path / "untied", "q4mix",
                      OnnxOptions("contrib", stream_weights=False), progress=False)
    assert_same_files(tiny_mix_onnx, ref)


def test_mix_bundle_verifies(tiny_mix_onnx: Path, tmp_path: Path):
    """A bundle of q4mix claims the block sizes its graphs use (32 for the head, 128 for the
    projections), and package verify agrees with the files."""
    from exporter.package.build import package_export
    from exporter.package.verify import verify_bundle

    package_export(tiny_mix_onnx, tmp_path / "bundle", "android")
    manifest = verify_bundle(tmp_path / "bundle")
    assert sorted(manifest["variants"]["q4mix"]["quantization"]["block_size"]) == [32, 128]
