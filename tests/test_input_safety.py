"""Issue 11, one representative case per class: inputs are never destroyed, no path leaves its folder,
absurd configs and option values are one clean error before any work, SIGTERM cleans up, leftovers
of killed runs are removed, outputs follow the umask, chat templates get bounded work, and exports
are byte-reproducible. (tests/test_fuzz.py covers the readers with generated inputs.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from exporter.atomic import atomic_output_dir
from exporter.cli import main
from graphs.errors import QwenEdgeError
from graphs.random_checkpoint import write_random_checkpoint
from runtime_py.export_format import MANIFEST
from tests.conftest import COREML_CONTEXT, tiny_config

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "default_model" / "checkpoint"


def _checkpoint(root: Path, config: dict | None = None) -> Path:
    return write_random_checkpoint(config or tiny_config(), root / "ck", dtype=torch.float32, multimodal_names=False)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(result, expected: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    return lines[0]


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "partial output left behind"


# ---- inputs are never destroyed -------------------------------------------------------------------

@pytest.mark.parametrize("where", ["the checkpoint itself", "inside the checkpoint", "a folder holding the checkpoint"])
def test_an_output_overlapping_the_input_is_refused_even_with_force(tmp_path: Path, where: str) -> None:
    ck = _checkpoint(tmp_path)
    before = _hashes(ck)
    out = {"the checkpoint itself": ck, "inside the checkpoint": ck / "export",
           "a folder holding the checkpoint": tmp_path}[where]
    result = CliRunner().invoke(main, ["export", str(ck), str(out), "--quiet", "--force"])
    _one_error(result, "an input is never written to")
    assert _hashes(ck) == before


def test_force_replaces_only_a_folder_qwen_edge_wrote(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"user data")
    result = CliRunner().invoke(main, ["export", str(ck), str(out), "--quiet", "--force"])
    _one_error(result, "--force replaces only a folder qwen-edge wrote")
    assert (out / "holiday.jpg").read_bytes() == b"user data"


def test_package_refuses_an_output_inside_the_export(tiny_exports: dict[str, Path]) -> None:
    export = tiny_exports["kv_equal_tied"]
    before = _hashes(export)
    result = CliRunner().invoke(main, ["package", str(export), "--target", "android", str(export / "bundle")])
    _one_error(result, "an input is never written to")
    assert _hashes(export) == before


# ---- nothing leaves its folder --------------------------------------------------------------------

def _copied_export(tiny_exports: dict[str, Path], root: Path) -> Path:
    export = root / "export"
    shutil.copytree(tiny_exports["kv_equal_tied"], export)
    return export


@pytest.mark.parametrize("name", ["../outside/decoder_model_merged.onnx", "/tmp/decoder_model_merged.onnx",
                                  "onnx/../../outside/decoder_model_merged.onnx", "link/decoder_model_merged.onnx"])
def test_a_manifest_path_outside_the_export_is_refused(tiny_exports: dict[str, Path], tmp_path: Path, name: str) -> None:
    export = _copied_export(tiny_exports, tmp_path)
    (tmp_path / "outside").mkdir()
    shutil.copy(export / "onnx" / "decoder_model_merged.onnx", tmp_path / "outside")
    (export / "link").symlink_to(tmp_path / "outside")
    manifest = json.loads((export / MANIFEST).read_text())
    manifest["variants"]["fp32"]["decoder"] = name
    (export / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["package", str(export), "--target", "web", str(out)])
    _one_error(result, "names a path outside")
    _no_leftovers(tmp_path, "bundle")


def test_external_weight_data_outside_the_export_is_refused(tiny_exports: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    export = _copied_export(tiny_exports, tmp_path)
    graph = export / "onnx" / "decoder_model_merged.onnx"
    shutil.copy(graph.with_name(graph.name + "_data"), tmp_path / "secret.bin")
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../secret.bin"
    onnx.save(model, str(graph))
    result = CliRunner().invoke(main, ["package", str(export), "--target", "android", str(tmp_path / "bundle")])
    _one_error(result, "weight data outside its folder")
    _no_leftovers(tmp_path, "bundle")


def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path)
    (ck / "model.safetensors").rename(tmp_path / "model.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../model.safetensors"}}))
    result = CliRunner().invoke(main, ["export", str(ck), str(tmp_path / "out"), "--quiet"])
    _one_error(result, "names a path outside")
    _no_leftovers(tmp_path, "out")


# ---- one clean error, before any work, for every bad input ----------------------------------------

CONFIG_DAMAGE = {
    "a list, not an object": (lambda c: [c], "must hold a JSON object"),
    "a million layers": (lambda c: {**c, "num_hidden_layers": 10**6}, "'num_hidden_layers' is 1000000"),
    "a 10⁹ hidden size": (lambda c: {**c, "hidden_size": 10**9}, "'hidden_size' is 1000000000"),
    "a string for an integer": (lambda c: {**c, "num_attention_heads": "4"}, "must be an integer, not a string"),
    "zero heads": (lambda c: {**c, "num_key_value_heads": 0}, "'num_key_value_heads' is 0"),
    "NaN epsilon": (lambda c: {**c, "rms_norm_eps": float("nan")}, "'rms_norm_eps' is nan"),
    "rope_parameters a string": (lambda c: {**c, "rope_parameters": "default"}, "'rope_parameters' must be an object"),
    "text_config a list": (lambda c: {"model_type": "qwen3_5", "text_config": [c]}, "'text_config' must be an object"),
    "layer_types of numbers": (lambda c: {**c, "layer_types": [1, 2, 3, 4]}, "'layer_types' must be a list of strings"),
}


@pytest.mark.parametrize("case", list(CONFIG_DAMAGE))
def test_a_bad_config_is_one_error_in_moments(tmp_path: Path, case: str) -> None:
    damage, expected = CONFIG_DAMAGE[case]
    ck = _checkpoint(tmp_path)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(damage(config)))
    started = time.monotonic()
    result = CliRunner().invoke(main, ["export", str(ck), str(tmp_path / "out"), "--quiet"])
    _one_error(result, expected)
    assert time.monotonic() - started < 20, "a bad config must be refused before anything is built"
    _no_leftovers(tmp_path, "out")


OPTION_CASES = [
    (["generate", "E", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "E", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "E", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "E", "--prompt", "hi", "--top-p", "inf"], "--top-p"),
    (["generate", "E", "--prompt", "hi", "--seed", "-1"], "--seed"),
    (["generate", "E", "--prompt", "hi", "--threads", "0"], "--threads"),
    (["generate", "E", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["verify", "default", "E", "--rtol", "nan"], "--rtol"),
    (["bench", "E", "--decode-tokens", "0"], "--decode-tokens"),
    (["devices", "fit", "E", "--context", "0"], "--context"),
    (["devices", "fit", "E", "--threads", "-2"], "--threads"),
    (["devices", "fit", "E", "--context", str(10**18)], "--context"),
    (["bench", "E", "--repeats", str(10**9)], "--repeats"),
]


@pytest.mark.parametrize("args,option", OPTION_CASES, ids=[" ".join(a[-2:]) for a, _ in OPTION_CASES])
def test_a_numeric_option_out_of_range_is_a_usage_error(tmp_path: Path, args: list[str], option: str) -> None:
    args = [str(tmp_path) if a == "E" else a for a in args]
    _one_error(CliRunner().invoke(main, args), option, code=2)


def test_bench_thread_list_out_of_range_is_one_error(tmp_path: Path) -> None:
    _one_error(CliRunner().invoke(main, ["bench", str(tmp_path), "--threads", "1,0"]), "--threads")


def test_an_output_file_in_a_missing_folder_is_refused_before_the_work(tmp_path: Path) -> None:
    target = tmp_path / "no-such-folder" / "fit.json"
    result = CliRunner().invoke(main, ["devices", "fit", str(tmp_path / "no-export"), "--json", str(target)])
    _one_error(result, "does not exist; create it")


def test_a_prompt_longer_than_the_context_is_refused(default_export: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(default_export, export)
    config = json.loads((export / "config.json").read_text())
    text = config.get("text_config", config)
    text["max_position_embeddings"] = 16
    (export / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["generate", str(export), "--prompt", "one two three " * 20])
    _one_error(result, "longer than the model's context")


HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "a huge repetition": "{{ 'x' * 10**10 }}",
    "a huge width": "{{ ''|center(10**10) }}",
    "doubling": "{% set s = namespace(x='a') %}{% for i in range(99) %}{% set s.x = s.x ~ s.x %}{% endfor %}{{ s.x }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "a syntax error": "{% for %}",
}


@pytest.mark.parametrize("case", list(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_is_refused_at_export(tmp_path: Path, case: str) -> None:
    """check_support_files renders the template at export; bounded work, one clean error."""
    from runtime_py.tokenizer import check_support_files

    folder = tmp_path / "ck"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_CHECKPOINT / name, folder)
    (folder / "chat_template.jinja").write_text(HOSTILE_TEMPLATES[case])
    started = time.monotonic()
    with pytest.raises(QwenEdgeError, match="chat template"):
        check_support_files(folder)
    assert time.monotonic() - started < 15


# ---- signals, leftovers, umask ----------------------------------------------------------------------

def test_sigterm_removes_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.onnx.backend as backend

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(backend, "trace_decoder", killed)
    ck = _checkpoint(tmp_path)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        result = CliRunner().invoke(main, ["export", str(ck), str(tmp_path / "out"), "--quiet"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    _one_error(result, "interrupted by SIGTERM", code=128 + signal.SIGTERM)
    _no_leftovers(tmp_path, "out")


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    host = socket.gethostname()
    dead = tmp_path / f".out.partial-{2**22 + 12345}@{host}.abcd1234"  # above any pid this machine hands out
    live = tmp_path / f".out.partial-{os.getppid()}@{host}.efgh5678"  # a running process: maybe another run
    other = tmp_path / f".out.partial-{2**22 + 12345}@another-host.ijkl9012"  # on a shared folder
    for folder in (dead, live, other):
        folder.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "new"
    assert not dead.exists() and live.exists() and other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "file").write_text("x")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert [p.stat().st_mode & 0o777 for p in (out, out / "sub", out / "sub" / "file")] == \
        [0o777 & ~umask, 0o777 & ~umask, 0o666 & ~umask]


# ---- package verify -----------------------------------------------------------------------------------

def _copied_bundle(tiny_bundle: Path, root: Path) -> Path:
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    return bundle


def _verify(bundle: Path, *extra: str):
    return CliRunner().invoke(main, ["package", "verify", str(bundle), *extra])


@pytest.mark.parametrize("extra", ["fifo", "folder", "symlink", "duplicate"])
def test_verify_rejects_unlisted_entries_of_any_kind(tiny_bundle: Path, tmp_path: Path, extra: str) -> None:
    bundle = _copied_bundle(tiny_bundle, tmp_path)
    if extra == "fifo":
        os.mkfifo(bundle / "pipe")  # reading it would block forever: verify must not open it
        expected = "pipe: a FIFO"
    elif extra == "folder":
        (bundle / "extra").mkdir()
        expected = "extra/: a folder not listed"
    elif extra == "symlink":
        (bundle / "passwd").symlink_to("/etc/passwd")
        expected = "passwd: a symbolic link"
    else:
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"].append(manifest["files"][0])
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        expected = "listed twice"
    _one_error(_verify(bundle), expected)


def test_verify_rejects_a_manifest_whose_claims_the_files_contradict(tiny_bundle: Path, tmp_path: Path) -> None:
    """Every file hash right, but the manifest says the graph takes another input: caught."""
    bundle = _copied_bundle(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = next(iter(manifest["graphs"].values()))
    graph["inputs"][0]["name"] = "renamed_ids"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _one_error(_verify(bundle), "graphs: the manifest's value differs")


def test_a_pinned_manifest_hash_catches_a_consistently_edited_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _copied_bundle(tiny_bundle, tmp_path)
    first = _verify(bundle)
    assert first.exit_code == 0, first.output
    pinned = first.stdout.split("manifest sha256 ")[1].split()[0]
    # Rewrite one file and its manifest entry (size and hash) together: verify alone cannot tell.
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["path"] == "config.json")
    data = (bundle / "config.json").read_bytes().replace(b"{", b"{ ", 1)
    (bundle / "config.json").write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["total_bytes"] = sum(e["bytes"] for e in manifest["files"])
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert _verify(bundle).exit_code == 0
    _one_error(_verify(bundle, "--manifest-sha256", pinned), "not the pinned")
    _one_error(_verify(bundle, "--manifest-sha256", "12ab"), "64 hexadecimal digits", code=2)


# ---- determinism ----------------------------------------------------------------------------------------

def test_exporting_the_default_model_twice_gives_identical_files(default_export: Path,
                                                                  default_all_variants: Path) -> None:
    """Two separate export runs of the default checkpoint (fp32 alone; every scheme): the fp32 graphs,
    their weights and the copied files are byte-identical, and so is the fp32 manifest entry."""
    first, second = _hashes(default_export), _hashes(default_all_variants)
    first.pop(MANIFEST)
    assert first and {k: second.get(k) for k in first} == first
    records = [json.loads((d / MANIFEST).read_text())["variants"]["fp32"] for d in (default_export, default_all_variants)]
    assert records[0] == records[1]


def test_exporting_to_core_ml_twice_gives_identical_packages(tiny_checkpoints: dict[str, Path],
                                                            tiny_coreml: Path, tmp_path: Path) -> None:
    """A second, separate Core ML export of the shared tiny checkpoint (its q4 package alone, the same
    options) writes the q4 package byte for byte as the shared export did, and records it the same way.
    (A tiny checkpoint takes the same conversion path as the default model, in a fraction of the time.)"""
    from exporter.coreml.backend import CoreMLOptions, export_coreml

    again = export_coreml(tiny_checkpoints["kv_double_untied"], tmp_path / "again", "q4",
                          CoreMLOptions(context=COREML_CONTEXT, recurrent_state="io"), progress=False)
    package = "coreml/model_q4.mlpackage"
    assert _hashes(again / package) and _hashes(again / package) == _hashes(tiny_coreml / package)
    records = [json.loads((d / MANIFEST).read_text())["variants"]["q4"] for d in (tiny_coreml, again)]
    assert records[0] == records[1]


def test_core_ml_packages_are_written_reproducibly(tiny_coreml: Path, tmp_path: Path) -> None:
    """The export names the package's items by their paths and writes the spec with sorted maps
    (exporter/coreml/backend.make_reproducible): doing it again changes no byte."""
    import uuid

    from exporter.coreml.backend import make_reproducible

    package = tiny_coreml / "coreml" / "model.mlpackage"
    manifest = json.loads((package / "Manifest.json").read_text())
    assert {key: str(uuid.uuid5(uuid.NAMESPACE_URL, f"qwen-edge:{item['path']}"))
            for key, item in manifest["itemInfoEntries"].items()} == {k: k for k in manifest["itemInfoEntries"]}
    copy = tmp_path / "model.mlpackage"
    shutil.copytree(package, copy)
    make_reproducible(copy)
    assert _hashes(copy) == _hashes(package)
