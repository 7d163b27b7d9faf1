"""Benchmark harness logic that does not depend on timing: statistics, power-mode choice, state-memory
arithmetic (checked against real state tensors), the report schema and files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.bench.report import write_report
from runtime_py.bench import BENCH_SCHEMA_VERSION, Spread, choose_power_mode, markdown_table, run_benchmark, state_bytes
from runtime_py.session import OnnxModel


def _config(threads, tok_s, cpu_per_tok):
    return {"threads": threads, "load_s": 0.1, "peak_rss_mib": 100.0,
            "prefill": {"128": {"tokens_per_s": 100.0 * threads, "time_to_first_token_s": 1.28 / threads,
                                "seconds": {"median": 1.28 / threads, "low": 1.2, "high": 1.3, "n": 3}}},
            "decode": {"tokens": 128, "after_prompt": 128,
                       "tokens_per_s": {"median": tok_s, "low": tok_s, "high": tok_s, "n": 3},
                       "cpu_s_per_token": {"median": cpu_per_tok, "low": cpu_per_tok, "high": cpu_per_tok, "n": 3}}}


def test_spread_is_median_and_range():
    assert Spread.of([3.0, 1.0, 2.0, 10.0]) == Spread(2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError):
        Spread.of([])


def test_power_mode_prefers_fewer_busy_cores_at_nearly_the_same_speed():
    configs = [_config(1, 20.0, 0.050), _config(2, 21.0, 0.090), _config(4, 22.0, 0.170)]
    pm = choose_power_mode(configs)
    assert pm["threads"] == 1 and pm["fastest_threads"] == 4
    assert pm["tokens_per_cpu_s"] == pytest.approx(20.0)


def test_power_mode_never_drops_below_ninety_percent_of_the_best_speed():
    configs = [_config(1, 10.0, 0.1), _config(2, 19.0, 0.104), _config(4, 20.0, 0.2)]
    pm = choose_power_mode(configs)
    assert pm["threads"] == 2  # 1 thread is most frugal but at 50 % of the best speed
    assert pm["decode_tokens_per_s"] >= 0.9 * pm["fastest_decode_tokens_per_s"]


def test_state_memory_arithmetic_matches_real_state(default_export):
    model = OnnxModel(default_export)
    state = model.new_state(1)
    model.forward(np.arange(40)[None] + 5, state)
    real = sum(v.numpy().nbytes for v in state.values.values())
    assert state_bytes(model, 40)["total_bytes"] == real
    small, large = state_bytes(model, 1024), state_bytes(model, 32768)
    assert small["recurrent_and_conv_bytes"] == large["recurrent_and_conv_bytes"] > 0  # constant
    assert large["kv_cache_bytes"] == 32 * small["kv_cache_bytes"]  # linear in context


def test_benchmark_report_schema_and_files(default_export, tmp_path):
    report = run_benchmark(default_export, "fp32", [1], [8, 16], decode_tokens=4, repeats=1, contexts=[1024, 4096])
    assert report["schema_version"] == BENCH_SCHEMA_VERSION
    config = report["configs"][0]
    assert config["threads"] == 1 and set(config["prefill"]) == {"8", "16"}
    for key in ("load_s", "peak_rss_mib"):
        assert config[key] > 0
    assert config["decode"]["tokens_per_s"]["n"] == 1 and config["decode"]["cpu_s_per_token"]["median"] > 0
    assert report["power_mode"]["threads"] == 1
    files = write_report(report, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    assert "| threads |" in (tmp_path / "bench.md").read_text() and "Power mode" in markdown_table(report)
    for png in ("speed.png", "memory.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(files) == 4 and not (tmp_path / "peers.png").exists()
    peer = dict(_config(1, 20.0, 0.05), peer="llama.cpp Q4_0")
    files = write_report({**report, "peers": [peer], "skipped_peers": {}}, tmp_path / "with-peers")
    assert files[-1].name == "peers.png" and files[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peer_ratios_pair_configs_by_thread_count():
    from exporter.bench.peers import ratios

    ours = [_config(1, 20.0, 0.05), _config(2, 30.0, 0.066)]
    peer = dict(_config(2, 24.0, 0.0825), peer="onnxruntime-genai int4", peak_rss_mib=200.0)
    peer["prefill"]["128"]["tokens_per_s"] = 100.0
    [row] = ratios(ours, [peer])
    assert row["threads"] == 2 and row["peer"] == "onnxruntime-genai int4"
    assert row["decode_speed_ratio"] == pytest.approx(1.25)
    assert row["cpu_s_per_token_ratio"] == pytest.approx(0.8)
    assert row["prefill_128_speed_ratio"] == pytest.approx(2.0)
    assert row["peak_rss_ratio"] == pytest.approx(0.5)


def test_missing_peer_is_skipped_with_the_reason(monkeypatch):
    import importlib.util

    from exporter.bench import peers

    real = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime_genai" else real(name))
    assert peers.missing_peer("onnxruntime-genai") == \
        "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    assert peers.missing_peer("transformers") is None
    report = {"configs": [_config(1, 20.0, 0.05)], "state_memory": [], "power_mode": choose_power_mode([_config(1, 20.0, 0.05)]),
              "peers": [], "skipped_peers": {"onnxruntime-genai": peers.missing_peer("onnxruntime-genai")}}
    assert "skipped: onnxruntime-genai is not installed" in markdown_table(report)


def test_llama_cpp_peer_reads_the_checkpoint_as_its_converter_needs(tiny_checkpoints, tiny_mtp_checkpoint, tmp_path):
    """The converter is told --no-mtp exactly when the checkpoint has no mtp.* tensors, and reads a
    checkpoint without a tokenizer beside the default model's (its GGUF would not load otherwise)."""
    from default_model import CHECKPOINT_DIR
    from exporter.bench.llama_cpp import convert_command, has_mtp_weights, peer_input

    plain = tiny_checkpoints["kv_equal_tied"]
    assert not has_mtp_weights(plain) and has_mtp_weights(tiny_mtp_checkpoint)
    assert convert_command(tmp_path, plain, tmp_path / "m.gguf")[-1] == "--no-mtp"
    assert "--no-mtp" not in convert_command(tmp_path, tiny_mtp_checkpoint, tmp_path / "m.gguf")
    assert not (plain / "tokenizer.json").exists()  # as the random checkpoints of `make bench`
    folder = peer_input(plain, tmp_path / "input")
    assert (folder / "tokenizer.json").read_bytes() == (CHECKPOINT_DIR / "tokenizer.json").read_bytes()
    assert all((folder / p.name).resolve() == p.resolve() for p in plain.iterdir())
    # a checkpoint's own tokenizer is the one read
    assert (peer_input(CHECKPOINT_DIR, tmp_path / "input") / "tokenizer.json").is_symlink()


