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
from runtime_py.vision import MultimodalPrompt, VisualRequest, visual_parts, visual_prompt, with_visuals


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
                  on_token: Callable[[int], None] | None = None, context: int | None = None,
                  decode: Callable[..., list[int]] | None = None,
                  visual: Callable[[str], MultimodalPrompt] | None = None) -> GenerateResult:
    """Render `messages` with the model's chat template (as transformers does), generate, parse the reply.
    `context` (the model's positions) refuses a longer prompt and ends generation there. decode: what
    generates (default `generate`; generate_text passes speculative or state-aware decoding).
    `visual` turns the rendered prompt of a conversation with images or video into its prefill."""
    prompt = tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking)
    prepared = visual(prompt) if visual is not None else None
    prompt_ids = prepared.ids if prepared is not None else tokenizer.encode(prompt)
    if context is not None:
        max_new_tokens = room_for(prompt_ids, max_new_tokens, context)
    ids = (decode or generate)(model, prompt_ids, max_new_tokens, sampling, stop_ids, on_token, visual=prepared)
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
    draft_tokens: int | None = None  # speculative decoding with the export's MTP head (--speculative mtp)
    save_state: Path | None = None  # the sequence state after the prompt, to a file (runtime_py/state_file.py)
    load_state: Path | None = None  # continue a saved state: the prompt follows its tokens
    visual: VisualRequest = field(default_factory=VisualRequest)  # --image / --video / --fps

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
        return with_visuals(messages, self.visual)


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
    variant = request.variant or export_variants(request.export_dir)[0]
    model = OnnxModel(request.export_dir, variant, threads=request.threads)
    stream = StreamDecoder(tokenizer)
    on_token = None if on_text is None else (lambda t: on_text(stream.push(t)))
    stops = stop_ids(request.export_dir)
    context = load_text_config(request.export_dir).max_position_embeddings
    parts = visual_parts(messages) if messages is not None else request.visual.parts()
    decode = _decoder(request, model, bool(parts))

    def prepare(text: str, plain: bool = False) -> MultimodalPrompt:  # the image / video prefill
        return visual_prompt(request.export_dir, variant, text, parts, tokenizer, model, request.max_new_tokens,
                             request.threads, plain=plain, default_fps=request.visual.fps)

    if messages is not None:
        return generate_chat(model, tokenizer, messages, request.max_new_tokens, request.sampling, tools=request.tools,
                             enable_thinking=request.thinking, stop_ids=stops, on_token=on_token, context=context,
                             decode=decode, visual=prepare if parts else None)
    prepared = prepare(request.prompt, plain=True) if parts else None
    prompt_ids = prepared.ids if prepared is not None else tokenizer.encode(request.prompt)
    max_new_tokens = room_for(prompt_ids, request.max_new_tokens, context)
    if on_text is not None:
        on_text(request.prompt)
    ids = decode(model, prompt_ids, max_new_tokens, request.sampling, stops, on_token, visual=prepared)
    return GenerateResult(prompt_ids, ids, tokenizer.decode(ids))


def _decoder(request: GenerateRequest, model: OnnxModel, visual: bool) -> Callable[..., list[int]]:
    """`generate`, or for speculative decoding or saved state a function with its signature. A state
    file is read (and checked) here, and a head looked for, so bad input fails before any output;
    `visual` (the prompt has images or video) refuses those modes, which decode text prompts only."""
    if request.draft_tokens is None and request.save_state is None and request.load_state is None:
        return generate
    if visual:
        raise QwenEdgeError("images and video run with plain decoding only: drop --speculative, --save-state and "
                            "--load-state, or the image and video parts")
    from runtime_py.sequence import PlainSession, prefill, run_session
    from runtime_py.speculative import SpeculativeSession
    from runtime_py.state_file import load_sequence, save_sequence

    with_head = request.draft_tokens is not None or (request.save_state is not None and model.draftable)
    after = load_sequence(request.load_state, model) if request.load_state is not None else None
    if request.draft_tokens is not None:
        model.mtp  # noqa: B018  (an export without a head is refused here)

    def decode(model: OnnxModel, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
               stops: Iterable[int], on_token: Callable[[int], None] | None,
               visual: MultimodalPrompt | None = None) -> list[int]:  # visual: None, refused above
        prefix = prefill(model, prompt_ids, after, with_head)
        if request.save_state is not None:
            save_sequence(request.save_state, model, prefix)
        session = (SpeculativeSession(model, request.draft_tokens, sampling) if request.draft_tokens
                   else PlainSession(model, sampling))
        return run_session(session, prefix, max_new_tokens, stops, on_token)[0]

    return decode
