"""A conversation that keeps its sequence state across turns, so each turn prefills only its new tokens.

After a reply the state has consumed the whole conversation so far (the token that ended the reply
stays pending). The next turn renders the conversation with the chat template; when the text
already consumed is a prefix of that rendering, only the rest is tokenized and prefilled. A
template that rewrites earlier turns (some strip reasoning from past assistant messages) breaks the
prefix: that turn prefills the whole conversation again, and `full_prefills` counts it.

    chat = ChatSession(model, tokenizer, stop_ids=...)      # optionally speculative=2
    chat.send("What is 12 plus 7?")                         # -> the reply text
    chat.save("chat.safetensors"); ChatSession.restore(...) # the state through a file
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from runtime_py.generate import Sampling
from runtime_py.sequence import PlainSession, PrefixState, prefill, run_session
from runtime_py.session import OnnxModel
from runtime_py.speculative import SpeculativeSession
from runtime_py.state_file import load_sequence, save_sequence
from runtime_py.tokenizer import StreamDecoder, TextTokenizer


class ChatSession:
    """Messages in, replies out; the sequence state carries over between turns."""

    def __init__(self, model: OnnxModel, tokenizer: TextTokenizer, sampling: Sampling = Sampling(),
                 stop_ids: Iterable[int] = (), speculative: int | None = None,
                 messages: list[dict[str, str]] | None = None) -> None:
        """speculative: draft this many tokens with the export's MTP head (None: plain decoding)."""
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.stop_ids, self.speculative = list(stop_ids), speculative
        self.messages: list[dict[str, str]] = list(messages or [])
        self.prefix: PrefixState | None = None  # the state after every consumed token
        self.pending: list[int] = []  # chosen but not consumed: the token that ended the last reply
        self.prefilled_tokens = 0  # tokens run through the decoder as prompt, over all turns
        self.full_prefills = 0  # turns that could not reuse the state

    @property
    def with_head(self) -> bool:
        return self.speculative is not None or self.model.draftable

    def send(self, content: str, role: str = "user", max_new_tokens: int = 256,
             on_text: Callable[[str], None] | None = None) -> str:
        """Add a message, generate the assistant's reply, add it too, and return its text."""
        self.messages.append({"role": role, "content": content})
        self.prefix = self._prompt_prefix()
        session = (SpeculativeSession(self.model, self.speculative, self.sampling) if self.speculative
                   else PlainSession(self.model, self.sampling, self.with_head))
        stream = StreamDecoder(self.tokenizer)
        generated, stop = run_session(session, self.prefix, max_new_tokens, self.stop_ids,
                                      None if on_text is None else lambda t: on_text(stream.push(t)))
        consumed = len(self.prefix.token_ids) + len(generated) - (0 if stop is not None else 1)
        if generated or stop is None:
            self.prefix = session.prefix(consumed)
        self.pending = [stop] if stop is not None else generated[-1:]
        reply = self.tokenizer.decode(generated)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def _prompt_prefix(self) -> PrefixState:
        """The state after the conversation rendered for the assistant's next reply."""
        text = self.tokenizer.apply_chat_template(self.messages)
        if self.prefix is not None:
            done = self.tokenizer.decode(self.prefix.token_ids + self.pending, skip_special_tokens=False)
            if text.startswith(done):
                ids = self.pending + self.tokenizer.encode(text[len(done):])
                self.prefilled_tokens += len(ids)
                return prefill(self.model, ids, self.prefix, self.with_head)
        if self.prefix is not None:
            self.full_prefills += 1
        ids = self.tokenizer.encode(text)
        self.prefilled_tokens += len(ids)
        return prefill(self.model, ids, None, self.with_head)

    def save(self, path: Path | str) -> Path:
        """Write the conversation's state to a file (the messages are the caller's to keep)."""
        if self.prefix is None:
            raise ValueError("nothing to save yet: send a message first")
        saved = self.prefix if not self.pending else prefill(self.model, self.pending, self.prefix, self.with_head)
        return save_sequence(path, self.model, saved)

    def resume(self, path: Path | str, messages: list[dict[str, str]]) -> None:
        """Continue from a state file of `messages` (written by `save` after them)."""
        self.messages, self.prefix, self.pending = list(messages), load_sequence(path, self.model), []
