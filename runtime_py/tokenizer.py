"""The checkpoint's tokenizer (`tokenizer.json`) and chat template, without transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from graphs.errors import QwenEdgeError
from graphs.file_checks import read_json
from runtime_py.chat_template import render_chat, special_tokens_from_config

# What `check_support_files` renders to prove a chat template works.
SAMPLE_CONVERSATION = [{"role": "user", "content": "What is 12 plus 7?"}]


class TextTokenizer:
    """Encode, decode, stream-decode, and render chat messages with the model's own template."""

    def __init__(self, folder: Path | str) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise QwenEdgeError(f"{folder}: tokenizer.json not found; export from a checkpoint that has one")
        read_json(path, "re-download the checkpoint's tokenizer.json")  # a clear error for a damaged file
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions for files it cannot read
            raise QwenEdgeError(f"{path}: not a tokenizer the tokenizers library can load "
                                f"({str(exc)[:160]}); re-download the checkpoint's tokenizer.json") from None
        cfg_path = folder / "tokenizer_config.json"
        config = read_json(cfg_path, "re-download the checkpoint's tokenizer_config.json") if cfg_path.exists() else {}
        if not isinstance(config, dict):
            raise QwenEdgeError(f"{cfg_path}: must hold a JSON object; re-download the checkpoint's tokenizer_config.json")
        self.config: dict[str, Any] = config
        template_file = folder / "chat_template.jinja"
        try:
            template = template_file.read_bytes().decode("utf-8") if template_file.is_file() else config.get("chat_template")
        except (OSError, UnicodeDecodeError):
            raise QwenEdgeError(f"{template_file}: not readable UTF-8 text; re-download the checkpoint's chat template") from None
        self.chat_template: Any = template

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


def check_support_files(folder: Path) -> None:
    """Refuse, at export, tokenizer files that `generate` could not use: tokenizer.json must load,
    tokenizer_config.json must be an object, a chat template must render a sample conversation into
    text the tokenizer encodes. A checkpoint without tokenizer.json is accepted (random test
    checkpoints have none), and so is one without a chat template."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        return
    tokenizer = TextTokenizer(folder)
    if tokenizer.chat_template:
        tokenizer.encode(tokenizer.apply_chat_template(SAMPLE_CONVERSATION))
