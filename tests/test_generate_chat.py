"""`qwen-edge generate` with conversations: --messages, --tools, --system, --no-thinking, --json, checked
against transformers' own apply_chat_template on the same export (issue 17)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from exporter.cli import main
from runtime_py.generate import Sampling, generate, generate_chat, stop_ids
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer

DATA = Path(__file__).parent / "data"
CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4.", "reasoning_content": "add them"},
    {"role": "user", "content": "What is 12 plus 7?"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b, for <b>bold</b> & co",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def hf_tokenizer(default_export: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_export))


def _hf_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """transformers' own prompt ids: apply_chat_template(..., tokenize=True)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              **kwargs)["input_ids"])


def _generate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["generate", *args])
    return result.exit_code, result.stdout, result.stderr


def _json(export: Path, *args: str) -> dict:
    code, out, err = _generate(str(export), "--json", "--max-new-tokens", "12", *args)
    assert code == 0, err
    return json.loads(out)


def test_messages_file_renders_as_transformers_and_generates(default_export, hf_tokenizer, tmp_path):
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(CONVERSATION))
    got = _json(default_export, "--messages", str(path))
    assert got["prompt_ids"] == _hf_ids(hf_tokenizer, CONVERSATION)
    expected = generate(OnnxModel(default_export), got["prompt_ids"], 12, stop_ids=stop_ids(default_export))
    assert got["generated_ids"] == expected and got["text"].startswith("12 plus 7 is")
    assert got["content"] == got["text"].strip() and got["reasoning"] is None and got["tool_calls"] == []


def test_system_and_tools_options(default_export, hf_tokenizer, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    got = _json(default_export, "--chat", "--prompt", "What is 12 plus 7?", "--system", "Be brief.", "--tools", str(tools))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 7?"}]
    assert got["prompt_ids"] == _hf_ids(hf_tokenizer, messages, tools=TOOLS)
    assert "<b>bold</b> & co" in TextTokenizer(default_export).decode(got["prompt_ids"])  # no HTML escaping


@pytest.fixture(scope="module")
def qwen_template_export(default_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's export with the published Qwen3.5 chat template (thinking on by default)."""
    export = tmp_path_factory.mktemp("qwen-template") / "export"
    shutil.copytree(default_export, export)
    config = json.loads((export / "tokenizer_config.json").read_text())
    config["chat_template"] = (DATA / "qwen3_5_chat_template.jinja").read_text()
    (export / "tokenizer_config.json").write_text(json.dumps(config))
    return export


def test_thinking_on_by_default_and_off_with_no_thinking(qwen_template_export):
    transformers = pytest.importorskip("transformers")
    tokenizer = TextTokenizer(qwen_template_export)
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen_template_export))
    messages = [{"role": "user", "content": "What is 12 plus 7?"}]
    on = _json(qwen_template_export, "--chat", "--prompt", messages[0]["content"])
    off = _json(qwen_template_export, "--chat", "--prompt", messages[0]["content"], "--no-thinking")
    assert on["prompt_ids"] == _hf_ids(hf, messages)
    assert off["prompt_ids"] == _hf_ids(hf, messages, enable_thinking=False)
    assert tokenizer.decode(on["prompt_ids"], skip_special_tokens=False).endswith("<think>\n")
    assert tokenizer.decode(off["prompt_ids"], skip_special_tokens=False).endswith("</think>\n\n")
    # a reply after an open think block without </think> is all reasoning (cut short); after a closed one, content
    assert on["reasoning"] == on["text"].strip() and on["content"] == ""
    assert off["reasoning"] is None and off["content"] == off["text"].strip()


def test_runtime_api_mirrors_the_command(default_export):
    """An app-side Python gets the same prompt, tokens and parsed reply from the runtime API."""
    model, tokenizer = OnnxModel(default_export), TextTokenizer(default_export)
    result = generate_chat(model, tokenizer, CONVERSATION, 12, Sampling(), stop_ids=stop_ids(default_export))
    prompt = tokenizer.apply_chat_template(CONVERSATION)
    assert result.prompt_ids == tokenizer.encode(prompt)
    assert result.text == tokenizer.decode(result.generated_ids) and result.reply["content"] == result.text.strip()
    assert np.array_equal(result.generated_ids, generate(model, result.prompt_ids, 12, stop_ids=stop_ids(default_export)))


@pytest.mark.parametrize("args, message", [
    ([], "give --prompt TEXT or --messages FILE"),
    (["--prompt", "x", "--messages", "{m}"], "give --prompt TEXT or --messages FILE"),
    (["--prompt", "x", "--system", "s"], "--system apply to chat prompts; add --chat or use --messages"),
    (["--prompt", "x", "--no-thinking"], "--no-thinking apply to chat prompts"),
    (["--messages", "{bad}"], "not valid JSON"),
    (["--messages", "{image}"], "has no vision encoder"),
    (["--messages", "{m}", "--system", "again"], "give the system prompt once"),
    (["--chat", "--prompt", "x", "--tools", "{badtools}"], "a tool definition is an object naming its function"),
])
def test_bad_conversation_input_is_one_clear_error(default_export, tmp_path, args, message):
    files = {"m": CONVERSATION, "bad": None, "image": [{"role": "user", "content": [{"type": "image"}]}],
             "badtools": [{"type": "function"}]}
    for name, value in files.items():
        (tmp_path / f"{name}.json").write_text("{not json" if value is None else json.dumps(value))
    code, _, err = _generate(str(default_export), *[a.format(**{k: tmp_path / f"{k}.json" for k in files}) for a in args])
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_template_errors_carry_the_templates_message(qwen_template_export, tmp_path):
    """The published template refuses a system message that is not first, with its own words."""
    path = tmp_path / "late_system.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]))
    code, _, err = _generate(str(qwen_template_export), "--messages", str(path))
    assert code == 1 and err == "error: chat template error: System message must be at the beginning.\n", err
