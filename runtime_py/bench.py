"""Throughput, latency, memory and CPU cost of an export on this machine (no torch needed).

`measure_config` runs one (variant, thread count) in the current process: load time, prefill tok/s
per prompt length, time to first token, decode tok/s, CPU-seconds per generated token and peak RSS.
`run_benchmark` runs every configuration in a fresh process (so peak RSS belongs to that
configuration alone), then summarises and picks the power mode.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from graphs.errors import QwenEdgeError
from runtime_py.session import OnnxModel, SequenceState

BENCH_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Spread":
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


def _prompt(length: int, vocab: int) -> np.ndarray:
    return (np.arange(length, dtype=np.int64) * 7919 % max(vocab - 1, 1))[None] + 1


def _timed(fn) -> tuple[float, float, object]:  # noqa: ANN001
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def measure_config(export_dir: Path, variant: str, threads: int, prompt_lengths: list[int], decode_tokens: int,
                   repeats: int, warmup: int = 1) -> dict:
    """Measure one configuration in this process. Greedy decoding, fixed synthetic prompts."""
    load_s, _, model = _timed(lambda: OnnxModel(export_dir, variant, threads=threads))
    vocab = model.decoder.get_outputs()[0].shape[-1]
    result: dict = {"variant": variant, "threads": threads, "load_s": load_s, "prefill": {}, "decode": {}}
    for length in prompt_lengths:
        prompt = _prompt(length, vocab)
        samples = []
        for i in range(warmup + repeats):
            wall, _, _ = _timed(lambda: model.forward(prompt, model.new_state(1)))
            if i >= warmup:
                samples.append(wall)
        spread = Spread.of(samples)
        result["prefill"][str(length)] = {"seconds": asdict(spread), "tokens_per_s": length / spread.median,
                                          "time_to_first_token_s": spread.median}
    prompt = _prompt(min(prompt_lengths), vocab)
    rates, cpu_per_token = [], []
    for i in range(warmup + repeats):
        state = model.new_state(1)
        logits = model.forward(prompt, state)

        def decode(state: SequenceState = state, logits: np.ndarray = logits) -> None:
            for _ in range(decode_tokens):
                token = int(logits[0, -1].argmax())
                logits = model.forward(np.array([[token]]), state)

        wall, cpu, _ = _timed(decode)
        if i >= warmup:
            rates.append(decode_tokens / wall)
            cpu_per_token.append(cpu / decode_tokens)
    result["decode"] = {"tokens": decode_tokens, "after_prompt": min(prompt_lengths),
                        "tokens_per_s": asdict(Spread.of(rates)),
                        "cpu_s_per_token": asdict(Spread.of(cpu_per_token))}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def choose_power_mode(configs: list[dict], keep: float = 0.9) -> dict:
    """Fewest CPU-seconds per token among thread counts that keep >= `keep` of the best decode speed.

    Fewer busy cores at nearly the same speed is less energy on a phone.
    """
    if not configs:
        raise ValueError("no configurations to choose from")
    best = max(c["decode"]["tokens_per_s"]["median"] for c in configs)
    eligible = [c for c in configs if c["decode"]["tokens_per_s"]["median"] >= keep * best]
    chosen = min(eligible, key=lambda c: (c["decode"]["cpu_s_per_token"]["median"], c["threads"]))
    fastest = max(configs, key=lambda c: c["decode"]["tokens_per_s"]["median"])
    return {
        "threads": chosen["threads"],
        "decode_tokens_per_s": chosen["decode"]["tokens_per_s"]["median"],
        "tokens_per_cpu_s": 1.0 / chosen["decode"]["cpu_s_per_token"]["median"],
        "fastest_threads": fastest["threads"],
        "fastest_decode_tokens_per_s": best,
        "fastest_tokens_per_cpu_s": 1.0 / fastest["decode"]["cpu_s_per_token"]["median"],
        "rule": f"max tokens per CPU-second among thread counts with >= {keep:.0%} of the best decode tok/s",
    }


def state_bytes(model: OnnxModel, context: int, batch: int = 1) -> dict[str, int]:
    """Bytes of the sequence state at `context` tokens, from the graph's own state shapes.

    Conv and recurrent state have fixed shapes; only the attention layers' KV cache grows.
    """
    itemsize = {"tensor(float)": 4, "tensor(float16)": 2}
    fixed = grows = 0
    for spec in model.state_inputs:
        per = itemsize[spec.type]
        dims = [batch if d == "batch_size" else (context if isinstance(d, str) else d) for d in spec.shape]
        size = int(np.prod(dims)) * per
        if any(isinstance(d, str) and d != "batch_size" for d in spec.shape):
            grows += size
        else:
            fixed += size
    return {"context": context, "recurrent_and_conv_bytes": fixed, "kv_cache_bytes": grows, "total_bytes": fixed + grows}


def run_benchmark(export_dir: Path, variant: str, thread_counts: list[int], prompt_lengths: list[int],
                  decode_tokens: int, repeats: int, contexts: list[int]) -> dict:
    """Every thread count in its own process, then the power mode and the state-memory curve."""
    model = OnnxModel(export_dir, variant, threads=1)  # a damaged export fails here, with its own message
    configs = []
    for threads in thread_counts:
        cmd = [sys.executable, "-m", "runtime_py.bench", str(export_dir), variant, str(threads),
               ",".join(map(str, prompt_lengths)), str(decode_tokens), str(repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if out.returncode != 0:
            detail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1][:300]
            raise QwenEdgeError(f"{export_dir}: the benchmark run with {threads} threads failed ({detail})")
        configs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "schema_version": BENCH_SCHEMA_VERSION,
        "export": str(export_dir),
        "variant": variant,
        "configs": configs,
        "power_mode": choose_power_mode(configs),
        "state_memory": [state_bytes(model, c) for c in contexts],
    }


def markdown_table(report: dict) -> str:
    lines = ["| threads | load s | " + " | ".join(f"prefill {k} tok/s" for k in report["configs"][0]["prefill"])
             + " | TTFT (s, shortest prompt) | decode tok/s (min–max) | CPU-s/token | peak RSS MiB |",
             "|---" * (6 + len(report["configs"][0]["prefill"])) + "|"]
    for c in report["configs"]:
        prefill = " | ".join(f"{p['tokens_per_s']:.1f}" for p in c["prefill"].values())
        first = next(iter(c["prefill"].values()))["time_to_first_token_s"]
        d = c["decode"]["tokens_per_s"]
        lines.append(f"| {c['threads']} | {c['load_s']:.2f} | {prefill} | {first:.3f} | {d['median']:.1f} "
                     f"({d['low']:.1f}–{d['high']:.1f}) | {c['decode']['cpu_s_per_token']['median']:.4f} | "
                     f"{c['peak_rss_mib']:.0f} |")
    pm = report["power_mode"]
    lines += ["", f"Power mode: {pm['threads']} thread(s), {pm['decode_tokens_per_s']:.1f} tok/s, "
              f"{pm['tokens_per_cpu_s']:.1f} tokens per CPU-second (fastest: {pm['fastest_threads']} threads, "
              f"{pm['fastest_decode_tokens_per_s']:.1f} tok/s, {pm['fastest_tokens_per_cpu_s']:.1f} tokens per CPU-second).",
              "", "| context | recurrent + conv state MiB | KV cache MiB | total MiB |", "|---|---|---|---|"]
    for s in report["state_memory"]:
        lines.append(f"| {s['context']:,} | {s['recurrent_and_conv_bytes'] / 2**20:.2f} | "
                     f"{s['kv_cache_bytes'] / 2**20:.2f} | {s['total_bytes'] / 2**20:.2f} |")
    if report.get("peers") or report.get("skipped_peers"):
        lines += ["", "Peers (same machine, same prompts, each configuration in a fresh process):", "",
                  "| peer | threads | " + " | ".join(f"prefill {k} tok/s" for k in report["configs"][0]["prefill"])
                  + " | decode tok/s | CPU-s/token | peak RSS MiB |", "|---" * (5 + len(report["configs"][0]["prefill"])) + "|"]
        for p in report.get("peers", []):
            prefill = " | ".join(f"{p['prefill'][k]['tokens_per_s']:.1f}" if k in p["prefill"] else "-"
                                 for k in report["configs"][0]["prefill"])
            lines.append(f"| {p['peer']} | {p['threads']} | {prefill} | {p['decode']['tokens_per_s']['median']:.1f} | "
                         f"{p['decode']['cpu_s_per_token']['median']:.4f} | {p['peak_rss_mib']:.0f} |")
        for name, reason in report.get("skipped_peers", {}).items():
            lines.append(f"| {name} | skipped: {reason} | |")
        if report.get("ratios"):
            lines += ["", "| qwen-edge ÷ peer | threads | decode speed | prefill speed | CPU-s/token | peak RSS |",
                      "|---|---|---|---|---|---|"]
            for r in report["ratios"]:
                prefill = ", ".join(f"{k.split('_')[1]}: {v:.2f}×" for k, v in r.items() if k.startswith("prefill_"))
                lines.append(f"| {r['peer']} | {r['threads']} | {r['decode_speed_ratio']:.2f}× | {prefill} | "
                             f"{r['cpu_s_per_token_ratio']:.2f}× | {r['peak_rss_ratio']:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":  # worker: one configuration, JSON on the last stdout line
    export, variant, threads, lengths, tokens, reps = sys.argv[1:7]
    print(json.dumps(measure_config(Path(export), variant, int(threads), [int(x) for x in lengths.split(",")],
                                    int(tokens), int(reps))))