def test_llama_cpp_peer_that_cannot_build_is_skipped_with_the_reason(default_export, tmp_path, monkeypatch):
    from exporter.bench import llama_cpp
    from exporter.bench.command import BenchRequest, _compare_peers
    from exporter.bench import peers

    source = tmp_path / "peers" / "llama.cpp" / "llama_cpp_python-0.0.0" / "vendor" / "llama.cpp"
    source.mkdir(parents=True)
    monkeypatch.setattr(llama_cpp.shutil, "which", lambda name: None)
    with pytest.raises(llama_cpp.LlamaCppUnavailable, match="cmake is not installed"):
        llama_cpp.build_llama_cpp(source.parents[1])
    monkeypatch.setattr(peers, "missing_peer", lambda name: f"{name} is not installed")
    notes = []
    out = _compare_peers({"configs": []}, default_export, [1], BenchRequest(default_export, out_dir=tmp_path), notes.append)
    assert out["skipped_peers"]["llama.cpp"] == "cmake is not installed (apt-get install cmake)"
    assert notes[-1] == "skipping llama.cpp: cmake is not installed (apt-get install cmake)" and out["peers"] == []


def test_variant_table_counts_the_text_model_without_the_mtp_head(tiny_mtp_export):
    from exporter.bench.variants import text_bytes
    from runtime_py.export_format import read_manifest

    record = read_manifest(tiny_mtp_export)["variants"]["fp32"]
    text = text_bytes(tiny_mtp_export, record)
    graphs = sum(p.stat().st_size for p in (tiny_mtp_export / "onnx").iterdir()
                 if p.name.startswith(("embed_tokens.", "decoder_model_merged.")))
    assert text == graphs < record["bytes_on_disk"]  # the head's graph (and its own weights) are the rest


def test_size_summary_keeps_rows_measured_elsewhere(tmp_path, monkeypatch):
    """A size measured in another checkout (no record here) keeps its row; a size with a record is rewritten."""
    from exporter.bench import export as bench_export

    monkeypatch.setattr(bench_export, "ROOT", tmp_path)
    (tmp_path / "bench_out").mkdir()
    stage = {"wall_s": 1.0, "cpu_s": 1.0, "peak_rss_mib": 10, "exit": 0}
    record = {"date": "2026-12-03", "stages": {"export (q4)": stage, bench_export.verify_stage("q4"): stage},
              "variant_bytes": {"q4": 123}, "verify": {"q4": {"passed": True, "worst_relative_diff": 1e-5}}}
    (tmp_path / "bench_out" / "export_qwen3.5-9b_q4_b32.json").write_text(json.dumps(record))
    doc = tmp_path / "BENCHMARKS.md"
    old_row = "| qwen3.5-2b | 2026-12-02 | 9.0 | 99 | q4 | 456 | PASS (1.0e-05) | 2.0 | 20 |"
    doc.write_text(f"# B\n\n<!-- sizes:q4:32 -->\n{old_row}\n| qwen3.5-9b | 2026-12-01 | stale |\n<!-- /sizes:q4:32 -->\n")
    bench_export.write_size_summary(doc, "q4", "32")
    text = doc.read_text()
    assert old_row in text and "stale" not in text
    assert "| qwen3.5-9b | 2026-12-03 | 1.0 | 10 | q4 | 123 | PASS (1.0e-05) | 1.0 | 10 |" in text
    assert text.index("qwen3.5-2b |") < text.index("qwen3.5-9b |")  # in preset order


def test_vision_bench_table_states_load_and_int4_fallback():
    """The vision benchmark's section says how loaded the machine was and which 4-bit variants
    stored the tower in 8 bits because the gate failed (derived from the rows, not written by hand)."""
    from exporter.bench.vision import markdown

    def row(variant, bits, error):
        return {"variant": variant, "file": f"onnx/{variant}.onnx", "mib": 1.0, "weight_bits": bits,
                "int4_feature_error": error, "trace_s": 1.0, "write_s": 0.1, "encode_448_s": {1: 0.5, 2: 0.3}}

    report = {"preset": "p", "parameters": 2e6, "image": "448x448", "grid": [1, 28, 28], "image_tokens": 196,
              "date": "2026-12-03", "machine": "m", "load_average": [0.5, 1.2],
              "rows": [row("fp32", None, None), row("q4", 8, 0.25), row("q4f16", 4, 0.05)]}
    text = markdown(report, "cmd")
    assert "load average 0.5 at the start, 1.2 at the end" in text
    assert "q4: the int4 tower's feature error is above the 0.1 gate" in text
    report["rows"] = report["rows"][:1] + report["rows"][2:]
    assert "above the 0.1 gate" not in markdown(report, "cmd")
