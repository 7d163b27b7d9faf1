"""The reference `verify` uses for large models (graphs/layerwise.py: layer by layer from the
checkpoint) against transformers, including a config transformers accepts with its own semantics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graphs.checkpoint import open_checkpoint
from graphs.layerwise import score_sequences
from graphs.random_checkpoint import write_random_checkpoint
from tests.conftest import LAYOUTS, tiny_config
from tests.hf_oracle import HfRunner, hf_causal_lm

RTOL = 1e-4
SEQUENCES = [[5], list(range(3, 70)), [int(t) for t in np.random.default_rng(1).integers(0, 320, 40)]]


def assert_matches_transformers(folder: Path) -> None:
    got = score_sequences(open_checkpoint(folder), SEQUENCES)
    hf = hf_causal_lm(folder)
    for ids, logits in zip(SEQUENCES, got):
        ref = HfRunner(hf).forward(np.array([ids]))[0]
        scale = max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(logits - ref).max()) <= RTOL * scale
        assert (logits.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layerwise_reference_matches_transformers(layout: str, tiny_checkpoints: dict[str, Path]) -> None:
    assert_matches_transformers(tiny_checkpoints[layout])


def test_mrope_section_not_summing_to_half_rotary_dim(tmp_path: Path) -> None:
    """transformers' default [11, 11, 10] on a rotary dim of 8: transformers clips the sections."""
    cfg = tiny_config()
    cfg["rope_parameters"]["mrope_section"] = [11, 11, 10]
    ck = write_random_checkpoint(cfg, tmp_path / "ck", seed=5, dtype=torch.float32)
    assert_matches_transformers(ck)
