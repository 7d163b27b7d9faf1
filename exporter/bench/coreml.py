"""Benchmark: Core ML conversion of a random-weight checkpoint of a real Qwen3.5 shape.

    .venv/bin/python -m exporter.bench.coreml --preset qwen3.5-0.8b --quant q4,fp16,p4

Each weight option is converted by its own `qwen-edge export --format coreml` process, one at a
time, so wall time and peak resident memory (the kernel's maxrss of that process) belong to that
option alone. Results go to bench_out/coreml_<preset>.json and into BENCHMARKS.md between markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from exporter.bench.export import (QWEN_EDGE, ROOT, ensure_random_checkpoint, folder_size_mib, machine,
                                   replace_section, run_measured)
from runtime_py.export_format import read_manifest


def record_path(preset: str) -> Path:
    """Where the per-option results of this benchmark accumulate across runs."""
    return ROOT / "bench_out" / f"coreml_{preset}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--quant", default="fp32,fp16,q8,q4,q4f16,p4")
    parser.add_argument("--context", default="4096")
    parser.add_argument("--chunk", default="64")
    args = parser.parse_args()
    work = args.work / args.preset
    ck = work / "checkpoint"
    ensure_random_checkpoint(args.preset, ck)
    record = record_path(args.preset)
    record.parent.mkdir(exist_ok=True)
    results = json.loads(record.read_text()) if record.is_file() else {}
    for name in filter(None, args.quant.split(",")):  # --quant "" only rewrites the section
        export = work / f"coreml-{name}"
        print(f"== Core ML {name}", flush=True)
        run = run_measured([*QWEN_EDGE, "export", "--format", "coreml", str(ck), str(export), "--quant", name,
                            "--context", args.context, "--chunk", args.chunk, "--force", "--quiet"])
        if run["exit"] == 0:
            variant = read_manifest(export)["variants"][name]
            run.update(bytes=variant["bytes_on_disk"], weights=variant["weights"], compute=variant["compute_precision"])
        run.update(date=dt.date.today().isoformat(), context=args.context, chunk=args.chunk)
        results[name] = run
        record.write_text(json.dumps(results, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {r.get('compute', '?')} | {r.get('weights', '?')} | {r['wall_s']} | {r['peak_rss_mib']:,} | "
        + (f"{r['bytes']:,} | {r['bytes'] / 2**20:,.1f} |" if 'bytes' in r else f"failed (exit {r['exit']}) | |")
        for name, r in results.items())
    dates = ", ".join(sorted({r["date"] for r in results.values()}))
    body = f"""## Core ML conversion of the {args.preset} shape (random weights)

Measured {dates} on {machine()} (shared with other jobs, so times are upper bounds).
Command: `.venv/bin/python -m exporter.bench.coreml --preset {args.preset} --quant NAMES`: per weight option one
`qwen-edge export --format coreml CHECKPOINT OUT --quant NAME --context {args.context} --chunk {args.chunk}`
process (trace + convert of `prefill` and `decode`, weight compression, multifunction merge); peak RSS is
the kernel's maxrss of that process. Checkpoint {folder_size_mib(ck)} MiB (bf16).

| option | compute | weights | wall time (s) | peak RSS (MiB) | package bytes | MiB |
|---|---|---|---|---|---|---|
{rows}
"""
    replace_section(args.out, f"coreml:{args.preset}", body)
    print(body)


if __name__ == "__main__":
    main()
