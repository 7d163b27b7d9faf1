"""Speculative decoding with the export's own MTP head as the draft: the same tokens, fewer decoder calls.

Each round the head drafts k tokens (one call each, on its own cache), and one decoder call verifies
them: it runs the pending tokens and the drafts, and returns logits at the last k+1 positions.
Draft j is accepted when the target agrees (greedy: it is the argmax; sampling: the standard rule,
accept with probability min(1, p/q), on rejection draw from max(0, p - q) renormalised, so the
output follows the target distribution exactly). The first disagreement ends the round with the
target's own token there, so every round yields between 1 and k+1 tokens.

Rolling back without copying state: the decoder state is committed lazily. After a round that
accepts every draft, the verify call's output state is kept (it consumed exactly the accepted
tokens). After a rejection, its output state is dropped and the state from before the call is kept
(recurrent, conv and KV alike: the call ran on a fork, which writes new tensors); the tokens accepted in that
round stay pending and are run again at the front of the next verify call (decode reads every
weight once per call, so a few more tokens in a call cost less than a call; BENCHMARKS.md has the
measured cost). Once `max_pending` tokens wait, the next round drafts nothing: one decoder call
commits them and gives the token after them, like a plain decode step. The head's cache is rolled back the same way:
its chained drafts run on a fork of its state, and each round writes the true entries (the
decoder's hidden states of the accepted tokens) once.

`forced_acceptance` is a benchmark switch only: it replaces the acceptance test by a coin with that
probability per draft, so the cost of the real loop can be measured at any acceptance on random
weights; its output is not the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from runtime_py.generate import Sampling, draw, sampling_distribution
from runtime_py.sequence import PrefixState, prefill, run_session, truncate_cache
from runtime_py.session import OnnxModel, SequenceState

MAX_DRAFT_TOKENS = 8


@dataclass
class SpeculativeStats:
    """What a speculative run did: drafts offered and accepted per draft position, and calls made."""

    draft_tokens: int
    rounds: int = 0
    offered: list[int] = field(default_factory=list)  # per draft position j: rounds that reached it
    accepted: list[int] = field(default_factory=list)  # per draft position j: rounds that accepted it
    decoder_calls: int = 0
    mtp_calls: int = 0

    def __post_init__(self) -> None:
        self.offered = self.offered or [0] * self.draft_tokens
        self.accepted = self.accepted or [0] * self.draft_tokens

    def acceptance(self) -> list[float]:
        """Per draft position, the share of rounds reaching it that accepted it."""
        return [a / o if o else 0.0 for a, o in zip(self.accepted, self.offered)]

    def tokens_per_round(self, generated: int) -> float:
        return generated / self.rounds if self.rounds else 0.0


def _check(model: OnnxModel, draft_tokens: int) -> None:
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft tokens must be between 1 and {MAX_DRAFT_TOKENS}, not {draft_tokens}")
    model.mtp  # noqa: B018  (refuses an export without a head, with the reason)


@dataclass
class _Consumed:
    """How far the decoder state has got: it consumed history[:count]; logits and hidden state after the last."""

    state: SequenceState
    count: int
    logits: np.ndarray  # [V]
    hidden: np.ndarray  # [1, 1, H]


class SpeculativeSession:
    """One sequence decoded speculatively (runtime_py/sequence.py's DecodingSession): the tokens so
    far, how many of them the decoder state has consumed, and the head's cache, which always has an
    entry for every token but the last."""

    def __init__(self, model: OnnxModel, draft_tokens: int, sampling: Sampling = Sampling(), *,
                 max_pending: int | None = None, forced_acceptance: float | None = None) -> None:
        _check(model, draft_tokens)
        self.model, self.k, self.sampling = model, draft_tokens, sampling
        self.max_pending = max_pending or draft_tokens + 1
        self.forced = forced_acceptance
        self.rng = np.random.default_rng(sampling.seed)
        self.stats = SpeculativeStats(draft_tokens)
        self.history: list[int] = []
        self.done: _Consumed | None = None  # the decoder state
        self.before: _Consumed | None = None  # the one before the latest commit (prefix() may need it)
        self.head_state: SequenceState | None = None
        self.draft_logits: np.ndarray | None = None  # the head's logits for the token after history[-1]
        self.head_hidden: np.ndarray | None = None

    @property
    def pending(self) -> list[int]:
        """Tokens chosen that the decoder state has not consumed yet (the last one always among them)."""
        return self.history[self.done.count:]

    def start(self, prefix: PrefixState) -> list[int]:
        """Continue from `prefix` (made with the head's cache: sequence.prefill(..., with_head=True))."""
        if prefix.head_state is None:
            raise ValueError("speculative decoding needs the MTP head's cache in the prefix; prefill it with_head")
        prefix = prefix.fork()
        self.history = list(prefix.token_ids)
        self.done = self.before = _Consumed(prefix.state, len(self.history), prefix.last_logits, prefix.last_hidden)
        self.head_state = prefix.head_state
        first = self._target_token(prefix.last_logits)
        self._extend_head(prefix.last_hidden, [first])
        self.history.append(first)
        return [first]

    def round(self) -> list[int]:
        """Draft, verify, and return the tokens this round adds (1 to k+1); or, once `max_pending`
        tokens wait, commit them in a call that also gives the next token."""
        if len(self.pending) >= self.max_pending:
            return [self._commit()]
        drafts, draft_probs = self._draft()
        pending = self.pending
        tried = self.done.state.fork()
        logits, hidden = self.model.forward_hidden(np.array([pending + drafts], np.int64), tried,
                                                   logits_last=self.k + 1)
        self.stats.decoder_calls += 1
        self.stats.rounds += 1
        accepted, token = self._accept(logits[0], drafts, draft_probs)
        new = drafts[:accepted] + [token]
        base = len(pending) - 1  # hidden row of pending[-1]
        self._extend_head(hidden[:, base : base + accepted + 1], new)
        if accepted == self.k:  # the call consumed exactly the accepted tokens: keep its state
            self.before = self.done
            self.done = _Consumed(tried, len(self.history) + self.k, logits[0, -1], hidden[:, -1:])
        self.history += new
        return new

    def prefix(self, length: int) -> PrefixState:
        """The state after history[:length] (the decoder runs the tokens its state lacks; the head's
        cache is cut back to length - 1 entries)."""
        if not 1 <= length <= len(self.history):
            raise ValueError(f"the session has {len(self.history)} tokens, not {length}")
        base = self.done if self.done.count <= length else self.before
        if base.count > length:
            raise ValueError(f"the decoder state has passed token {length}; ask for at least {base.count}")
        state, logits, hidden = base.state.fork(), base.logits, base.hidden
        if base.count < length:
            out, h = self.model.forward_hidden(np.array([self.history[base.count:length]], np.int64), state)
            logits, hidden = out[0, -1], h[:, -1:]
        head = self.head_state
        if head.past_length > length - 1:
            head = truncate_cache(head, length - 1)
        return PrefixState(state, self.history[:length], logits, head.fork(), hidden)

    # ---- pieces ---------------------------------------------------------------------------------
    def _commit(self) -> int:
        """Run every pending token through the decoder state (a plain decode step, several tokens
        wide) and return the token after them."""
        state = self.done.state.fork()
        out, hidden = self.model.forward_hidden(np.array([self.pending], np.int64), state)
        self.stats.decoder_calls += 1
        self.before = self.done = _Consumed(state, len(self.history), out[0, -1], hidden[:, -1:])
        token = self._target_token(out[0, -1])
        self._extend_head(hidden[:, -1:], [token])
        self.history.append(token)
        return token

    def _extend_head(self, hidden: np.ndarray, next_tokens: list[int]) -> None:
        """Write the head's entries for decoder hidden states `hidden` [1, n, H] and the tokens that
        follow each; keep its logits and hidden state for the token after the last."""
        embeds = self.model.embed_ids(np.array([next_tokens], np.int64))
        self.draft_logits, self.head_hidden = self.model.mtp.forward(embeds, hidden, self.head_state)
        self.stats.mtp_calls += 1

    def _draft(self) -> tuple[list[int], list[np.ndarray | None]]:
        """k draft tokens; the first from the head's committed cache, the rest chained on a fork of it."""
        drafts, probs = [], []
        logits, hidden = self.draft_logits, self.head_hidden
        chain = self.head_state.fork()
        for j in range(self.k):
            if j:
                embeds = self.model.embed_ids(np.array([[drafts[-1]]], np.int64))
                logits, hidden = self.model.mtp.forward(embeds, hidden, chain)
                self.stats.mtp_calls += 1
            if self.sampling.temperature == 0:
                drafts.append(int(np.argmax(logits)))
                probs.append(None)
            else:
                q = sampling_distribution(logits, self.sampling)
                drafts.append(draw(q, self.rng))
                probs.append(q)
        return drafts, probs

    def _accept(self, logits: np.ndarray, drafts: list[int], draft_probs: list[np.ndarray | None]) -> tuple[int, int]:
        """(drafts accepted, the token that follows them) from the verify logits [k+1, V]."""
        for j, (d, q) in enumerate(zip(drafts, draft_probs)):
            self.stats.offered[j] += 1
            if self.forced is not None:
                if self.rng.random() >= self.forced:
                    return j, int(np.argmax(logits[j]))
            elif q is None:
                if int(np.argmax(logits[j])) != d:
                    return j, int(np.argmax(logits[j]))
            else:
                rejected, token = accept_or_resample(sampling_distribution(logits[j], self.sampling), q, d, self.rng)
                if rejected:
                    return j, token
            self.stats.accepted[j] += 1
        return len(drafts), self._target_token(logits[len(drafts)])

    def _target_token(self, logits: np.ndarray) -> int:
        if self.sampling.temperature == 0:
            return int(np.argmax(logits))
        return draw(sampling_distribution(logits, self.sampling), self.rng)


def accept_or_resample(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
    """The speculative sampling rule for one draft drawn from q: keep it with probability
    min(1, p/q), else draw from max(0, p - q) renormalised. Either way the token follows p.
    Returns (rejected, token)."""
    if rng.random() < min(1.0, p[draft] / q[draft]):
        return False, draft
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    return True, draw(residual / total if total > 0 else p, rng)


def generate_speculative(
    model: OnnxModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft_tokens: int = 2,
    sampling: Sampling = Sampling(),
    stop_ids: Iterable[int] = (),
    on_token: Callable[[int], None] | None = None,
    *,
    forced_acceptance: float | None = None,
    stats: list[SpeculativeStats] | None = None,
) -> list[int]:
    """`runtime_py.generate.generate` with MTP drafts: the same tokens for greedy decoding (up to
    floating-point rounding between a k+1-token call and k+1 one-token calls), the same distribution
    when sampling. `stats`, when given, receives the run's SpeculativeStats."""
    session = SpeculativeSession(model, draft_tokens, sampling, forced_acceptance=forced_acceptance)
    if stats is not None:
        stats.append(session.stats)
    prefix = prefill(model, list(prompt_ids), with_head=True)
    return run_session(session, prefix, max_new_tokens, stop_ids, on_token)[0]
