"""Bad input: one clear line naming the problem and the fix, a non-zero exit, and no output left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from exporter.cli import main
from graphs.random_checkpoint import write_random_checkpoint
from tests.conftest import tiny_config


def _checkpoint(root: Path) -> Path:
    return write_random_checkpoint(tiny_config(), root / "ck", dtype=torch.float32, multimodal_names=False)


def _missing_config(ck: Path) -> None:
    (ck / "config.json").unlink()


def _missing_weights(ck: Path) -> None:
    (ck / "model.safetensors").unlink()


def _truncated(ck: Path) -> None:
    path = ck / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(ck: Path) -> None:
    path = ck / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00garbage-not-json-at-all-\xff\xfe\x00!!"
    path.write_bytes(bytes(data))


def _wrong_shape(ck: Path) -> None:
    path = ck / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.linear_attn.in_proj_z.weight"] = torch.zeros(8, 64)
    save_file(tensors, path)


def _unsupported_model_type(ck: Path) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))


def _missing_tensor(ck: Path) -> None:
    path = ck / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.3.self_attn.k_norm.weight"]
    save_file(tensors, path)


CASES = {
    "missing config": (_missing_config, "config.json not found"),
    "missing weights": (_missing_weights, "no *.safetensors"),
    "truncated safetensors": (_truncated, "truncated or corrupt"),
    "corrupt safetensors": (_corrupt_header, "truncated or corrupt"),
    "wrong tensor shape": (_wrong_shape, "has shape [8, 64] but config.json implies [32, 64]"),
    "missing tensor": (_missing_tensor, "'layers.3.self_attn.k_norm.weight' is missing"),
    "unsupported model_type": (_unsupported_model_type, "unsupported model_type 'llama'"),
}


def _assert_clean_failure(result, out: Path, expected: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "partial output left behind"


@pytest.mark.parametrize("case", list(CASES))
def test_export_rejects_bad_checkpoint(case, tmp_path):
    damage, expected = CASES[case]
    ck = _checkpoint(tmp_path)
    damage(ck)
    out = tmp_path / "out" / "export"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["export", str(ck), str(out), "--quiet"])
    _assert_clean_failure(result, out, expected)


def test_existing_output_is_refused_without_force(tmp_path):
    ck = _checkpoint(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = CliRunner().invoke(main, ["export", str(ck), str(out), "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {out}: output folder already exists; choose another path or pass --force to replace it"
    ]
    assert (out / "keep.txt").read_text() == "user data"


def test_force_replaces_existing_output(tmp_path):
    """--force replaces a folder qwen-edge wrote (it holds our manifest), stale files and all."""
    ck = _checkpoint(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "qwen_edge.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    result = CliRunner().invoke(main, ["export", str(ck), str(out), "--quiet", "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert (out / "onnx" / "decoder_model_merged.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_during_export_leaves_nothing(tmp_path, monkeypatch):
    """An error after files were written (here: while tracing the decoder) still leaves no output."""
    import exporter.onnx.backend as backend

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the decoder")

    monkeypatch.setattr(backend, "trace_decoder", boom)
    ck = _checkpoint(tmp_path)
    out = tmp_path / "out" / "export"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["export", str(ck), str(out), "--quiet"])
    assert result.exit_code != 0
    assert list(out.parent.iterdir()) == []


def test_generate_on_missing_export_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "nothing"), "--prompt", "hi"])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "not found" in result.stderr


def test_verify_rejects_bad_prompt_lengths(tmp_path):
    result = CliRunner().invoke(main, ["verify", "default", str(tmp_path), "--prompt-lengths", "a,b"])
    assert result.exit_code == 1
    assert "comma-separated integers" in result.stderr
