"""Write a benchmark report: JSON (machine-readable), Markdown table, and PNG plots."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from runtime_py.bench import markdown_table


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """speed.png: prefill and decode tok/s per thread count; memory.png: state memory vs context;
    peers.png where peers ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    threads = [c["threads"] for c in configs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(threads, [c["decode"]["tokens_per_s"]["median"] for c in configs], "o-", label="decode")
    for length in configs[0]["prefill"]:
        ax.plot(threads, [c["prefill"][length]["tokens_per_s"] for c in configs], "s--", label=f"prefill {length}")
    ax.set(xlabel="threads", ylabel="tokens / s", title=f"{report['variant']}: speed per thread count", xticks=threads)
    ax.set_yscale("log")
    ax.legend()
    speed = out_dir / "speed.png"
    fig.tight_layout()
    fig.savefig(speed, dpi=100)
    plt.close(fig)

    mem = report["state_memory"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = [m["context"] for m in mem]
    ax.plot(ctx, [m["recurrent_and_conv_bytes"] / 2**20 for m in mem], "o-", label="recurrent + conv state (fixed)")
    ax.plot(ctx, [m["kv_cache_bytes"] / 2**20 for m in mem], "s-", label="KV cache (attention layers)")
    ax.plot(ctx, [m["total_bytes"] / 2**20 for m in mem], "k--", label="total")
    ax.set(xlabel="context (tokens)", ylabel="MiB per sequence", title="state memory vs context")
    ax.set_xscale("log", base=2)
    ax.legend()
    memory = out_dir / "memory.png"
    fig.tight_layout()
    fig.savefig(memory, dpi=100)
    plt.close(fig)
    return [speed, memory, *([_peer_bars(report, out_dir, plt)] if report.get("peers") else [])]


def _peer_bars(report: dict, out_dir: Path, plt) -> Path:  # noqa: ANN001
    """peers.png: one bar per tool (qwen-edge and each peer) at the most threads measured, for prefill
    of the longest prompt, decode, peak RSS and CPU-seconds per token."""
    threads = max(c["threads"] for c in report["configs"])
    ours = next(c for c in report["configs"] if c["threads"] == threads)
    tools = [(f"qwen-edge {report['variant']}", ours)] + [(p["peer"], p) for p in report["peers"] if p["threads"] == threads]
    length = max(ours["prefill"], key=int)
    panels = [(f"prefill {length} (tok/s)", lambda r: r["prefill"].get(length, {}).get("tokens_per_s", 0.0)),
              ("decode (tok/s)", lambda r: r["decode"]["tokens_per_s"]["median"]),
              ("peak RSS (MiB)", lambda r: r["peak_rss_mib"]),
              ("CPU-s per token", lambda r: r["decode"]["cpu_s_per_token"]["median"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, value) in zip(axes, panels):
        ax.bar(range(len(tools)), [value(r) for _, r in tools], color=["C0"] + ["C7"] * (len(tools) - 1))
        ax.set_xticks(range(len(tools)), [name for name, _ in tools], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"{threads} threads, same run")
    fig.tight_layout()
    path = out_dir / "peers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PLOTS_NEED = "plots skipped: matplotlib is not installed (pip install 'qwen-edge[bench]' for them)"


def write_report(report: dict, out_dir: Path, note: Callable[[str], None] = lambda line: None) -> list[Path]:
    """bench.json and bench.md always; the plots when matplotlib is installed (else `note` says so)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown_table(report) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        note(PLOTS_NEED)
        return [json_path, md_path]
    return [json_path, md_path, *write_plots(report, out_dir)]
