"""Benchmark: export and verify a random-weight checkpoint of a real Qwen3.5 shape.

    .venv/bin/python -m exporter.bench.export --preset qwen3.5-0.8b

Each stage runs as its own process so its wall time and peak resident memory (from the kernel's
rusage of that process) are measured separately. Results go to bench_out/export_<preset>.json and
into BENCHMARKS.md between markers for that preset.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from runtime_py.export_format import read_manifest

ROOT = Path(__file__).resolve().parents[2]
QWEN_EDGE = [sys.executable, "-m", "exporter.cli"]
SHARD_BYTES = 5 * 10**9  # safetensors shards of at most 5 GB with an index, as the published checkpoints


def run_measured(cmd: list[str], quiet: bool = False) -> dict:
    """Run cmd (its output dropped when `quiet`); return wall and CPU seconds, peak RSS (MiB) and exit
    code. The kernel gives the peak of the tree's largest process; a qwen-edge export also prints its
    own peak with its helpers added (exporter/progress.py), and the larger of the two is kept."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL if quiet else None)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode(errors="replace")
    if not quiet:
        sys.stdout.write(text)
    printed = re.findall(r"peak memory ([0-9.]+) GiB", text)
    peak_mib = max([usage.ru_maxrss / 1024] + [float(gib) * 1024 for gib in printed])
    code = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(peak_mib), "exit": code}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def folder_size_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def replace_section(doc: Path, key: str, body: str) -> None:
    """Put `body` between `<!-- key -->` markers in doc (appending the section if new)."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def random_checkpoint_command(preset: str, folder: Path, max_shard_bytes: int | None = None) -> list[str]:
    """The process that writes a random-weight checkpoint of `preset` to `folder` (its own process, so
    its time and memory are measured apart; sharded, with an index, when `max_shard_bytes` is given)."""
    shards = "" if max_shard_bytes is None else f", max_shard_bytes={max_shard_bytes}"
    return [sys.executable, "-c", "from graphs.config import preset_config_dict as p; "
            "from graphs.random_checkpoint import write_random_checkpoint as w; "
            f"w(p('{preset}'), '{folder}'{shards})"]


def ensure_random_checkpoint(preset: str, folder: Path, max_shard_bytes: int | None = None) -> None:
    """Write the checkpoint unless `folder` already holds one."""
    if not (folder / "config.json").is_file():
        subprocess.run(random_checkpoint_command(preset, folder, max_shard_bytes), cwd=ROOT, check=True)


def verify_stage(variant: str) -> str:
    """The stage name of one variant's verify run (the record's key)."""
    return f"verify {variant} (prompts 1/64/130, 32 decode steps)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--quant", default="fp32", help="variants to export (the size table lists each)")
    parser.add_argument("--block-size", default="32", choices=["32", "64", "128"])
    parser.add_argument("--verify-all", action="store_true", help="verify every exported variant (default: fp32 or the first)")
    parser.add_argument("--quality-default", action="store_true",
                        help="instead: the quality table of every variant of the default model")
    parser.add_argument("--speed", metavar="VARIANT", default=None,
                        help="instead: run `qwen-edge bench` on this variant of the preset's export")
    parser.add_argument("--no-compare", action="store_true",
                        help="with --speed: skip the peers (onnxruntime-genai, transformers); otherwise: skip "
                             "llama.cpp's convert + quantize (its GGUF files of the 9B shape need 23 GB more disk)")
    args = parser.parse_args()
    if args.quality_default:
        quality_default(args.work / "default", args.out)
        return
    if args.speed:
        speed(args.preset, args.speed, args.work / args.preset, args.quant, args.block_size, args.out,
              compare=not args.no_compare)
        return
    work = args.work / args.preset
    ck, export = work / "checkpoint", work / "export"
    work.mkdir(parents=True, exist_ok=True)

    quants = [q.strip() for q in args.quant.split(",")]
    # the variants verify checks against the reference (each against its own rounded weights)
    checked = quants if args.verify_all else ["fp32" if "fp32" in quants else quants[0]]
    reports = {name: work / f"verify-{name}.json" for name in checked}
    stages: dict[str, list[str] | Callable[[], list[str]]] = {
        "write random checkpoint (bf16, sharded)": random_checkpoint_command(args.preset, ck, SHARD_BYTES),
        f"export ({args.quant})": [*QWEN_EDGE, "export", str(ck), str(export), "--force", "--quiet",
                                   "--quant", args.quant, "--block-size", args.block_size],
        **{verify_stage(name): [*QWEN_EDGE, "verify", str(ck), str(export), "--variant", name,
                                "--prompt-lengths", "1,64,130", "--json", str(path)] for name, path in reports.items()},
    }
    peer_note = ""
    if "q4" in quants and not args.no_compare:  # the peer's convert + quantize of the same checkpoint, its nearest format (Q4_0)
        from exporter.bench.llama_cpp import (LlamaCppUnavailable, build_llama_cpp, convert_command, peer_input,
                                              quantize_command)

        try:
            src = build_llama_cpp(args.work / "llama.cpp")
            gguf = work / "llama-bf16.gguf"
            # built when it runs: the converter's flags depend on the checkpoint's tensors
            stages["llama.cpp: convert to bf16 GGUF (peer)"] = lambda: convert_command(
                src, peer_input(ck, work / "llama-input"), gguf)
            stages["llama.cpp: quantize to Q4_0 (peer)"] = quantize_command(src, gguf, work / "llama-q4_0.gguf")
        except LlamaCppUnavailable as why:
            peer_note = f"llama.cpp (peer) skipped: {why}."
            print(peer_note, flush=True)
    for path in reports.values():  # removed before the run: none read below is stale
        path.unlink(missing_ok=True)
    results = {}
    for name, cmd in stages.items():
        print(f"== {name}", flush=True)
        results[name] = run_measured(cmd() if callable(cmd) else cmd, quiet="(peer)" in name)
        if results[name]["exit"] != 0 and "verify" not in name and "(peer)" not in name:
            sys.exit(f"stage failed: {name}")
    verified = {name: json.loads(path.read_text()) for name, path in reports.items() if path.is_file()}
    variants = read_manifest(export)["variants"]
    record = {
        "preset": args.preset,
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "stages": results,
        "checkpoint_mib": folder_size_mib(ck),
        "export_mib": folder_size_mib(export),
        "verify": {name: {"passed": v["passed"], "rtol": v["rtol"], "reference": v["reference"],
                          "worst_relative_diff": max(s["max_abs_diff"] / max(1, s["logit_scale"])
                                                     for p in v["prompts"] for s in p["steps"]),
                          "greedy_agreement": min(p["greedy_agreement"] for p in v["prompts"])}
                   for name, v in verified.items()},
        "variant_bytes": {name: v["bytes_on_disk"] for name, v in variants.items()},
    }
    (ROOT / "bench_out").mkdir(exist_ok=True)
    (ROOT / "bench_out" / f"export_{args.preset}_{args.quant.replace(',', '-')}_b{args.block_size}.json").write_text(json.dumps(record, indent=2) + "\n")

    peers = [r for name, r in results.items() if "(peer)" in name]
    if len(peers) == 2 and all(r["exit"] == 0 for r in peers):
        ours = results[f"export ({args.quant})"]
        theirs = {k: sum(r[k] for r in peers) for k in ("wall_s", "cpu_s")}
        peer_note = (f"qwen-edge export ({args.quant}) against llama.cpp's convert + quantize of the same checkpoint: "
                     f"{ours['wall_s'] / theirs['wall_s']:.2f}× the wall time, {ours['cpu_s'] / theirs['cpu_s']:.2f}× "
                     f"the CPU time (lower is faster); peak RSS {ours['peak_rss_mib']} MiB against "
                     f"{max(r['peak_rss_mib'] for r in peers)} MiB.")
    rows = "\n".join(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mib']} | {r['exit']} |"
                     for name, r in results.items())
    size_rows = "\n".join(f"| {name} | {b:,} | {b / 1e9:.3f} | {b / 2**20:.1f} |"
                          for name, b in record["variant_bytes"].items())
    verify_rows = "\n".join(
        f"| {name} | {'PASS' if v['passed'] else 'FAIL'} | {v['worst_relative_diff']:.2e} | {v['rtol']:g} | {v['greedy_agreement']:.0%} |"
        for name, v in record["verify"].items()) or "| (no verify report) | | | | |"
    command = (f".venv/bin/python -m exporter.bench.export --preset {args.preset} --quant {args.quant} --block-size {args.block_size}"
               + (" --verify-all" if args.verify_all else "") + (" --no-compare" if args.no_compare else ""))
    body = f"""## Export of the {args.preset} shape (random weights), {args.quant}, block {args.block_size}

