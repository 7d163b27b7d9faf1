"""A conversation in and out: message files checked before rendering, and Qwen3.5 replies parsed back.

Parsing follows the Qwen3.5 template's own format (`<think>…</think>`, then
`<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`) the way
vLLM's `qwen3` reasoning parser and `qwen3_coder` tool parser read it. Torch-free.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from graphs.errors import QwenEdgeError

_PART_TYPES = ("text", "image", "image_url", "video")


def load_messages(obj: Any) -> list[dict]:
    """Check a conversation read from JSON, and return a copy ready for `render_chat`.

    `obj`: the parsed JSON, a JSON string, or a path (`os.PathLike`) of a JSON file (whose image and
    video parts then name files inside its folder, resolved against it). It must be a
    non-empty list of {"role": str, "content": ...} objects; content is a string, a list of parts
    ({"type": "text", "text": str}, {"type": "image", ...}, {"type": "video", ...}, or OpenAI's
    {"type": "image_url", ...}), or null in an assistant turn that carries tool_calls. Optional:
    reasoning_content (str), tool_calls (a list of {"function": {"name", "arguments"}} or
    {"name", "arguments"}; arguments given as a JSON string are parsed into an object, which is what
    the Qwen3.5 template needs), and any other key, which goes to the template as it is.
    """
    where, folder = "messages", None
    if isinstance(obj, os.PathLike):
        where, folder = str(obj), Path(obj).parent
        try:
            text = Path(obj).read_text(encoding="utf-8")
        except OSError as e:
            raise QwenEdgeError(f"{where}: cannot read the message file ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise QwenEdgeError(f"{where}: not UTF-8 text; give a JSON list of chat messages") from None
        obj = _parse_json(text, where)
    elif isinstance(obj, str):
        obj = _parse_json(obj, where)
    if not isinstance(obj, list):
        raise QwenEdgeError(f"{where}: expected a JSON list of {{role, content}} messages, got {_json_type(obj)}")
    if not obj:
        raise QwenEdgeError(f"{where}: the conversation is empty; give at least one message")
    out = []
    for i, message in enumerate(obj):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise QwenEdgeError(f"{at}: expected a {{role, content}} object, got {_json_type(message)}")
        message = copy.deepcopy(message)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise QwenEdgeError(f"{at}: 'role' must be a non-empty string (system, user, assistant or tool)")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            message["tool_calls"] = _check_tool_calls(tool_calls, f"{at}.tool_calls")
        if "content" not in message:
            if not (role == "assistant" and tool_calls):
                raise QwenEdgeError(f"{at}: 'content' is missing")
        else:
            _check_content(message["content"], f"{at}.content", allow_null=role == "assistant" and bool(tool_calls))
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise QwenEdgeError(f"{at}.reasoning_content: expected a string, got {_json_type(reasoning)}")
        out.append(message)
    if folder is not None:  # a file's image and video names are read inside its folder
        from runtime_py.vision import anchor_visual_sources

        anchor_visual_sources(out, folder, where)
    return out


def load_tools(path: Path) -> list[dict]:
    """A JSON file of tool definitions: a list of JSON-schema objects, each naming its function
    ({"type": "function", "function": {"name": ...}} or {"name": ...}), passed to the template as they are."""
    where = str(path)
    try:
        tools = _parse_json(Path(path).read_text(encoding="utf-8"), where)
    except OSError as e:
        raise QwenEdgeError(f"{where}: cannot read the tools file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise QwenEdgeError(f"{where}: not UTF-8 text; give a JSON list of tool definitions") from None
    if not isinstance(tools, list):
        raise QwenEdgeError(f"{where}: expected a JSON list of tool definitions, got {_json_type(tools)}")
    for i, tool in enumerate(tools):
        body = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise QwenEdgeError(f"{where}[{i}]: a tool definition is an object naming its function "
                                '({"type": "function", "function": {"name": ..., "parameters": {...}}})')
    return tools


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise QwenEdgeError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _check_content(content: Any, at: str, allow_null: bool) -> None:
    if isinstance(content, str):
        return
    if content is None:
        if allow_null:
            return
        raise QwenEdgeError(f"{at}: content is null; give a string or a list of parts")
    if not isinstance(content, list):
        raise QwenEdgeError(f"{at}: expected a string or a list of parts, got {_json_type(content)}")
    for j, part in enumerate(content):
        here = f"{at}[{j}]"
        if not isinstance(part, dict):
            raise QwenEdgeError(f"{here}: expected a part object such as {{\"type\": \"text\", \"text\": ...}}, "
                                f"got {_json_type(part)}")
        kind = part.get("type")
        if kind not in _PART_TYPES:
            got = f"type {kind!r}" if "type" in part else "no 'type'"
            raise QwenEdgeError(f"{here}: part has {got}; expected one of {', '.join(_PART_TYPES)}")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise QwenEdgeError(f"{here}: a text part needs a string 'text'")


def _check_tool_calls(tool_calls: Any, at: str) -> list:
    if not isinstance(tool_calls, list):
        raise QwenEdgeError(f"{at}: expected a list of tool calls, got {_json_type(tool_calls)}")
    out = []
    for j, call in enumerate(tool_calls):
        here = f"{at}[{j}]"
        if not isinstance(call, dict):
            raise QwenEdgeError(f"{here}: expected a tool call object, got {_json_type(call)}")
        call = dict(call)
        body = call.get("function", call)
        if not isinstance(body, dict):
            raise QwenEdgeError(f"{here}.function: expected an object with name and arguments")
        body = dict(body)
        if not isinstance(body.get("name"), str) or not body["name"]:
            raise QwenEdgeError(f"{here}: the tool call needs a non-empty string 'name'")
        arguments = body.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise QwenEdgeError(f"{here}: arguments is a string that is not valid JSON ({e.msg})") from None
        if not isinstance(arguments, dict):
            raise QwenEdgeError(f"{here}: arguments must be an object of parameter values, "
                                f"got {_json_type(arguments)}")
        body["arguments"] = arguments
        if "function" in call:
            call["function"] = body
        else:
            call = body
        out.append(call)
    return out


# ----------------------------------------------------------------------------------------------------
# Parsing a generated reply (vLLM: reasoning parser "qwen3", tool parser "qwen3_coder").

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_TOOL_OPEN = "<tool_call>"
_FUNCTION_OPEN = "<function="
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_RE_FUNCTION_START = re.compile(r"<function[\s=]")
_RE_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*?)$", re.DOTALL)
_RE_FUNCTION = re.compile(r"<function=(.*?)</function>|<function=(.*)$", re.DOTALL)
_RE_PARAMETER = re.compile(r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.DOTALL)


def parse_assistant(text: str, *, thinking: bool = True, tools: list[dict] | None = None) -> dict:
    """Split a generated Qwen3.5 reply into {"reasoning", "content", "tool_calls"}.

    `text`: what the model generated after the prompt (the prompt's `<think>\\n` is not part of it). An
    end token (<|im_end|>, <|endoftext|>) at the end is dropped. Reasoning is the text before `</think>`;
    without `</think>` it is the text before a `<tool_call>` that opens a `<function=`, or, when the
    reply was cut short, everything. With `thinking=False` (the prompt closed the think block) a reply
    without `</think>` is all content and reasoning is None. Content is the text after the reasoning,
    up to the first tool call. Reasoning and content are trimmed like the template trims them when the
    turn is rendered back. Tool-call values are strings, except "null" (None) and, when `tools` (the
    JSON schemas given to the template) declares the parameter's type, values converted to it.
    """
    text = text.rstrip()
    while text.endswith(_END_TOKENS):
        for token in _END_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()

    before, opened, after = text.partition(_THINK_OPEN)
    body = after if opened else before
    reasoning: str | None
    if _THINK_CLOSE in body:
        reasoning, _, content = body.partition(_THINK_CLOSE)
    elif not thinking:
        reasoning, content = None, body
    else:
        reasoning, content = body, ""
        index = body.find(_TOOL_OPEN)
        if index != -1 and _RE_FUNCTION_START.match(body[index + len(_TOOL_OPEN):].lstrip()):
            reasoning, content = body[:index], body[index:]

    tool_calls: list[dict] = []
    if _FUNCTION_OPEN in content:
        calls = _parse_tool_calls(content, tools)
        if calls is not None:
            tool_calls = calls
            start = content.find(_TOOL_OPEN)
            content = content[: start if start >= 0 else content.find(_FUNCTION_OPEN)]
    return {"reasoning": reasoning.strip() if reasoning is not None else None,
            "content": content.strip(), "tool_calls": tool_calls}


def _parse_tool_calls(text: str, tools: list[dict] | None) -> list[dict] | None:
    blocks = [m[0] or m[1] for m in _RE_TOOL_CALL.findall(text)] or [text]
    functions = [m[0] or m[1] for block in blocks for m in _RE_FUNCTION.findall(block)]
    if not functions:
        return None
    calls = []
    for function in functions:
        end = function.find(">")
        if end < 0:
            return None  # vLLM gives up on the whole reply when one call is malformed
        name = function[:end].strip()
        schema = _parameter_schemas(name, tools)
        arguments: dict[str, Any] = {}
        for match in _RE_PARAMETER.findall(function[end + 1:]):
            cut = match.find(">")
            if cut < 0:
                return None
            key, value = match[:cut].strip(), match[cut + 1:]
            if value.startswith("\n"):
                value = value[1:]
            if value.endswith("\n"):
                value = value[:-1]
            arguments[key] = _convert_value(value, schema.get(key))
        calls.append({"name": name, "arguments": arguments})
    return calls


def _parameter_schemas(name: str, tools: list[dict] | None) -> dict:
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if isinstance(function, dict) and function.get("name") == name:
            parameters = function.get("parameters")
            if isinstance(parameters, dict):
                properties = parameters.get("properties", parameters)
                return properties if isinstance(properties, dict) else {}
            return {}
    return {}


def _convert_value(value: str, schema: Any) -> Any:
    if value.lower() == "null":
        return None
    if not isinstance(schema, dict):
        return value
    kind = schema.get("type", "string")
    if isinstance(kind, list):  # e.g. ["integer", "null"]
        kind = next((k for k in kind if k != "null"), "string")
    kind = str(kind).strip().lower()
    if kind in ("string", "str", "text", "varchar", "char", "enum"):
        return value
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(value)
        except ValueError:
            return value
    if kind.startswith(("num", "float")):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if number == int(number) else number
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    if kind in ("object", "array", "arr") or kind.startswith(("dict", "list")):
        try:
            return json.loads(value)
        except ValueError:
            pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return value
