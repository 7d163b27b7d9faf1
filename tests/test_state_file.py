"""Saved sequence state: a restored prefix continues exactly like the uninterrupted run, through the
API, the CLI and a chat session; a file from another export, or a damaged one, is refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from exporter.cli import main
from graphs.errors import QwenEdgeError
from runtime_py.chat_session import ChatSession
from runtime_py.generate import generate, stop_ids
from runtime_py.sequence import PlainSession, prefill, run_session
from runtime_py.session import OnnxModel
from runtime_py.speculative import SpeculativeSession
from runtime_py.state_file import load_sequence, save_sequence
from runtime_py.tokenizer import TextTokenizer

PROMPT = [3, 17, 42, 99, 5, 250, 8, 61, 777, 140, 12, 900]
NEW = 16


@pytest.fixture(scope="module")
def mtp_model(tiny_mtp_export) -> OnnxModel:
    return OnnxModel(tiny_mtp_export, "fp32")


@pytest.mark.parametrize("speculative", [None, 2])
def test_restored_state_continues_like_the_uninterrupted_run(mtp_model, tmp_path, speculative):
    whole = generate(mtp_model, PROMPT, NEW)
    saved = save_sequence(tmp_path / "prefix.safetensors", mtp_model, prefill(mtp_model, PROMPT[:7], with_head=True))
    restored = prefill(mtp_model, PROMPT[7:], load_sequence(saved, mtp_model), with_head=True)
    session = SpeculativeSession(mtp_model, speculative) if speculative else PlainSession(mtp_model)
    assert run_session(session, restored, NEW)[0] == whole
    # the file is plain safetensors
    tensors = load_file(str(saved))
    assert tensors["token_ids"].tolist() == PROMPT[:7] and any(k.startswith("head.") for k in tensors)


def test_cli_save_state_then_load_state(tiny_mtp_export, tmp_path):
    state = tmp_path / "system.safetensors"
    run = lambda *args: CliRunner().invoke(main, ["generate", str(tiny_mtp_export), "--max-new-tokens", "10", *args])  # noqa: E731
    whole = run("--prompt", "On Monday the")
    first = run("--prompt", "On Monday", "--save-state", str(state))
    resumed = run("--prompt", " the", "--load-state", str(state))
    spec = run("--prompt", " the", "--load-state", str(state), "--speculative", "mtp")
    for result in (whole, first, resumed, spec):
        assert result.exit_code == 0, result.output
    assert resumed.output.removeprefix(" the") == whole.output.removeprefix("On Monday the")
    assert spec.output == resumed.output


def test_a_state_from_another_export_is_refused(tiny_exports, mtp_model, tmp_path):
    other = OnnxModel(tiny_exports["kv_equal_tied"], "fp32")
    path = save_sequence(tmp_path / "other.safetensors", other, prefill(other, PROMPT[:5]))
    with pytest.raises(QwenEdgeError, match="saved from another model or export"):
        load_sequence(path, mtp_model)
    result = CliRunner().invoke(main, ["generate", str(mtp_model.export_dir), "--prompt", "x", "--load-state", str(path)])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "another model or export" in result.output


def test_damaged_or_foreign_files_are_refused(mtp_model, tmp_path):
    good = save_sequence(tmp_path / "good.safetensors", mtp_model, prefill(mtp_model, PROMPT[:5], with_head=True))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(QwenEdgeError, match="not a readable state file"):
        load_sequence(cut, mtp_model)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(QwenEdgeError, match="not a qwen-edge state file"):
        load_sequence(foreign, mtp_model)
    tensors = load_file(str(good))
    tensors["state.past_conv.0"] = tensors["state.past_conv.0"][..., :-1]
    reshaped = tmp_path / "reshaped.safetensors"
    from safetensors import safe_open

    with safe_open(str(good), framework="np") as f:
        save_file(tensors, str(reshaped), metadata=f.metadata())
    with pytest.raises(QwenEdgeError, match="has shape"):
        load_sequence(reshaped, mtp_model)
    with pytest.raises(QwenEdgeError, match="no such state file"):
        load_sequence(tmp_path / "missing.safetensors", mtp_model)


def test_chat_session_prefills_only_each_new_turn(mtp_model, tiny_mtp_export, tmp_path):
    tokenizer = TextTokenizer(tiny_mtp_export)
    stops = stop_ids(tiny_mtp_export)
    chat = ChatSession(mtp_model, tokenizer, stop_ids=stops)
    chat.send("What is 12 plus 7?", max_new_tokens=8)
    after_first = chat.prefilled_tokens
    second = chat.send("And 3 plus 4?", max_new_tokens=8)
    full = len(tokenizer.encode(tokenizer.apply_chat_template(chat.messages[:-1])))
    assert chat.full_prefills == 0 and chat.prefilled_tokens - after_first < full - after_first
    # the same reply as a conversation prefilled from scratch, and through a state file
    fresh = ChatSession(mtp_model, tokenizer, stop_ids=stops, messages=chat.messages[:2])
    assert fresh.send("And 3 plus 4?", max_new_tokens=8) == second
    chat.save(tmp_path / "chat.safetensors")
    resumed = ChatSession(mtp_model, tokenizer, stop_ids=stops, speculative=2)
    resumed.resume(tmp_path / "chat.safetensors", chat.messages)
    again = ChatSession(mtp_model, tokenizer, stop_ids=stops, messages=chat.messages)
    assert resumed.send("And 5?", max_new_tokens=8) == again.send("And 5?", max_new_tokens=8)
    assert resumed.full_prefills == 0
