"""Speculative decoding with the export's MTP head: the same greedy tokens as plain decoding, end to end.

Random heads almost never agree with the decoder, so besides the real head (rollback at the first
draft every round) an oracle draft that knows the plain output and errs at a chosen position makes
every round accept 0..k drafts in turn: rollback at every position, on the real verify path.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from exporter.cli import main
from graphs.errors import QwenEdgeError
from runtime_py.generate import Sampling, generate, sampling_distribution
from runtime_py.sequence import prefill, run_session
from runtime_py.session import OnnxModel
from runtime_py.speculative import SpeculativeSession, accept_or_resample, generate_speculative

PROMPT = [3, 17, 42, 99, 5, 250, 8, 61, 777, 140, 12, 900]
NEW = 24


@pytest.fixture(scope="module")
def mtp_model(tiny_mtp_export) -> OnnxModel:
    return OnnxModel(tiny_mtp_export, "fp32")


@pytest.fixture(scope="module")
def plain_tokens(mtp_model) -> list[int]:
    tokens = generate(mtp_model, PROMPT, NEW)
    assert len(set(tokens)) > NEW // 2  # a varied continuation, so agreeing with it means something
    return tokens


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(mtp_model, plain_tokens, k):
    stats = []
    assert generate_speculative(mtp_model, PROMPT, NEW, k, stats=stats) == plain_tokens
    assert stats[0].rounds > 0 and stats[0].offered[0] == stats[0].rounds


class OracleDraft(SpeculativeSession):
    """Drafts the plain greedy continuation, wrong at position `round % (k+1)` (k+1: all right)."""

    def __init__(self, model: OnnxModel, k: int, truth: list[int]) -> None:
        super().__init__(model, k)
        self.truth = truth

    def _draft(self):
        at = len(self.history)
        wrong = self.stats.rounds % (self.k + 1)
        drafts = [self.truth[at + j] if at + j < len(self.truth) else 0 for j in range(self.k)]
        if wrong < self.k:
            drafts[wrong] = (drafts[wrong] + 1) % self.draft_logits.shape[-1]
        return drafts, [None] * self.k


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rollback_at_every_draft_position_keeps_plain_tokens(mtp_model, plain_tokens, k):
    session = OracleDraft(mtp_model, k, PROMPT + plain_tokens + [0] * 8)
    got, _ = run_session(session, prefill(mtp_model, PROMPT, with_head=True), NEW)
    assert got == plain_tokens
    # every number of accepted drafts, 0..k, happened
    assert all(a > 0 for a in session.stats.accepted) and session.stats.accepted[0] < session.stats.offered[0]
    # and the state it hands back after all but the last token (what a chat turn keeps) is the plain one
    prefix = session.prefix(len(PROMPT) + NEW - 1)
    np.testing.assert_allclose(prefix.last_logits, prefill(mtp_model, PROMPT + plain_tokens[: NEW - 1]).last_logits,
                               rtol=1e-4, atol=1e-4)


def test_forced_acceptance_runs_the_loop_at_any_acceptance(mtp_model):
    calls = {}
    for forced in (0.0, 1.0):
        stats = []
        out = generate_speculative(mtp_model, PROMPT, NEW, 3, forced_acceptance=forced, stats=stats)
        assert len(out) == NEW
        calls[forced] = stats[0].decoder_calls
    assert calls[1.0] * 3 < calls[0.0]  # four tokens per call against about one


def test_sampling_rule_keeps_the_target_distribution():
    rng = np.random.default_rng(0)
    p = sampling_distribution(rng.normal(size=12) * 2, Sampling(1.0, 1.0))
    q = sampling_distribution(rng.normal(size=12) * 2, Sampling(1.0, 1.0))
    draws = 20_000
    counts = np.zeros(12)
    for _ in range(draws):
        draft = int(rng.choice(12, p=q))
        counts[accept_or_resample(p, q, draft, rng)[1]] += 1
    assert np.abs(counts / draws - p).max() < 0.015  # about 4 standard deviations


def test_speculative_sampling_is_reproducible_and_stops_at_budget(mtp_model):
    sampling = Sampling(0.8, 0.95, seed=3)
    a = generate_speculative(mtp_model, PROMPT, NEW, 2, sampling)
    assert a == generate_speculative(mtp_model, PROMPT, NEW, 2, sampling) and len(a) == NEW


def test_an_export_without_a_head_cannot_draft(tiny_exports):
    with pytest.raises(QwenEdgeError, match="no MTP head"):
        generate_speculative(OnnxModel(tiny_exports["kv_equal_tied"], "fp32"), PROMPT, 4, 2)


def test_generate_speculative_cli_gives_the_plain_text(tiny_mtp_export):
    args = ["generate", str(tiny_mtp_export), "--prompt", "a b", "--max-new-tokens", "12"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    for k in ("1", "3"):
        spec = CliRunner().invoke(main, args + ["--speculative", "mtp", "--draft-tokens", k])
        assert spec.exit_code == 0, spec.output
        assert spec.output == plain.output
    bad = CliRunner().invoke(main, args + ["--draft-tokens", "2"])
    assert bad.exit_code == 1 and "error: --draft-tokens applies to speculative decoding" in bad.output


@pytest.mark.parametrize("option", [["--speculative", "mtp"], ["--save-state", "state.safetensors"],
                                    ["--load-state", "state.safetensors"]])
def test_images_with_speculative_decoding_or_state_are_one_clear_error(tiny_mtp_export, tmp_path, option):
    """Image and video prompts decode plainly for now: asking for both is refused before any output."""
    image = tmp_path / "x.png"
    image.write_bytes(b"not read")
    option = [str(tmp_path / o) if o.endswith(".safetensors") else o for o in option]
    result = CliRunner().invoke(main, ["generate", str(tiny_mtp_export), "--prompt", "a b", "--image", str(image),
                                       *option])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "images and video run with plain decoding only" in result.output
    assert not (tmp_path / "state.safetensors").exists()


@pytest.mark.parametrize("variant", ["fp32", "q4"])
def test_the_default_models_trained_head_drafts_the_plain_tokens(default_contrib_export, variant):
    """The embedded default model carries a trained MTP head: on held-out text speculative greedy
    gives the plain greedy tokens for k = 1..3, and the head's first drafts are mostly accepted
    (BENCHMARKS.md has the measured acceptance; random heads accept almost none)."""
    from default_model import CHECKPOINT_DIR
    from runtime_py.tokenizer import TextTokenizer

    model = OnnxModel(default_contrib_export, variant)
    text = (CHECKPOINT_DIR.parent / "heldout.txt").read_text()
    prompt = TextTokenizer(default_contrib_export).encode(text[:300])
    plain = generate(model, prompt, 48)
    for k in (1, 2, 3):
        stats = []
        assert generate_speculative(model, prompt, 48, k, stats=stats) == plain, f"k={k}"
        assert stats[0].acceptance()[0] > 0.4, f"k={k}: first-draft acceptance {stats[0].acceptance()}"