Measured {record['date']} on {record['machine']}.
Command: `{command}` (each stage a separate process;
peak RSS is the kernel's maxrss of that process; for the export the larger of that and the peak it prints,
which adds its vision-trace helper's peak).

| stage | wall time (s) | CPU time (s) | peak RSS (MiB) | exit |
|---|---|---|---|---|
{rows}
{peer_note}

Checkpoint {record['checkpoint_mib']} MiB (bf16). Verify (each variant vs the PyTorch reference computing with that
variant's own rounded weights; compressed MatMulNBits run in fp32 for the check):

| variant | result | worst per-call max \|Δlogits\| / logit scale | tolerance | greedy agreement |
|---|---|---|---|---|
{verify_rows}

Size on disk per variant as the manifest records it: embed_tokens + decoder_model_merged, and the MTP head's
graph where the checkpoint has one, with their data files (tied embedding stored once in the quantized
variants; the vision encoder not counted; block size {args.block_size}, symmetric):

| variant | bytes | GB (10⁹) | MiB |
|---|---|---|---|
{size_rows}
"""
    replace_section(args.out, f"export:{args.preset}:{args.quant}:{args.block_size}", body)
    print(body)
    write_size_summary(args.out, args.quant, args.block_size)


def write_size_summary(doc: Path, quant: str, block_size: str) -> None:
    """One table over every preset measured with this `--quant`: export time and memory, each
    variant's verify and size (the records the per-preset runs wrote)."""
    from graphs.config import preset_names

    key = f"sizes:{quant}:{block_size}"
    text = doc.read_text() if doc.is_file() else ""
    earlier = text[text.index(f"<!-- {key} -->") : text.index(f"<!-- /{key} -->")] if f"<!-- /{key} -->" in text else ""
    rows = []
    for preset in preset_names():
        path = ROOT / "bench_out" / f"export_{preset}_{quant.replace(',', '-')}_b{block_size}.json"
        if not path.is_file():  # measured in another checkout or run: its rows stay as written
            rows += [line for line in earlier.splitlines() if line.startswith(f"| {preset} |")]
            continue
        record = json.loads(path.read_text())
        export = next(r for name, r in record["stages"].items() if name.startswith("export"))
        for variant, size in record["variant_bytes"].items():
            run = record["stages"].get(verify_stage(variant))
            check = record.get("verify", {}).get(variant)
            verdict = ("not run" if run is None else f"killed or failed (exit {run['exit']})" if check is None
                       else f"{'PASS' if check['passed'] else 'FAIL'} ({check['worst_relative_diff']:.1e})")
            verify_cells = "| |" if run is None else f"{run['wall_s']} | {run['peak_rss_mib']:,} |"
            rows.append(f"| {preset} | {record['date']} | {export['wall_s']} | {export['peak_rss_mib']:,} | {variant} | "
                        f"{size:,} | {verdict} | {verify_cells}")
    body = f"""## Every size, {quant} (block {block_size}): export, verify and size (random weights)

One `qwen-edge export CHECKPOINT OUT --quant {quant}` per size (all variants in one call), then one
`qwen-edge verify CHECKPOINT OUT --variant V` per variant (each against the reference computing with that variant's
own rounded weights); each a separate process, peak RSS the kernel's maxrss (for the export, with its vision-trace
helper added as `run_measured` says). Rows come from
`.venv/bin/python -m exporter.bench.export --preset P --quant {quant} --verify-all` (dates per row; machines in
each preset's own section above).

| size | date | export s | export peak MiB | variant | bytes | verify (worst Δ / logit scale) | verify s | verify peak MiB |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    replace_section(doc, key, body)


def speed(preset: str, variant: str, work: Path, quant: str, block_size: str, doc: Path, compare: bool = True) -> None:
    """Export the preset (random weights) with `quant` and benchmark one variant with `qwen-edge bench`."""
    name = f"{preset}-{variant}" + ("" if block_size == "32" else f"-b{block_size}")
    ck, export, out = work / "checkpoint", work / "export-speed", ROOT / "bench_out" / name
    ensure_random_checkpoint(preset, ck)
    # contrib recurrent ops: ORT's CPU kernels for them are fused (the opset-27 ones expand to Scan + Conv)
    subprocess.run([*QWEN_EDGE, "export", str(ck), str(export), "--force", "--quiet", "--quant", quant,
                    "--block-size", block_size, "--recurrent-ops", "contrib"], cwd=ROOT, check=True)
    command = [*QWEN_EDGE, "bench", str(export), "--variant", variant, "--out", str(out)]
    command += ["--compare", str(ck)] if compare else []
    subprocess.run(command, cwd=ROOT, check=True)
    report = json.loads((out / "bench.json").read_text())
    write_speed_section(doc, preset, variant, block_size, quant, report, name, compare)


def write_speed_section(doc: Path, preset: str, variant: str, block_size: str, quant: str, report: dict,
                        name: str, compare: bool) -> None:
    from runtime_py.bench import markdown_table

    body = f"""## Speed of the {preset} shape, {variant} (block {block_size}), random weights

Measured {dt.date.today().isoformat()} on {machine()}.
Command: `qwen-edge bench EXPORT --variant {variant}{" --compare CHECKPOINT" if compare else ""}` on an export made with
`--quant {quant} --block-size {block_size} --recurrent-ops contrib` (via `.venv/bin/python -m exporter.bench.export --preset {preset}
--speed {variant} --quant {quant} --block-size {block_size}{"" if compare else " --no-compare"}`); median of 3 runs after 1 warm-up,
min–max in brackets; each thread count{" and each peer" if compare else ""} in a fresh process.
Plots: `bench_out/{name}/speed.png`, `memory.png`.

{markdown_table(report)}
"""
    replace_section(doc, f"speed:{preset}:{variant}:{block_size}", body)
    print(body)


def quality_default(work: Path, doc: Path) -> None:
    """Export the default model in every scheme and measure each against the PyTorch reference."""
    export, report = work / "export", work / "quality.json"
    work.mkdir(parents=True, exist_ok=True)
    schemes = "fp32,fp16,q8,q4,q4f16"
    cmds = [[*QWEN_EDGE, "export", "default", str(export), "--force", "--quiet", "--quant", schemes],
            [*QWEN_EDGE, "verify", str(export), "--against", "default", "--tokens", "2048", "--json", str(report)]]
    for cmd in cmds:
        subprocess.run(cmd, cwd=ROOT, check=False)
    data = json.loads(report.read_text())
    sizes = read_manifest(export)["variants"]
    rows = "\n".join(
        f"| {v['variant']} | {v['top1_agreement']:.2%} | {v['mean_kl']:.2e} | {v['perplexity']:.4f} | "
        f"{v['perplexity_increase']:+.2%} | {v['greedy_agreement']:.1%} | {sizes[v['variant']]['bytes_on_disk'] / 2**20:.2f} | "
        f"{'pass' if v['passed'] else 'FAIL'} (top-1 ≥ {v['gate']['min_top1']:.0%}, KL ≤ {v['gate']['max_kl']:g}, "
        f"Δppl ≤ {v['gate']['max_ppl_increase']:.1%}) |" for v in data["variants"])
    body = f"""## Quantization quality on the default model

Measured {dt.date.today().isoformat()} on {machine()}.
Commands: `qwen-edge export default OUT --quant {schemes}` then
`qwen-edge verify OUT --against default --tokens 2048` (via `.venv/bin/python -m exporter.bench.export --quality-default`).
Reference: the PyTorch fp32 decoder; text: `default_model/heldout.txt` (held out from training),
{data['variants'][0]['positions']} scored positions; variants run token by token (decode path), block size 32,
symmetric, accuracy level 4. Reference perplexity {data['variants'][0]['reference_perplexity']:.4f}.

| variant | top-1 agreement | mean KL | perplexity | Δppl | greedy agreement | MiB | gate |
|---|---|---|---|---|---|---|---|
{rows}

Greedy agreement is the share of 32 greedy tokens produced before the first divergence, over 4
prompts; the synthetic training grammar has many near-equal choices (names, numbers), so a tiny
logit change can switch a branch: read it together with KL and perplexity.
"""
    replace_section(doc, "quality:default", body)
    print(body)


if __name__ == "__main__":
    main()
