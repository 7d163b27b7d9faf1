"""Token generation on an ONNX export: greedy or temperature/top-p sampling, streamed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from runtime_py.session import OnnxModel


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (argmax); otherwise softmax(logits / temperature) cut to top_p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits [V]."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]  # smallest set reaching top_p
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])


def generate(
    model: OnnxModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Iterable[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Prefill the prompt in one call, then decode one token per call. Returns the new token ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    stop = set(stop_ids)
    rng = np.random.default_rng(sampling.seed)
    state = model.new_state(1)
    logits = model.forward(np.array([prompt_ids], np.int64), state)[0, -1]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = choose_token(logits, sampling, rng)
        if token in stop:
            break
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if len(generated) == max_new_tokens:
            break
        logits = model.forward(np.array([[token]], np.int64), state)[0, -1]
    return generated
