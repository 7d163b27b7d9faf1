"""runtime_py.chat_template (bounded by runtime_py.template_sandbox) against transformers 5.24's apply_chat_template, on the published Qwen3.5 template and
on templates written here; its bounds against hostile templates; parsing replies; message files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest

from graphs.errors import QwenEdgeError
from runtime_py import template_sandbox as sandbox
from runtime_py.chat import load_messages, parse_assistant
from runtime_py.chat_template import render_chat, select_chat_template, special_tokens_from_config

DATA = Path(__file__).parent / "data"
CHECKPOINT = Path(__file__).resolve().parents[1] / "default_model" / "checkpoint"
QWEN = (DATA / "qwen3_5_chat_template.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(CHECKPOINT))


@pytest.fixture(scope="module")
def special():
    return special_tokens_from_config(json.loads((CHECKPOINT / "tokenizer_config.json").read_text()))


def hf_render(tok, template, messages, **kwargs):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def assert_same(tok, special, template, messages, **kwargs):
    kwargs.setdefault("add_generation_prompt", True)
    theirs = hf_render(tok, template, messages, **kwargs)
    ours = render_chat(template, messages, special_tokens=special, **kwargs)
    assert ours == theirs
    return ours


TOOLS = [
    {"type": "function", "function": {
        "name": "search",
        "description": "Find <b>bold</b> & 'quoted' \"text\" — naïve café > 3",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "a < b && c > d"},
            "limit": {"type": "integer"},
            "exact": {"type": "boolean"},
            "filters": {"type": "object"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "score": {"type": "number"},
        }, "required": ["query"]}}},
    {"type": "function", "function": {"name": "clock", "description": "the time", "parameters": {"type": "object", "properties": {}}}},
]

CONVERSATION = [
    {"role": "system", "content": "You are terse. Use <tags> & \"quotes\"."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer.", "reasoning_content": "dropped: before the last query"},
    {"role": "user", "content": "Search for <html> & friends."},
    {"role": "assistant", "content": "Let me look.", "reasoning_content": "\nThe user wants a search.\n",
     "tool_calls": [
         {"type": "function", "function": {"name": "search", "arguments": {
             "query": "<html> & \"friends\"", "limit": 5, "exact": True, "filters": {"lang": "fr", "<k>": "é&"},
             "tags": ["a<b", "c"], "score": None}}},
         {"type": "function", "function": {"name": "clock", "arguments": {}}},
     ]},
    {"role": "tool", "content": "result <1> & more"},
    {"role": "tool", "content": "12:00"},
    {"role": "assistant", "content": "<think>\nsplit from content\n</think>\n\nFound it.", "tool_calls": None},
]


# ---------------------------------------------------------------------------------------------------
# The published Qwen3.5 template


def test_fixture_is_the_published_template():
    assert hashlib.sha256(QWEN.encode()).hexdigest() == "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_plain(hf, special, add_generation_prompt):
    out = assert_same(hf, special, QWEN, [{"role": "user", "content": "What is 2 plus 2?"}],
                      add_generation_prompt=add_generation_prompt)
    assert out.startswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n")
    assert out.endswith("<|im_start|>assistant\n<think>\n") == add_generation_prompt


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_thinking_switch(hf, special, enable_thinking):
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    out = assert_same(hf, special, QWEN, [{"role": "user", "content": "Hi"}], **kwargs)
    tail = "<think>\n\n</think>\n\n" if enable_thinking is False else "<think>\n"
    assert out.endswith("<|im_start|>assistant\n" + tail)


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_system_multi_turn_reasoning_tools(hf, special, enable_thinking):
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    out = assert_same(hf, special, QWEN, CONVERSATION, tools=TOOLS, **kwargs)
    assert "<think>\nThe user wants a search.\n</think>\n\nLet me look.\n\n<tool_call>\n<function=search>\n" in out
    assert "dropped: before the last query" not in out
    assert "<think>\nsplit from content\n</think>\n\nFound it.<|im_end|>" in out
    assert "<parameter=filters>\n{\"lang\": \"fr\", \"<k>\": \"é&\"}\n</parameter>" in out
    assert "<parameter=score>\nNone\n</parameter>" in out  # a None argument value renders through |string
    assert "<tool_response>\nresult <1> & more\n</tool_response>\n<tool_response>\n12:00\n</tool_response>" in out


def test_tool_schemas_are_not_html_escaped(hf, special):
    out = assert_same(hf, special, QWEN, [{"role": "user", "content": "go"}], tools=TOOLS)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in out
    for escaped in ("\\u003c", "\\u003e", "\\u0026", "\\u0027", "&lt;", "&amp;", "&#39;", "&#34;"):
        assert escaped not in out


def test_a_bare_sandbox_renders_the_defect():
    # What runtime_py/tokenizer.py did (issue 17): jinja's own tojson escapes the tool schemas
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    bare = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(QWEN)
    out = bare.render(messages=[{"role": "user", "content": "go"}], tools=TOOLS, add_generation_prompt=True)
    assert "\\u003cb\\u003e" in out and out != render_chat(QWEN, [{"role": "user", "content": "go"}], tools=TOOLS)
    with pytest.raises(jinja2.UndefinedError, match="raise_exception"):
        bare.render(messages=RAISING["Unexpected message role."])


def test_no_tools_and_empty_tools(hf, special):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert assert_same(hf, special, QWEN, messages) == assert_same(hf, special, QWEN, messages, tools=[])


def test_image_and_video_parts(hf, special):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Look closely."}]},
        {"role": "user", "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "video", "path": "c.mp4"}, {"type": "text", "text": "what?"}]},
    ]
    out = assert_same(hf, special, QWEN, messages)
    assert out.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    numbered = assert_same(hf, special, QWEN, messages, add_vision_id=True)
    assert "Picture 2: " in numbered and "Video 1: " in numbered


def test_reasoning_field_aliases(hf, special):
    for field in ("thinking", "reasoning"):
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", field: "because"}]
        out = assert_same(hf, special, QWEN, messages, add_generation_prompt=False)
        assert "<think>\nbecause\n</think>\n\na<|im_end|>" in out


def hf_error(tok, template, messages, **kwargs):
    with pytest.raises(Exception) as caught:
        hf_render(tok, template, messages, **kwargs)
    return caught.value


RAISING = {
    "System message cannot contain images.": [{"role": "system", "content": [{"type": "image"}]},
                                              {"role": "user", "content": "q"}],
    "System message cannot contain videos.": [{"role": "system", "content": [{"type": "video"}]},
                                              {"role": "user", "content": "q"}],
    "Unexpected item type in content.": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}],
    "Unexpected content type.": [{"role": "user", "content": 42}],
    "No user query found in messages.": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    "System message must be at the beginning.": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}],
    "Unexpected message role.": [{"role": "user", "content": "q"}, {"role": "developer", "content": "d"}],
}


@pytest.mark.parametrize("message", list(RAISING))
def test_every_raise_exception_branch(hf, special, message):
    theirs = hf_error(hf, QWEN, RAISING[message], add_generation_prompt=True)
    assert isinstance(theirs, jinja2.TemplateError) and str(theirs) == message
    with pytest.raises(QwenEdgeError) as ours:
        render_chat(QWEN, RAISING[message], special_tokens=special)
    assert str(ours.value) == f"chat template error: {message}"


def test_no_messages_is_refused_before_the_template(hf, special):
    # The template's own 'No messages provided.' is unreachable: transformers refuses first, and so do we.
    theirs = hf_error(hf, QWEN, [])
    with pytest.raises(QwenEdgeError) as ours:
        render_chat(QWEN, [], special_tokens=special)
    assert str(ours.value) == str(theirs)
    assert "No messages provided." in QWEN


def test_string_arguments_fail_like_transformers_and_load_messages_parses_them(hf, special):
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    theirs = hf_error(hf, QWEN, messages)
    with pytest.raises(QwenEdgeError) as ours:
        render_chat(QWEN, messages, special_tokens=special)
    assert str(theirs) in str(ours.value)
    loaded = load_messages(messages)
    assert loaded[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert_same(hf, special, QWEN, loaded)


# ---------------------------------------------------------------------------------------------------
# Templates written here: environment, globals, filters, variables


FEATURES = r"""
{%- macro show(x, prefix='>', suffix='') -%}{{ prefix }}{{ x }}{{ suffix }}{%- endmacro -%}
{%- set ns = namespace(n=0, seen=[]) -%}
{%- for m in messages|reverse -%}
  {%- if m.role == 'skip' %}{% continue %}{% endif -%}
  {%- if loop.index > 5 %}{% break %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  [{{ loop.index0 }}|{{ loop.previtem.role if loop.previtem else '-' }}|{{ loop.nextitem.role if loop.nextitem else '-' }}]
  {{- show(m.content|string|upper, suffix='!') }} {{ m.content is defined }} {{ m.content is none }}
{% endfor -%}
n={{ ns.n }}
{% for k, v in dict(b=2, a=1)|items %}{{ k }}={{ v }};{% endfor %} {{ dict.fromkeys(['x', 'y'], 0)|tojson }}
{{ 'a,b,c'.split(',')|join('+') }} {{ '  pad  '.strip() }} {{ 'Hello'.startswith('He') }} {{ 'x\n'.rstrip('\n') }}
bos={{ bos_token is defined }} eos={{ eos_token }} pad={{ pad_token }} unk={{ unk_token is defined }}
tools={{ tools is none }} documents={{ documents is none }} agp={{ add_generation_prompt }}
thinking={{ enable_thinking is defined }} custom={{ custom | default('none') }}
{% generation %}generated {{ messages|length }}{% endgeneration %}
year={{ strftime_now('%Y') }}
{%- if documents %}{% for d in documents %} doc:{{ d.title }}={{ d.text }}{% endfor %}{% endif %}
"""


def test_environment_features(hf, special):
    messages = [{"role": "user", "content": "one"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {}}]},
                {"role": "user", "content": ("a", "b")}]
    out = assert_same(hf, special, FEATURES, messages)
    assert "eos=<|im_end|> pad=<|endoftext|> unk=False" in out
    assert "False False" in out  # content=None is dropped: undefined, not none
    out = assert_same(hf, special, FEATURES, messages, enable_thinking=False, custom="<v&>",
                      documents=[{"title": "T", "text": "<b>"}], tools=TOOLS, add_generation_prompt=False)
    assert "custom=<v&>" in out and "doc:T=<b>" in out


TOJSON = r"""
{{ x|tojson }}
{{ x|tojson(indent=2) }}
{{ x|tojson(separators=(',', ':')) }}
{{ x|tojson(sort_keys=true) }}
{{ x|tojson(ensure_ascii=true) }}
{{ (x|tojson) + ' <&> ' + 'y' }}
{{ (x|tojson|safe) + ' <&> ' }}
{{ messages[0].content|tojson }}
"""


def test_tojson_semantics(hf, special):
    x = {"z": "<script>alert('&')</script>", "a": [1, 2.5, None, True], "é": "naïve \"q\""}
    out = assert_same(hf, special, TOJSON, [{"role": "user", "content": "<&>"}], x=x)
    assert json.dumps(x, ensure_ascii=False) + " <&> y" in out
    assert " &lt;&amp;&gt; " in out  # Markup + str escapes, in transformers too


@pytest.mark.parametrize("template", [
    "{{ messages[0].missing.deeper }}",
    "{% set ns = namespace(_private=1) %}",
    "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}",
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.append(1) }}",
    "{{ raise_exception('custom <failure> & stop') }}",
    "{{ 1 / 0 }}",
    "{% for x in 5 %}{% endfor %}",
])
def test_template_errors_carry_the_template_message(hf, special, template):
    theirs = hf_error(hf, template, [{"role": "user", "content": "q"}])
    with pytest.raises(QwenEdgeError) as ours:
        render_chat(template, [{"role": "user", "content": "q"}], special_tokens=special)
    assert str(theirs) in str(ours.value)
    assert str(ours.value).startswith("chat template")


def test_syntax_error(hf, special):
    theirs = hf_error(hf, "{% if %}", [{"role": "user", "content": "q"}])
    with pytest.raises(QwenEdgeError, match="syntax error on line 1") as ours:
        render_chat("{% if %}", [{"role": "user", "content": "q"}])
    assert theirs.message in str(ours.value)


def test_named_templates(hf):
    named = {"default": "D{{ messages|length }}", "tool_use": "T{{ tools|length }}"}
    hf.chat_template, saved = named, hf.chat_template
    try:
        for tools in (None, TOOLS):
            assert select_chat_template(named, tools) == hf.get_chat_template(None, tools)
        assert select_chat_template([{"name": k, "template": v} for k, v in named.items()], TOOLS) == named["tool_use"]
    finally:
        hf.chat_template = saved
    with pytest.raises(QwenEdgeError, match="none is named 'default'"):
        select_chat_template({"a": "x"})
    with pytest.raises(QwenEdgeError, match="no chat template"):
        select_chat_template(None)


@pytest.mark.parametrize("config", [
    {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
     "bos_token": None, "unk_token": None},
    {"tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>", "image_token": "<|image_pad|>",
     "vision_bos_token": {"__type": "AddedToken", "content": "<|vision_start|>", "special": True},
     "extra_special_tokens": {"audio_token": "<|audio_pad|>"}, "add_bos_token": False, "foo_token": 3},
    {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "bos_token": None},
])
def test_special_tokens_match_the_tokenizer(tmp_path, config):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_bytes((CHECKPOINT / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert special_tokens_from_config(config) == tok.special_tokens_map


# ---------------------------------------------------------------------------------------------------
# Bounded work


@pytest.fixture
def tight(monkeypatch):
    monkeypatch.setattr(sandbox, "TIME_LIMIT_S", 0.5)


def stopped(template, **kwargs):
    start = time.monotonic()
    with pytest.raises(QwenEdgeError) as caught:
        render_chat(template, [{"role": "user", "content": "q"}], **kwargs)
    return str(caught.value), time.monotonic() - start


NESTED = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize("use_worker", [True, False])
def test_nested_loops_stop_at_the_time_limit(tight, monkeypatch, use_worker):
    monkeypatch.setattr(sandbox, "USE_WORKER", use_worker)
    message, elapsed = stopped(NESTED)
    assert "took longer than" in message and elapsed < 3


def test_operation_budget(monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_OPERATIONS", 10_000)
    message, _ = stopped("{% for a in range(100) %}{% for b in range(200) %}.{% endfor %}{% endfor %}")
    assert "more than 10,000 template operations" in message
    assert render_chat("{% for a in range(50) %}.{% endfor %}", [{"role": "user", "content": "q"}]) == "." * 50


@pytest.mark.parametrize("template, expected", [
    ("{{ 9 ** (9 ** 9) }}", "bits"),
    ("{{ 'x' * 10 ** 10 }}", "repetition"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    ("{% for a in range(10000) %}{{ 'y' * 1000 }}{% endfor %}", "longer than"),
])
def test_amplification_is_refused(tight, template, expected):
    message, elapsed = stopped(template)
    assert expected in message and elapsed < 3


def test_work_outside_the_sandbox_hooks_is_killed(tight):
    # textwrap runs in pure Python outside every template hook: only the worker's deadline stops it
    message, elapsed = stopped("{{ ('a ' * 4000000)|wordwrap(3)|wordwrap(3) }}")
    assert "took longer than 0.5 s and was stopped" in message and elapsed < 3
    assert render_chat(QWEN, [{"role": "user", "content": "again"}]).endswith("<think>\n")  # a fresh worker


def test_without_a_worker_rendering_stays_in_process(monkeypatch, special, hf):
    monkeypatch.setattr(sandbox, "_WORKER", sandbox._Worker())
    monkeypatch.setattr(sys, "executable", str(Path("/nonexistent/python")))
    assert_same(hf, special, QWEN, CONVERSATION, tools=TOOLS)
    assert sandbox._WORKER.proc is None and sandbox._WORKER.unavailable


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux")
def test_memory_bomb_hits_the_memory_limit(tight):
    message, _ = stopped("{{ 'x'|center(3000000000) }}")
    assert "memory limit" in message


# ---------------------------------------------------------------------------------------------------
# Parsing replies


def generated_part(messages, reply, **kwargs):
    """What the model generated for `reply`: the rendered turn minus the prompt that asked for it."""
    prompt = render_chat(QWEN, messages, tools=TOOLS, **kwargs)
    full = render_chat(QWEN, messages + [reply], tools=TOOLS, add_generation_prompt=False, **kwargs)
    assert full.startswith(prompt)
    return full[len(prompt):]


def test_parse_round_trips_the_rendered_turn():
    reply = {"role": "assistant", "reasoning_content": "Need two tools.\nFirst search.",
             "content": "Searching now.", "tool_calls": [
                 {"function": {"name": "search", "arguments": {"query": "<a> & b", "limit": "5"}}},
                 {"function": {"name": "clock", "arguments": {}}}]}
    text = generated_part([{"role": "user", "content": "go"}], reply)
    assert text.endswith("<|im_end|>\n")
    assert parse_assistant(text) == {
        "reasoning": "Need two tools.\nFirst search.", "content": "Searching now.",
        "tool_calls": [{"name": "search", "arguments": {"query": "<a> & b", "limit": "5"}},
                       {"name": "clock", "arguments": {}}]}


def test_parse_thinking_off():
    text = generated_part([{"role": "user", "content": "go"}], {"role": "assistant", "content": "Just this."},
                          enable_thinking=False)
    assert text == "Just this.<|im_end|>\n"
    assert parse_assistant(text, thinking=False) == {"reasoning": None, "content": "Just this.", "tool_calls": []}


def test_parse_with_schema_types():
    text = ("I should search.\n</think>\n\n<tool_call>\n<function=search>\n<parameter=query>\nmulti\nline\n</parameter>\n"
            "<parameter=limit>\n7\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n<parameter=filters>\n"
            '{"lang": "fr"}\n</parameter>\n<parameter=tags>\n["x", "y"]\n</parameter>\n<parameter=score>\n2.5\n'
            "</parameter>\n<parameter=extra>\nnull\n</parameter>\n</function>\n</tool_call>")
    untyped = parse_assistant(text)
    assert untyped["reasoning"] == "I should search." and untyped["content"] == ""
    assert untyped["tool_calls"][0]["arguments"]["limit"] == "7"
    assert untyped["tool_calls"][0]["arguments"]["extra"] is None
    typed = parse_assistant(text, tools=TOOLS)["tool_calls"][0]["arguments"]
    assert typed == {"query": "multi\nline", "limit": 7, "exact": True, "filters": {"lang": "fr"},
                     "tags": ["x", "y"], "score": 2.5, "extra": None}


@pytest.mark.parametrize("text, expected", [
    # cut short while thinking: all reasoning
    ("Still thinking about <tool_call> tags", {"reasoning": "Still thinking about <tool_call> tags", "content": "",
                                               "tool_calls": []}),
    # a tool call that opens a function ends the reasoning even without </think>
    ("Plan.\n<tool_call>\n<function=clock>\n</function>\n</tool_call>",
     {"reasoning": "Plan.", "content": "", "tool_calls": [{"name": "clock", "arguments": {}}]}),
    # an older template's <think> in the output is stripped; an end token is dropped
    ("<think>\nr\n</think>\n\nanswer<|im_end|>", {"reasoning": "r", "content": "answer", "tool_calls": []}),
    # unterminated last call and parameter (vLLM tolerates both)
    ("r</think>ok<tool_call>\n<function=search>\n<parameter=query>\nq",
     {"reasoning": "r", "content": "ok", "tool_calls": [{"name": "search", "arguments": {"query": "q"}}]}),
    # a malformed call leaves the reply as content
    ("r</think>see <function=broken", {"reasoning": "r", "content": "see <function=broken", "tool_calls": []}),
])
def test_parse_edges(text, expected):
    assert parse_assistant(text) == expected


# ---------------------------------------------------------------------------------------------------
# Message files


def test_load_messages_accepts_the_formats(tmp_path, hf, special):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "url": "x.png"}]},
        {"role": "assistant", "content": None, "reasoning_content": "r",
         "tool_calls": [{"id": "1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
        {"role": "tool", "content": "12:00", "tool_call_id": "1"},
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(messages))
    loaded = load_messages(path)
    assert loaded[1]["content"][1]["url"] == str(tmp_path / "x.png")  # a file's image names are in its folder
    loaded[1]["content"][1]["url"] = "x.png"
    assert loaded == load_messages(json.dumps(messages)) == load_messages(messages)
    assert loaded[2]["tool_calls"][0]["function"]["arguments"] == {}
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == "{}"  # the input is not changed
    assert_same(hf, special, QWEN, loaded + [{"role": "user", "content": "and now?"}])


@pytest.mark.parametrize("obj, problem", [
    ({"role": "user", "content": "x"}, "expected a JSON list"),
    ([], "conversation is empty"),
    (["hi"], r"messages\[0\]: expected a \{role, content\} object, got a string"),
    ([{"content": "x"}], r"messages\[0\]: 'role' must be a non-empty string"),
    ([{"role": "user"}], r"messages\[0\]: 'content' is missing"),
    ([{"role": "user", "content": None}], "content is null"),
    ([{"role": "user", "content": 3}], "expected a string or a list of parts, got a number"),
    ([{"role": "user", "content": [{"type": "audio"}]}], r"content\[0\]: part has type 'audio'; expected one of"),
    ([{"role": "user", "content": [{"text": "x"}]}], r"content\[0\]: part has no 'type'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "a text part needs a string 'text'"),
    ([{"role": "user", "content": ["x"]}], r"content\[0\]: expected a part object"),
    ([{"role": "assistant", "content": "", "tool_calls": {}}], "expected a list of tool calls"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}], "non-empty string 'name'"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{bad"}]}], "not valid JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": [1]}]}], "must be an object"),
    ([{"role": "assistant", "content": "", "reasoning_content": 1}], "reasoning_content: expected a string"),
    ("[{", "not valid JSON"),
    (Path("/nonexistent/chat.json"), "cannot read the message file"),
])
def test_load_messages_names_the_problem(obj, problem):
    with pytest.raises(QwenEdgeError, match=problem):
        load_messages(obj)


def test_chat_module_is_torch_free():
    code = ("import sys, runtime_py.chat, runtime_py.chat_template, runtime_py.template_sandbox; "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
