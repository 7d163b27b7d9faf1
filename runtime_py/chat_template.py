"""Chat prompts rendered exactly as transformers 5.24's `apply_chat_template(..., tokenize=False)` renders them.

What the template sees is prepared as transformers prepares it (_normalize_chat_messages,
_plain_template_data, _alias_reasoning_fields, render_jinja_template): messages, tools, documents,
add_generation_prompt, the tokenizer's special tokens and any extra keyword (enable_thinking, ...).
The rendering itself, bounded, is runtime_py/template_sandbox.py. Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from graphs.errors import QwenEdgeError
from runtime_py.template_sandbox import render_bounded

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _message_objects_to_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _message_objects_to_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_message_objects_to_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_message_objects_to_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _message_objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _message_objects_to_dicts(value.model_dump())
    return value


def _plain_template_data(value: Any) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(key): _plain_template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(item) for item in value)
    if any(c.__name__ == "generic" and c.__module__ == "numpy" for c in type(value).__mro__):
        return _plain_template_data(value.item())  # a numpy scalar (np.generic), without importing numpy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list) -> list:
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def select_chat_template(chat_template: Any, tools: Any = None) -> str:
    """The template transformers' `get_chat_template` picks: a string as is; from named templates (a
    dict, or tokenizer_config's list of {name, template}) "tool_use" when tools are given, else "default"."""
    if isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, (list, tuple)):
        try:
            chat_template = {t["name"]: t["template"] for t in chat_template}
        except (TypeError, KeyError):
            raise QwenEdgeError("chat_template: a list of templates must hold {name, template} objects") from None
    if isinstance(chat_template, dict):
        if tools is not None and "tool_use" in chat_template:
            return chat_template["tool_use"]
        if "default" in chat_template:
            return chat_template["default"]
        raise QwenEdgeError(f"the model has several chat templates ({', '.join(sorted(chat_template))}) "
                            "and none is named 'default'")
    raise QwenEdgeError("this model has no chat template; run without --chat to use a plain prompt")


def render_chat(template: Any, messages: list[dict], *, tools: list[dict] | None = None,
                documents: list[dict] | None = None, add_generation_prompt: bool = True,
                enable_thinking: bool | None = None, special_tokens: dict[str, str] | None = None,
                **extra: Any) -> str:
    """The prompt `tokenizer.apply_chat_template(messages, tokenize=False, ...)` of transformers 5.24 gives.

    `template`: the template text (or the model's named templates, see `select_chat_template`).
    `add_generation_prompt` defaults to True here (False in transformers): a runtime renders to generate.
    `tools`: JSON schemas, passed to the template as they are (transformers also converts Python
    functions; here they must already be schemas). `enable_thinking` is passed only when it is not None,
    as transformers passes only the keyword arguments it is given. `special_tokens`: the tokenizer's
    special tokens (see `special_tokens_from_config`); `extra` keyword arguments override them, like
    transformers' `**kwargs`. Every failure, including a hostile template, raises QwenEdgeError.
    """
    source = select_chat_template(template, tools)
    chat = _message_objects_to_dicts(getattr(messages, "messages", messages))
    if not isinstance(chat, (list, tuple)):
        raise QwenEdgeError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not chat:
        raise QwenEdgeError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    if isinstance(chat[0], (list, tuple)):
        raise QwenEdgeError("messages must be one conversation (a list of messages), not a batch of them")
    normalized = []
    for i, message in enumerate(chat):
        if not isinstance(message, dict):
            raise QwenEdgeError(f"messages[{i}] must be an object with a role and content, got {message!r}")
        normalized.append({key: value for key, value in message.items() if value is not None})

    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            raise QwenEdgeError("tools must be a list of JSON schemas")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise QwenEdgeError(f"tools[{i}] must be a JSON schema object (functions are not converted here)")
        tools = list(tools)
    if documents is not None:
        if not isinstance(documents, (list, tuple)):
            raise QwenEdgeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        for document in documents:
            if not isinstance(document, dict):
                raise QwenEdgeError("Documents should be a list of dicts with 'title' and 'text' keys!")

    kwargs: dict[str, Any] = dict(special_tokens or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    kwargs.update(extra)
    reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(extra)
    if reserved:
        raise QwenEdgeError(f"{', '.join(sorted(reserved))} cannot be passed as an extra template variable")
    kwargs.pop("messages", None)
    kwargs.pop("tools", None)
    kwargs.pop("documents", None)
    kwargs.pop("add_generation_prompt", None)

    try:
        context = {
            "messages": _alias_reasoning_fields(_plain_template_data(normalized)),
            "tools": _plain_template_data(tools),
            "documents": _plain_template_data(documents),
            "add_generation_prompt": add_generation_prompt,
            **_plain_template_data(kwargs),
        }
    except RecursionError:
        raise QwenEdgeError("the messages, tools or template variables are nested too deeply") from None
    return render_bounded(source, context)


# ----------------------------------------------------------------------------------------------------
# Special tokens (transformers: the tokenizer's `special_tokens_map`, which apply_chat_template passes).

_STANDARD_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Defaults of tokenizer classes whose __init__ sets some (transformers/models/*/tokenization_*.py)
_CLASS_DEFAULTS = {
    name: {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    for name in ("Qwen2Tokenizer", "Qwen2TokenizerFast", "Qwen3_5Tokenizer")
}


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("__type") == "AddedToken" and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens_from_config(config: dict) -> dict[str, str]:
    """The variables transformers adds to every render from tokenizer_config.json: the named special
    tokens (bos, eos, unk, sep, pad, cls, mask) that are set, and the model-specific ones (other
    `*_token` keys, and a named `extra_special_tokens` / `model_specific_special_tokens`)."""
    out: dict[str, str] = {}
    defaults = _CLASS_DEFAULTS.get(str(config.get("tokenizer_class")), {})
    for key in _STANDARD_TOKENS:
        text = _token_text(config[key]) if key in config else defaults.get(key)
        if text is not None:
            out[key] = text
    specific: dict[str, str] = {}
    for key, value in config.items():
        if key.endswith("_token") and key not in _STANDARD_TOKENS and _token_text(value) is not None:
            specific[key] = _token_text(value)
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    for named in (extra, config.get("model_specific_special_tokens")):
        if isinstance(named, dict):
            specific.update({k: _token_text(v) for k, v in named.items() if _token_text(v) is not None})
    for key, value in specific.items():
        out.setdefault(key, value)
    return out
