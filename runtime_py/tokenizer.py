"""The checkpoint's tokenizer (`tokenizer.json`) and chat template, without transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from graphs.errors import QwenEdgeError
from runtime_py.chat_template import render_chat, special_tokens_from_config


class TextTokenizer:
    """Encode, decode, stream-decode, and render chat messages with the model's own template."""

    def __init__(self, folder: Path | str) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise QwenEdgeError(f"{folder}: tokenizer.json not found; export from a checkpoint that has one")
        self.tokenizer = Tokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template_file = folder / "chat_template.jinja"
        self.chat_template: str | None = (
            template_file.read_text() if template_file.is_file() else self.config.get("chat_template")
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            enable_thinking: bool | None = None, **extra: Any) -> str:
        """The prompt transformers' `apply_chat_template(messages, tokenize=False, ...)` renders
        (runtime_py/chat_template.py); `enable_thinking=None` leaves the template's default."""
        if not self.chat_template:
            raise QwenEdgeError("this model has no chat template; run without --chat to use a plain prompt")
        return render_chat(self.chat_template, messages, tools=tools, documents=documents,
                           add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                           special_tokens=special_tokens_from_config(self.config), **extra)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece
