"""ONNX export vs Hugging Face transformers (the oracle), fp32.

Tolerance: max |Δlogits| <= 1e-4 × max(1, max |logits|) per call (relative to the logit scale; the
tiny random models have logits of magnitude ~30). Greedy tokens must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.verify.parity import SINGLE_CALL
from runtime_py.session import OnnxModel
from tests.conftest import LAYOUTS
from tests.hf_oracle import HfRunner, hf_causal_lm

RTOL = 1e-4
PROMPT_LENGTHS = (1, 63, 64, 65, 130)
DECODE_STEPS = 32


def assert_logits_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(got - ref).max())
    assert diff <= RTOL * scale, f"{what}: max |Δ| {diff:.3e} > {RTOL} × {scale:.1f}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_prefill_then_decode_matches_transformers(layout, length, tiny_checkpoints, tiny_exports):
    hf = HfRunner(hf_causal_lm(tiny_checkpoints[layout]))
    model = OnnxModel(tiny_exports[layout], prefill_chunk=SINGLE_CALL)
    state = model.new_state(1)
    ids = np.random.default_rng(length).integers(0, 320, size=(1, length))
    ref, got = hf.forward(ids), model.forward(ids, state)
    assert_logits_close(got, ref, f"prefill of {length}")
    for step in range(DECODE_STEPS):
        token = int(ref[0, -1].argmax())
        assert int(got[0, -1].argmax()) == token, f"greedy token differs at step {step}"
        ref, got = hf.forward(np.array([[token]])), model.forward(np.array([[token]]), state)
        assert_logits_close(got, ref, f"decode step {step + 1} after {length}")
    assert state.past_length == length + DECODE_STEPS


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prompt_in_two_prefill_calls_equals_one(layout, tiny_exports):
    model = OnnxModel(tiny_exports[layout], prefill_chunk=SINGLE_CALL)
    ids = np.random.default_rng(3).integers(0, 320, size=(1, 100))
    one = model.new_state(1)
    whole = model.forward(ids, one)
    two = model.new_state(1)
    model.forward(ids[:, :37], two)
    tail = model.forward(ids[:, 37:], two)
    assert_logits_close(tail, whole[:, 37:], "second prefill call")
    for name in one.values:
        a, b = one.values[name].numpy(), two.values[name].numpy()
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max())), name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_left_padded_batch_matches_single_sequences(layout, tiny_checkpoints, tiny_exports):
    """A batch of 2 with left padding gives each row what the oracle gives it alone, unpadded."""
    hf_model = hf_causal_lm(tiny_checkpoints[layout])
    model = OnnxModel(tiny_exports[layout], prefill_chunk=SINGLE_CALL)
    rng = np.random.default_rng(11)
    rows = [rng.integers(0, 320, size=70), rng.integers(0, 320, size=45)]
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    state = model.new_state(2)
    got = model.forward(ids, state, mask)
    singles = [HfRunner(hf_model) for _ in rows]
    refs = [s.forward(r[None]) for s, r in zip(singles, rows)]
    for i, r in enumerate(rows):
        assert_logits_close(got[i, width - len(r):], refs[i][0], f"row {i} prefill")
    for step in range(DECODE_STEPS):
        tokens = [int(ref[0, -1].argmax()) for ref in refs]
        assert [int(g) for g in got[:, -1].argmax(-1)] == tokens, f"greedy tokens differ at step {step}"
        got = model.forward(np.array(tokens)[:, None], state)
        refs = [s.forward(np.array([[t]])) for s, t in zip(singles, tokens)]
        for i in range(2):
            assert_logits_close(got[i], refs[i][0], f"row {i} decode step {step + 1}")


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_prefill_equals_one_call(chunk, tiny_exports):
    """The runtime prefills long prompts in chunks (less memory, no slower); results must not change."""
    export = tiny_exports["kv_double_untied"]
    ids = np.random.default_rng(5).integers(0, 320, size=(2, 130))
    mask = np.ones_like(ids)
    mask[1, :50] = 0  # left padding spans several chunks
    one, chunked = OnnxModel(export, prefill_chunk=SINGLE_CALL), OnnxModel(export, prefill_chunk=chunk)
    s1, s2 = one.new_state(2), chunked.new_state(2)
    a, b = one.forward(ids, s1, mask), chunked.forward(ids, s2, mask)
    assert a.shape == b.shape == (2, 130, 320)
    valid = mask.astype(bool)
    assert_logits_close(b[valid], a[valid], f"chunks of {chunk}")
    for name in s1.values:
        x, y = s1.values[name].numpy(), s2.values[name].numpy()
        assert np.abs(x - y).max() <= 1e-4 * max(1.0, float(np.abs(x).max())), name
