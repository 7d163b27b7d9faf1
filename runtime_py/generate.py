"""Token generation on an ONNX export: greedy or temperature/top-p sampling, streamed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphs.config import declared_token_ids, load_text_config
from graphs.errors import QwenEdgeError
from runtime_py.chat import parse_assistant
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


def stop_ids(export_dir: Path) -> list[int]:
    """Every end-of-sequence id the checkpoint declares (generation_config.json, config.json, text_config)."""
    return list(declared_token_ids(Path(export_dir)).eos)


@dataclass
class GenerateResult:
    """One generation: the ids in and out, the text, and for chat prompts the reply parsed as the
    template's format defines it (reasoning, content, tool calls)."""

    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    reply: dict | None = None

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "generated_ids": self.generated_ids, "text": self.text,
                **(self.reply or {})}


def generate_chat(model: OnnxModel, tokenizer: TextTokenizer, messages: list[dict], max_new_tokens: int,
                  sampling: Sampling = Sampling(), *, tools: list[dict] | None = None,
                  enable_thinking: bool | None = None, stop_ids: Iterable[int] = (),
                  on_token: Callable[[int], None] | None = None, context: int | None = None) -> GenerateResult:
    """Render `messages` with the model's chat template (as transformers does), generate, parse the reply.
    `context` (the model's positions) refuses a longer prompt and ends generation there."""
    prompt = tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking)
    prompt_ids = tokenizer.encode(prompt)
    if context is not None:
        max_new_tokens = room_for(prompt_ids, max_new_tokens, context)
    ids = generate(model, prompt_ids, max_new_tokens, sampling, stop_ids, on_token)
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    reply = parse_assistant(raw, thinking=prompt.rstrip().endswith("<think>"), tools=tools)
    return GenerateResult(prompt_ids, ids, tokenizer.decode(ids), reply)


@dataclass(frozen=True)
class GenerateRequest:
    """`qwen-edge generate`: a plain prompt, one user turn (`chat`), or a whole conversation (`messages`)."""

    export_dir: Path
    prompt: str | None = None
    chat: bool = False
    messages: list[dict] | None = None  # runtime_py/chat.load_messages
    system: str | None = None  # a system turn in front of the conversation
    tools: list[dict] | None = None  # JSON tool definitions, as the template takes them
    thinking: bool | None = None  # False turns thinking off; None leaves the template's default
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    threads: int | None = None
    variant: str | None = None  # None: the first variant exported

    def conversation(self) -> list[dict] | None:
        """The messages to render, or None for a plain prompt; refuses options that cannot apply."""
        if (self.prompt is None) == (self.messages is None):
            raise QwenEdgeError("give --prompt TEXT or --messages FILE (one of them)")
        chat_only = [name for name, given in (("--system", self.system is not None), ("--tools", self.tools),
                                              ("--no-thinking", self.thinking is False)) if given]
        if self.messages is None and not self.chat:
            if chat_only:
                raise QwenEdgeError(f"{', '.join(chat_only)} apply to chat prompts; add --chat or use --messages")
            return None
        messages = list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt}]
        if self.system is not None:
            if messages[0].get("role") == "system":
                raise QwenEdgeError("--system and a system message in --messages: give the system prompt once")
            messages.insert(0, {"role": "system", "content": self.system})
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, list) and any(part.get("type") != "text" for part in content):
                raise QwenEdgeError(f"messages[{i}] holds an image or video part, and this export has no vision "
                                    "encoder; give text parts only")
        return messages


def room_for(prompt_ids: list[int], max_new_tokens: int, context: int) -> int:
    """How many tokens may follow the prompt: refuse an empty prompt or one that leaves no room in the
    model's context; generation ends at the context, as transformers' max_length does."""
    if not prompt_ids:
        raise QwenEdgeError("the prompt is empty; give at least one token of text")
    if len(prompt_ids) + 1 > context:
        raise QwenEdgeError(f"the prompt: {len(prompt_ids):,} tokens is longer than the model's context allows "
                            f"({context:,} positions, config.json max_position_embeddings, with room for one new "
                            "token); give a shorter prompt")
    return min(max_new_tokens, context - len(prompt_ids))


def generate_text(request: GenerateRequest, on_text: Callable[[str], None] | None = None) -> GenerateResult:
    """Generate for `request`, streaming the text through `on_text` (a plain prompt is echoed first)."""
    messages = request.conversation()
    tokenizer = TextTokenizer(request.export_dir)
    model = OnnxModel(request.export_dir, request.variant or export_variants(request.export_dir)[0],
                      threads=request.threads)
    stream = StreamDecoder(tokenizer)
    on_token = None if on_text is None else (lambda t: on_text(stream.push(t)))
    stops = stop_ids(request.export_dir)
    context = load_text_config(request.export_dir).max_position_embeddings
    if messages is not None:
        return generate_chat(model, tokenizer, messages, request.max_new_tokens, request.sampling, tools=request.tools,
                             enable_thinking=request.thinking, stop_ids=stops, on_token=on_token, context=context)
    prompt_ids = tokenizer.encode(request.prompt)
    max_new_tokens = room_for(prompt_ids, request.max_new_tokens, context)
    if on_text is not None:
        on_text(request.prompt)
    ids = generate(model, prompt_ids, max_new_tokens, request.sampling, stops, on_token)
    return GenerateResult(prompt_ids, ids, tokenizer.decode(ids))
