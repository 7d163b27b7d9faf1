"""Token generation on an ONNX export: greedy or temperature/top-p sampling, streamed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime_py.export_format import export_variants
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import StreamDecoder, TextTokenizer


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


def sampling_distribution(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution [V] a token is drawn from (sampling.temperature > 0): softmax(logits /
    temperature) cut to the smallest set reaching top_p, renormalised; 0 outside that set."""
    z = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]  # smallest set reaching top_p
    out = np.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits [V]."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    return draw(sampling_distribution(logits, sampling), rng)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a distribution [V], most likely tokens first (so a seed gives the same draws
    whatever the vocabulary order of the unlikely ones)."""
    keep = np.argsort(-probs, kind="stable")[: np.count_nonzero(probs)]
    return int(keep[rng.choice(len(keep), p=probs[keep])])


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


def stop_ids(export_dir: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = Path(export_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
    return []


@dataclass(frozen=True)
class GenerateRequest:
    """`qwen-edge generate`: a prompt (optionally wrapped in the chat template) and how to continue it."""

    export_dir: Path
    prompt: str
    chat: bool = False
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    threads: int | None = None
    variant: str | None = None  # None: the first variant exported
    draft_tokens: int | None = None  # speculative decoding with the export's MTP head (--speculative mtp)
    save_state: Path | None = None  # the sequence state after the prompt, to a file (runtime_py/state_file.py)
    load_state: Path | None = None  # continue a saved state: the prompt follows its tokens


def generate_text(request: GenerateRequest, on_text: Callable[[str], None]) -> list[int]:
    """Stream the prompt (plain prompts are echoed) and then the generated text through `on_text`."""
    tokenizer = TextTokenizer(request.export_dir)
    model = OnnxModel(request.export_dir, request.variant or export_variants(request.export_dir)[0],
                      threads=request.threads)
    messages = [{"role": "user", "content": request.prompt}]
    text = tokenizer.apply_chat_template(messages) if request.chat else request.prompt
    stream = StreamDecoder(tokenizer)
    on_token = lambda t: on_text(stream.push(t))  # noqa: E731
    if request.draft_tokens is None and request.save_state is None and request.load_state is None:
        on_text("" if request.chat else request.prompt)
        return generate(model, tokenizer.encode(text), request.max_new_tokens, request.sampling,
                        stop_ids=stop_ids(request.export_dir), on_token=on_token)
    from runtime_py.sequence import PlainSession, prefill, run_session
    from runtime_py.speculative import SpeculativeSession
    from runtime_py.state_file import load_sequence, save_sequence

    with_head = request.draft_tokens is not None or (request.save_state is not None and model.draftable)
    after = load_sequence(request.load_state, model) if request.load_state is not None else None
    if request.draft_tokens is not None:
        model.mtp  # noqa: B018  (an export without a head is refused before any output)
    on_text("" if request.chat else request.prompt)
    prefix = prefill(model, tokenizer.encode(text), after, with_head)
    if request.save_state is not None:
        save_sequence(request.save_state, model, prefix)
    session = (SpeculativeSession(model, request.draft_tokens, request.sampling) if request.draft_tokens
               else PlainSession(model, request.sampling))
    return run_session(session, prefix, request.max_new_tokens, stop_ids(request.export_dir), on_token)[0]
