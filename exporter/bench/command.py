"""`qwen-edge bench`: measure an export (runtime_py/bench.py), optionally beside the peers, and write the report."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from default_model import resolve_checkpoint
from exporter.atomic import overlap
from exporter.bench.report import write_report
from graphs.config import check_within_context, load_text_config
from graphs.errors import QwenEdgeError
from runtime_py.bench import run_benchmark
from runtime_py.export_format import export_variants


@dataclass(frozen=True)
class BenchRequest:
    export_dir: Path
    variant: str | None = None  # None: the first variant exported
    threads: tuple[int, ...] | None = None  # None: 1 and every core
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_tokens: int = 128
    repeats: int = 3
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    out_dir: Path = Path("bench_out")
    compare: str | Path | None = None  # a checkpoint to run the peers on


def run_bench(request: BenchRequest, note: Callable[[str], None]) -> tuple[dict, list[Path]]:
    """The report and the files written; `note` receives one line per skipped optional part (a peer, the plots)."""
    threads = list(request.threads or sorted({1, os.cpu_count() or 1}))
    variant = request.variant or export_variants(request.export_dir)[0]
    inputs = [request.export_dir] + ([resolve_checkpoint(request.compare)] if request.compare is not None else [])
    how = overlap(request.out_dir, inputs)
    if how is not None:
        raise QwenEdgeError(f"--out {request.out_dir}: the output folder {how}; an input is never written to, "
                            "so choose an output path outside it")
    check_within_context(load_text_config(request.export_dir),
                         max(request.prompt_lengths) + request.decode_tokens, "--prompt-lengths + --decode-tokens")
    report = run_benchmark(request.export_dir, variant, threads, list(request.prompt_lengths), request.decode_tokens,
                           request.repeats, list(request.contexts))
    if request.compare is not None:
        report.update(_compare_peers(report, resolve_checkpoint(request.compare), threads, request, note))
    return report, write_report(report, request.out_dir, note)


def _compare_peers(report: dict, checkpoint: Path, threads: list[int], request: BenchRequest,
                   note: Callable[[str], None]) -> dict:
    from exporter.bench.peers import build_genai_export, missing_peer, ratios, run_peer

    peers, skipped = [], {}
    for name, kind in (("onnxruntime-genai", "genai"), ("transformers", "transformers")):
        reason = missing_peer(name)
        if reason:
            skipped[name] = reason
            note(f"skipping {name}: {reason}")
            continue
        path = build_genai_export(checkpoint, request.out_dir / "peers" / "genai-int4") if kind == "genai" else checkpoint
        for t in threads:
            peers.append(run_peer(kind, path, t, list(request.prompt_lengths), request.decode_tokens, request.repeats))
    from exporter.bench.llama_cpp import LlamaCppUnavailable, measure_llama_bench, quantized_models

    try:
        src, models = quantized_models(checkpoint, request.out_dir / "peers" / "llama.cpp")
        for name, gguf in models.items():
            for t in threads:
                peers.append(measure_llama_bench(src, gguf, t, list(request.prompt_lengths), request.decode_tokens,
                                                 request.repeats, name))
    except LlamaCppUnavailable as why:
        skipped["llama.cpp"] = str(why)
        note(f"skipping llama.cpp: {why}")
    return {"peers": peers, "skipped_peers": skipped, "ratios": ratios(report["configs"], peers)}
