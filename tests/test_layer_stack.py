"""The decoder graph stacked from one traced layer of each type computes exactly what a trace of
every layer computes: the same ops, bit-identical outputs (exporter/onnx/layer_stack.py)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporter.onnx import trace
from exporter.onnx.layer_stack import NotStackable
from exporter.onnx.vision import trace_vision
from graphs.checkpoint import open_checkpoint
from graphs.config import vision_config_from_dict
from graphs.random_checkpoint import write_random_checkpoint
from graphs.state import state_tensors
from quant.onnx_weights import module_path
from tests.conftest import TINY_TEXT
from tests.vision_checkpoint import TINY_VISION

L, F = "linear_attention", "full_attention"
CASES = {
    # name: (layer types, untied head, activation dtype, recurrent ops, MTP-draftable decoder, logits)
    "two-periods-untied-draftable": ([L, L, L, F] * 2, True, torch.float32, "contrib", True, "last"),
    "irregular-fp16-standard": ([F, L, F, L, L], False, torch.float16, "standard", False, "last"),
    "all-logits-fp16-draftable": ([L, F, L, L, F, F], False, torch.float16, "contrib", True, "all"),
}


def _ops(model: ir.Model) -> Counter:
    return Counter((node.domain, node.op_type) for node in model.graph)


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_decoder_equals_whole_trace(case: str, tmp_path: Path) -> None:
    types, untied, dtype, form, draftable, logits = CASES[case]
    cfg = copy.deepcopy(TINY_TEXT)
    cfg.update(num_hidden_layers=len(types), layer_types=types, tie_word_embeddings=not untied)
    model = open_checkpoint(write_random_checkpoint(cfg, tmp_path / "ck", seed=11, dtype=torch.float32)) \
        .build_decoder(dtype, logits=logits)
    _assert_stacked_equals_whole(model, form, draftable, case)


def test_stacked_decoder_of_a_checkpoint_saved_by_transformers(tmp_path: Path) -> None:
    """transformers initialises every norm weight alike, so equal constants in different layers: the
    template must still be stacked (not merged across layers, not given up)."""
    transformers = pytest.importorskip("transformers")
    text = copy.deepcopy(TINY_TEXT)
    text.pop("model_type")
    text.update(num_hidden_layers=8, layer_types=[L, L, L, F] * 2)
    torch.manual_seed(3)
    transformers.AutoModelForCausalLM.from_config(transformers.Qwen3_5TextConfig(**text), dtype=torch.float32) \
        .save_pretrained(tmp_path / "ck")
    model = open_checkpoint(tmp_path / "ck").build_decoder(torch.float32, logits="last")
    assert torch.equal(model.layers[0].input_layernorm.weight, model.layers[3].input_layernorm.weight)
    _assert_stacked_equals_whole(model, "contrib", False, "saved by transformers")


def _assert_stacked_equals_whole(model: torch.nn.Module, form: str, draftable: bool, case: str) -> None:
    dtype, types = model.embed_tokens.weight.dtype, model.cfg.layer_types
    stacked = trace.stacked_decoder_graph(model, draftable, None)  # raises rather than fall back
    trace.finish_decoder_graph(stacked, model, form, draftable)
    whole = trace.trace_decoder(model, form, draftable, stack=False)
    assert _ops(stacked) == _ops(whole)
    # every copy names its own layer, so quantization recipes and node names see the real layer
    layers = {int(p.split(".")[1]) for p in map(module_path, stacked.graph) if p and p.startswith("layers.")}
    assert layers == set(range(len(types)))

    rng = np.random.default_rng(0)
    act = np.float16 if dtype == torch.float16 else np.float32
    batch, new, past = 2, 5, 3
    feed = {"inputs_embeds": rng.standard_normal((batch, new, model.cfg.hidden_size)).astype(act),
            "attention_mask": np.ones((batch, past + new), np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + new), (3, batch, new)).astype(np.int64).copy()}
    feed["attention_mask"][1, 0] = 0  # a padded row
    for t in state_tensors(model.cfg):
        feed[t.past_name] = rng.standard_normal(t.shape(batch, past)).astype(np.float32 if t.role.always_fp32 else act)
    a, b = _session(stacked), _session(whole)
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    for name, x, y in zip([o.name for o in a.get_outputs()], a.run(None, feed), b.run(None, feed)):
        assert x.shape == y.shape and np.array_equal(x, y), f"{case}: {name} differs"


def test_unstackable_template_falls_back_to_whole_trace(tiny_checkpoints: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    model = open_checkpoint(tiny_checkpoints["kv_equal_tied"]).build_decoder(torch.float32, logits="last")

    def refuse(*args: object) -> None:
        raise NotStackable("a test refuses")

    monkeypatch.setattr(trace, "stacked_decoder_graph", refuse)
    graph = trace.trace_decoder(model, "contrib")
    assert "tracing every decoder layer (a test refuses)" in capsys.readouterr().err
    assert _ops(graph) == _ops(trace.trace_decoder(model, "contrib", stack=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stacked_vision_tower_equals_whole_trace(dtype: torch.dtype, capsys: pytest.CaptureFixture) -> None:
    """The vision tower traced with one block and stacked to its depth: the ops of a trace of every
    block, every block's own weights (node scopes name blocks 0..depth-1), bit-identical features
    for two images of different sizes."""
    from graphs.random_checkpoint import random_vision_block
    from graphs.vision import VisionEncoder, vision_parameter_shapes

    cfg = vision_config_from_dict({"model_type": "qwen3_5", "vision_config": {**TINY_VISION, "depth": 3}})
    gen = torch.Generator().manual_seed(5)
    with torch.device("meta"):
        tower = VisionEncoder(cfg)
    tower.load_state_dict({n: random_vision_block(n, s, gen).to(dtype) for n, s in vision_parameter_shapes(cfg).items()},
                          strict=True, assign=True)
    stacked, whole = trace_vision(tower.eval()), trace_vision(tower, stack=False)
    assert "tracing every vision block" not in capsys.readouterr().err  # stacked, not fallen back
    assert _ops(stacked) == _ops(whole)
    blocks = {int(p.split(".")[1]) for p in map(module_path, stacked.graph) if p and p.startswith("blocks.")}
    assert blocks == {0, 1, 2}
    grid = np.array([[1, 4, 6], [1, 2, 2]], np.int64)
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod(-1).sum()), cfg.patch_dim)).astype(np.float32)
    feed = {"pixel_values": pixels, "image_grid_thw": grid}
    a, b = _session(stacked).run(None, feed)[0], _session(whole).run(None, feed)[0]
    assert a.shape == b.shape and np.array_equal(a, b)
