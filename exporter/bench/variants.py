"""Benchmark: every weight variant in both formats, in one table (size, quality, ONNX speed).

    .venv/bin/python -m exporter.bench.variants --preset qwen3.5-0.8b --threads 2

Size and speed need the real shape (random weights); quality needs trained weights, so it is measured
on the embedded default model. The rows join four measurements, each its own process:
- ONNX size and speed: one `qwen-edge export` of the preset with every ONNX scheme (default options),
  then `qwen-edge bench --variant V` per variant, interleaved over rounds (the machine is shared:
  speeds are compared as ratios to q4 within this run);
- Core ML size: `exporter.bench.coreml`'s record for the preset (it is run for the options it lacks);
- quality: `qwen-edge verify --against default` of the default model's exports in both formats
  (Core ML through the MIL interpreter).
Results go to bench_out/variants_<preset>.json and into BENCHMARKS.md between markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

from exporter.bench.coreml import record_path as coreml_record_path
from exporter.bench.export import (QWEN_EDGE, ROOT, SHARD_BYTES, ensure_random_checkpoint, machine, replace_section,
                                   run_measured)
from exporter.pipeline import files_bytes
from quant.schemes import SCHEMES
from runtime_py.export_format import read_manifest, variant_files

ONNX_SCHEMES = [s.name for s in SCHEMES.values() if s.onnx]
COREML_SCHEMES = list(SCHEMES)


def _checked(cmd: list[str]) -> dict:
    run = run_measured(cmd)
    if run["exit"] != 0:
        sys.exit(f"failed (exit {run['exit']}): {run['command']}")
    return run


def onnx_size_and_speed(preset: str, work: Path, threads: int, rounds: int, decode_tokens: int) -> dict:
    """{variant: {bytes, decode, prefill, rss}} of the preset exported with every ONNX scheme."""
    ck, export = work / "checkpoint", work / "export-variants"
    ensure_random_checkpoint(preset, ck, SHARD_BYTES)
    export_run = _checked([*QWEN_EDGE, "export", str(ck), str(export), "--force", "--quiet",
                           "--quant", ",".join(ONNX_SCHEMES)])
    variants = read_manifest(export)["variants"]
    runs: dict[str, list[dict]] = {name: [] for name in ONNX_SCHEMES}
    for r in range(rounds):  # forwards, then backwards: each variant sees early and late machine states
        for name in ONNX_SCHEMES if r % 2 == 0 else ONNX_SCHEMES[::-1]:
            out = ROOT / "bench_out" / f"variants-{preset}" / f"{name}-round{r}"
            _checked([*QWEN_EDGE, "bench", str(export), "--variant", name, "--threads", str(threads),
                      "--prompt-lengths", "128", "--decode-tokens", str(decode_tokens), "--repeats", "3",
                      "--contexts", "1024", "--out", str(out)])
            runs[name].append(json.loads((out / "bench.json").read_text())["configs"][0])
    return {"export": export_run, "variants": {name: {
        "bytes": variants[name]["bytes_on_disk"],
        "text_bytes": text_bytes(export, variants[name]),
        "decode_tok_s": statistics.median(c["decode"]["tokens_per_s"]["median"] for c in runs[name]),
        "decode_rounds": [c["decode"]["tokens_per_s"]["median"] for c in runs[name]],
        "prefill_tok_s": statistics.median(c["prefill"]["128"]["tokens_per_s"] for c in runs[name]),
        "peak_rss_mib": max(c["peak_rss_mib"] for c in runs[name]),
    } for name in ONNX_SCHEMES}}


def text_bytes(export: Path, record: dict) -> int:
    """Bytes of the text model alone: embed_tokens + decoder with their data files (no MTP head)."""
    return files_bytes(export, variant_files(export, {key: value for key, value in record.items() if key != "mtp"}))


def coreml_sizes(preset: str) -> dict:
    """{option: record} from exporter.bench.coreml, converting the options its record lacks."""
    path = coreml_record_path(preset)
    have = json.loads(path.read_text()) if path.is_file() else {}
    missing = [name for name in COREML_SCHEMES if "bytes" not in have.get(name, {})]
    if missing:
        subprocess.run([sys.executable, "-m", "exporter.bench.coreml", "--preset", preset, "--quant", ",".join(missing)],
                       cwd=ROOT, check=True)
    return json.loads(path.read_text())


def default_model_quality(work: Path, tokens: int) -> dict:
    """{format: verify --json report} of the default model exported with every scheme of that format."""
    reports = {}
    for fmt, names, extra in (("onnx", ONNX_SCHEMES, []), ("coreml", COREML_SCHEMES, ["--context", "256"])):
        export, report = work / f"default-{fmt}", work / f"quality-{fmt}.json"
        _checked([*QWEN_EDGE, "export", "--format", fmt, "default", str(export), "--force", "--quiet",
                  "--quant", ",".join(names), *extra])
        run = run_measured([*QWEN_EDGE, "verify", "--format", fmt, str(export), "--against", "default",
                            "--tokens", str(tokens), "--json", str(report)])
        if not report.is_file():  # exit 1 with a report is a failed gate, which the table shows
            sys.exit(f"failed (exit {run['exit']}): {run['command']}")
        reports[fmt] = json.loads(report.read_text())
    return reports


def _quality_cells(report: dict, name: str) -> str:
    v = next(v for v in report["variants"] if v["variant"] == name)
    return (f"{v['top1_agreement']:.2%} | {v['mean_kl']:.2e} | {v['perplexity_increase']:+.2%} | "
            f"{'pass' if v['passed'] else 'FAIL'}")


def table(onnx: dict, coreml: dict, quality: dict) -> str:
    base = onnx["variants"]["q4"]["decode_tok_s"]
    lines = ["| format | variant | bytes | GB | text model GB | top-1 | mean KL | Δppl | gate | decode tok/s | × q4 | prefill 128 tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ONNX_SCHEMES:
        v = onnx["variants"][name]
        lines.append(f"| ONNX | {name} | {v['bytes']:,} | {v['bytes'] / 1e9:.3f} | {v['text_bytes'] / 1e9:.3f} | "
                     f"{_quality_cells(quality['onnx'], name)} | {v['decode_tok_s']:.1f} | "
                     f"{v['decode_tok_s'] / base:.2f} | {v['prefill_tok_s']:.1f} |")
    for name in COREML_SCHEMES:
        size = coreml.get(name, {})
        cells = f"{size['bytes']:,} | {size['bytes'] / 1e9:.3f} | {size['bytes'] / 1e9:.3f}" if "bytes" in size else "not converted | |"
        lines.append(f"| Core ML | {name} | {cells} | "
                     f"{_quality_cells(quality['coreml'], name)} | not run (Linux) | | |")
    legend = [f"- {name}: {scheme.doc}" for name, scheme in SCHEMES.items()]
    return "\n".join(lines + [""] + legend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved bench rounds per ONNX variant")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored for quality")
    parser.add_argument("--from-record", action="store_true", help="only rewrite the section from the last run's record")
    args = parser.parse_args()
    path = ROOT / "bench_out" / f"variants_{args.preset}.json"
    if not args.from_record:
        started = dt.datetime.now(dt.timezone.utc)
        quality = default_model_quality(args.work / "default", args.tokens)
        coreml = coreml_sizes(args.preset)
        onnx = onnx_size_and_speed(args.preset, args.work / args.preset, args.threads, args.rounds, args.decode_tokens)
        record = {"preset": args.preset, "machine": machine(), "started": started.isoformat(timespec="minutes"),
                  "threads": args.threads, "rounds": args.rounds, "decode_tokens": args.decode_tokens,
                  "tokens": args.tokens, "onnx": onnx, "coreml_sizes": coreml, "quality": quality}
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    body = section(json.loads(path.read_text()))
    replace_section(args.out, f"variants:{args.preset}", body)
    print(body)


def section(record: dict) -> str:
    preset, threads, quality, coreml = record["preset"], record["threads"], record["quality"], record["coreml_sizes"]
    rounds, decode_tokens, tokens = record["rounds"], record["decode_tokens"], record["tokens"]
    coreml_dates = ", ".join(sorted({r["date"] for r in coreml.values() if "date" in r}))
    positions = quality["onnx"]["variants"][0]["positions"]
    return f"""## Every variant in both formats: size ({preset} shape), quality (default model), ONNX speed

Measured {record['started'].replace('T', ' ')[:16]} UTC on {record['machine']} (Core ML sizes: {coreml_dates}, by
`exporter.bench.coreml`). Command: `.venv/bin/python -m exporter.bench.variants --preset {preset} --threads {threads}`.
- Bytes: the variant on disk as the manifest records it ({preset} shape, random weights with an MTP head, default
  export options): ONNX embed_tokens + decoder + MTP head graphs with their data files (the vision encoder
  not counted; "text model" without the MTP head); Core ML the text .mlpackage at context 4096 (no MTP head).
- Quality: `qwen-edge verify [--format coreml] OUT --against default --tokens {tokens}` on the default model's
  exports ({positions} scored positions of held-out text, token by token; Core ML through the NumPy MIL interpreter);
  gates as in the README.
- Speed: `qwen-edge bench EXPORT --variant V --threads {threads} --prompt-lengths 128 --decode-tokens {decode_tokens}`,
  median of 3 after a warm-up, each variant {rounds}× in its own process, rounds interleaved; the median of the
  rounds, and its ratio to q4 in this run. Core ML cannot run on Linux.

{table(record["onnx"], coreml, quality)}
"""


if __name__ == "__main__":
    main()
