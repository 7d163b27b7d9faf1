"""The runtime writes conv and recurrent state over its inputs (contrib ops), and forks stay independent."""

from __future__ import annotations

import numpy as np

from runtime_py.session import OnnxModel, SequenceState

CONTRIB, STANDARD = "kv_double_untied", "kv_equal_tied"  # tests/conftest.py: tiny_exports' forms


def _run(model: OnnxModel, rows: np.ndarray, mask: np.ndarray, steps: int) -> tuple[list[np.ndarray], SequenceState]:
    """A left-padded batch prompt (longer than one prefill chunk), then greedy steps; every call's logits."""
    state = model.new_state(rows.shape[0])
    logits = [model.forward(rows, state, mask)]
    for _ in range(steps):
        logits.append(model.forward(logits[-1][:, -1:].argmax(-1), state))
    return logits, state


def _prompt(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    rows = rng.integers(1, vocab, (2, 70))
    mask = np.ones_like(rows)
    mask[1, :9] = 0
    return rows, mask


def test_contrib_state_is_updated_in_place_and_matches_new_buffers(tiny_exports):
    model = OnnxModel(tiny_exports[CONTRIB], "fp32", threads=1, prefill_chunk=32)
    assert model.in_place and all(n.startswith(("past_conv.", "past_recurrent.")) for n in model.in_place)
    rows, mask = _prompt(model.decoder.get_outputs()[0].shape[-1])
    state = model.new_state(2)
    model.forward(rows[:, :32], state, mask[:, :32])
    before = {n: state.values[n].data_ptr() for n in model.in_place}
    model.forward(rows[:, 32:], state, mask[:, 32:])
    assert {n: state.values[n].data_ptr() for n in model.in_place} == before  # written over, not reallocated

    in_place, _ = _run(model, rows, mask, 6)
    model.in_place = frozenset()
    fresh, _ = _run(model, rows, mask, 6)
    for a, b in zip(in_place, fresh):
        np.testing.assert_array_equal(a, b)


def test_standard_ops_get_new_buffers(tiny_exports):
    assert OnnxModel(tiny_exports[STANDARD], "fp32", threads=1).in_place == frozenset()


def test_forks_continue_independently(tiny_exports):
    """Copy on write: after a fork, both the fork and the original run on without touching each other."""
    model = OnnxModel(tiny_exports[CONTRIB], "fp32", threads=1)
    vocab = model.decoder.get_outputs()[0].shape[-1]
    prompt = np.arange(5, 25)[None] % vocab
    a, b = np.array([[3, 4, 5]]), np.array([[7, 8]])

    state = model.new_state(1)
    model.forward(prompt, state)
    model.forward(prompt[:, :1], state)  # a second call, so the state owns its buffers
    assert state.owned
    branch = state.fork()
    after_a = [model.forward(a[:, i : i + 1], branch) for i in range(a.shape[1])]
    after_b = [model.forward(b[:, i : i + 1], state) for i in range(b.shape[1])]

    for tail, got in ((a, after_a), (b, after_b)):
        ref = model.new_state(1)
        model.forward(prompt, ref)
        model.forward(prompt[:, :1], ref)
        want = [model.forward(tail[:, i : i + 1], ref) for i in range(tail.shape[1])]
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
