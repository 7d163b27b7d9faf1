"""Token generation on an ONNX export: greedy or temperature/top-p sampling, streamed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime_py.export_format import export_variants
from runtime_py.session import OnnxModel
from runtime_py.vision import MultimodalPrompt, VisualRequest, visual_prompt
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
    visual: MultimodalPrompt | None = None,
) -> list[int]:
    """Prefill the prompt in one call, then decode one token per call. Returns the new token ids.

    `visual` (runtime_py/vision.py) is a prompt with images or video: its embeddings (features
    scattered in) and mRoPE positions are prefilled instead of `prompt_ids`' plain embeddings."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    stop = set(stop_ids)
    rng = np.random.default_rng(sampling.seed)
    state = model.new_state(1)
    if visual is None:
        logits = model.forward(np.array([prompt_ids], np.int64), state)[0, -1]
    else:
        logits = model.forward_embeds(visual.embeds, state, position_ids=visual.positions)[0, -1]
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
    visual: VisualRequest = field(default_factory=VisualRequest)  # images / video in the prompt


@dataclass
class Generation:
    """What one `generate` call saw and produced (the --json record)."""

    prompt_ids: list[int]
    generated_ids: list[int]


def generate_text(request: GenerateRequest, on_text: Callable[[str], None]) -> Generation:
    """Stream the prompt (plain prompts are echoed) and then the generated text through `on_text`."""
    tokenizer = TextTokenizer(request.export_dir)
    variant = request.variant or export_variants(request.export_dir)[0]
    model = OnnxModel(request.export_dir, variant, threads=request.threads)
    visual = None
    if request.visual:
        visual = visual_prompt(request.export_dir, variant, request.prompt, request.chat, request.visual, tokenizer,
                               model, request.max_new_tokens, request.threads)
        prompt_ids = visual.ids
    else:
        messages = [{"role": "user", "content": request.prompt}]
        text = tokenizer.apply_chat_template(messages) if request.chat else request.prompt
        prompt_ids = tokenizer.encode(text)
    stream = StreamDecoder(tokenizer)
    on_text("" if request.chat else request.prompt)
    generated = generate(model, prompt_ids, request.max_new_tokens, request.sampling,
                         stop_ids=stop_ids(request.export_dir), on_token=lambda t: on_text(stream.push(t)),
                         visual=visual)
    return Generation(prompt_ids, generated)
