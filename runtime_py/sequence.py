"""A sequence after a prefix, and the two ways of continuing it: plain decoding or speculative.

`PrefixState` is what continuing a sequence needs: the decoder state having consumed every token so
far, the logits after the last one, and (for exports with an MTP head) the head's cache with an
entry for every token but the last, plus the decoder's hidden state at the last. It is what a state
file holds (runtime_py/state_file.py) and what a chat session carries from turn to turn
(runtime_py/chat_session.py).

A decoding session (`PlainSession`, or `runtime_py.speculative.SpeculativeSession`) starts from a
prefix, yields tokens round by round, and hands back the prefix of any length it reached
(`prefix(n)`), so a caller that stops early (a stop token, a token budget) keeps an exact state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnxruntime as ort

from runtime_py.generate import Sampling, choose_token
from runtime_py.session import OnnxModel, SequenceState


@dataclass
class PrefixState:
    """A sequence (batch 1) after `token_ids`."""

    state: SequenceState  # the decoder's, having consumed every one of token_ids
    token_ids: list[int]
    last_logits: np.ndarray  # [V]: the next token's logits
    head_state: SequenceState | None = None  # the MTP head's cache: an entry for every token but the last
    last_hidden: np.ndarray | None = None  # [1, 1, H]: the decoder's hidden state at the last token

    def fork(self) -> "PrefixState":
        """A copy to continue from; this one stays as it is."""
        return replace(self, state=self.state.fork(), token_ids=list(self.token_ids),
                       head_state=None if self.head_state is None else self.head_state.fork())


def prefill(model: OnnxModel, token_ids: list[int], after: PrefixState | None = None,
            with_head: bool = False) -> PrefixState:
    """Run `token_ids` (after `after`'s tokens, which it does not change) and return the prefix state.
    `with_head` also fills the MTP head's cache (an export with a head)."""
    if not token_ids:
        if after is None:
            raise ValueError("the prompt is empty; give at least one token")
        return after.fork()
    return extend(model, token_ids, after.fork() if after is not None else None, with_head)


def extend(model: OnnxModel, token_ids: list[int], start: PrefixState | None, with_head: bool = False) -> PrefixState:
    """`prefill` that consumes `start` instead of forking it: a loop that keeps only the newest prefix
    lets each call update the recurrent state in place (runtime_py/session.py)."""
    state = start.state if start else model.new_state(1)
    ids = np.array([token_ids], np.int64)
    if not with_head:
        logits = model.forward(ids, state)
        return PrefixState(state, (start.token_ids if start else []) + list(token_ids), logits[0, -1])
    if start is not None and start.head_state is None:
        raise ValueError("this prefix was saved without the MTP head's cache; prefill it again to draft from it")
    logits, hidden = model.forward_hidden(ids, state)
    head_state = start.head_state if start else model.mtp.new_state(1)
    rows, nexts = hidden[:, :-1], list(token_ids[1:])
    if start is not None:  # the previous last token's entry: its hidden state with our first token
        rows, nexts = np.concatenate([start.last_hidden, rows], axis=1), list(token_ids)
    if nexts:
        model.mtp.forward(model.embed_ids(np.array([nexts], np.int64)), rows, head_state)
    return PrefixState(state, (start.token_ids if start else []) + list(token_ids), logits[0, -1], head_state,
                       hidden[:, -1:])


def truncate_cache(state: SequenceState, length: int) -> SequenceState:
    """An attention-only state (the MTP head's) cut back to its first `length` entries (rollback by length)."""
    values = {}
    for name, value in state.values.items():
        array = value.numpy()
        values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array[:, :, :length]))
    return SequenceState(values, state.attention_mask[:, :length].copy(), state.attention_mask[:, :length].sum(1))


class DecodingSession(Protocol):
    """What `run_session` drives: plain decoding or speculative decoding."""

    def start(self, prefix: PrefixState) -> list[int]:
        """Continue from `prefix`: the first tokens chosen after it."""

    def round(self) -> list[int]:
        """The next tokens (at least one)."""

    def prefix(self, length: int) -> PrefixState:
        """The state after the first `length` tokens of everything seen (prefix tokens included)."""


class PlainSession:
    """One token per decoder call."""

    def __init__(self, model: OnnxModel, sampling: Sampling = Sampling(), with_head: bool = False) -> None:
        self.model, self.sampling, self.with_head = model, sampling, with_head
        self.rng = np.random.default_rng(sampling.seed)
        self.current: PrefixState | None = None
        self.chosen: int | None = None

    def start(self, prefix: PrefixState) -> list[int]:
        self.current = prefix.fork()
        self.chosen = choose_token(self.current.last_logits, self.sampling, self.rng)
        return [self.chosen]

    def round(self) -> list[int]:
        self.current = extend(self.model, [self.chosen], self.current, self.with_head)
        self.chosen = choose_token(self.current.last_logits, self.sampling, self.rng)
        return [self.chosen]

    def prefix(self, length: int) -> PrefixState:
        have = len(self.current.token_ids)
        if length == have + 1:
            return prefill(self.model, [self.chosen], self.current, self.with_head)
        if length != have:
            raise ValueError(f"a plain session holds the state after {have} or {have + 1} tokens, not {length}")
        return self.current.fork()


def run_session(session: DecodingSession, prefix: PrefixState, max_new_tokens: int, stop_ids: Iterable[int] = (),
                on_token: Callable[[int], None] | None = None) -> tuple[list[int], int | None]:
    """Decode after `prefix` until a stop token or `max_new_tokens`. Returns the generated tokens and
    the stop token that ended them (None when the budget did)."""
    stop = set(stop_ids)
    generated: list[int] = []
    new = session.start(prefix)
    while True:
        for token in new:
            if token in stop:
                return generated, token
            generated.append(token)
            if on_token is not None:
                on_token(token)
            if len(generated) == max_new_tokens:
                return generated, None
        new = session.round()
