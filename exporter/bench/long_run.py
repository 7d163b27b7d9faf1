"""Long runs stay sane: decode many tokens after a long prompt with the fp16 and q4 variants of the default
model, against the fp32 variant on the same tokens.

The fp32 variant decodes greedily; fp16 and q4 are fed the same tokens (teacher forcing), so every step
compares logits for one context: relative logit drift (max |Δ| / fp32 logit scale), greedy agreement
(argmax equal), the norms of each state kind (recurrent, conv, KV) over time, and NaN/Inf. This is
an evidence run, not a test:

    nice -n 10 .venv/bin/python -m exporter.bench.long_run --prompt-tokens 1024 --decode-tokens 8192 \\
        --out build/long_run

writes long_run.json (every 64th step, plus summaries) and, with matplotlib, long_run.png. The default
model's config says 4,096 positions; the graphs take any length, so positions past it are RoPE
extrapolation (the table says where that starts).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from default_model import CHECKPOINT_DIR
from graphs.config import load_text_config
from graphs.state import ROLES

VARIANTS = ("fp32", "fp16", "q4")
HELDOUT = Path(CHECKPOINT_DIR).parent / "heldout.txt"


def _state_norms(state) -> dict[str, float]:  # noqa: ANN001 (runtime_py.session.SequenceState)
    """The largest per-tensor RMS of each state kind."""
    norms: dict[str, float] = {}
    for name, value in state.values.items():
        role = next((r.role for r in ROLES if re.fullmatch(re.escape(r.past_pattern).replace("%d", r"\d+"), name)),
                    "other")
        array = value.numpy().astype(np.float64)
        rms = float(np.sqrt(np.mean(array * array))) if array.size else 0.0
        norms[role] = max(norms.get(role, 0.0), rms)
    return norms


def run(export_dir: Path, prompt_tokens: int, decode_tokens: int, every: int = 64) -> dict:
    from runtime_py.session import OnnxModel
    from runtime_py.tokenizer import TextTokenizer

    ids = TextTokenizer(export_dir).encode(HELDOUT.read_text())
    while len(ids) < prompt_tokens:
        ids = ids + ids
    prompt = np.array([ids[:prompt_tokens]], np.int64)
    models = {v: OnnxModel(export_dir, v) for v in VARIANTS}
    states = {v: m.new_state(1) for v, m in models.items()}
    logits = {v: m.forward(prompt, states[v])[:, -1] for v, m in models.items()}
    samples, worst = [], {v: 0.0 for v in VARIANTS[1:]}
    agree = {v: 0 for v in VARIANTS[1:]}
    nonfinite = {v: 0 for v in VARIANTS}
    started = time.monotonic()
    for step in range(decode_tokens):
        reference = logits["fp32"][0].astype(np.float64)
        scale = max(1.0, float(np.abs(reference).max()))
        token = int(np.argmax(reference))
        row = {"step": step, "position": prompt_tokens + step}
        for v in VARIANTS:
            nonfinite[v] += int(not np.isfinite(logits[v]).all())
        for v in VARIANTS[1:]:
            drift = float(np.abs(logits[v][0].astype(np.float64) - reference).max()) / scale
            worst[v] = max(worst[v], drift)
            agree[v] += int(np.argmax(logits[v][0]) == token)
            row[f"{v}_drift"] = drift
        if step % every == 0 or step == decode_tokens - 1:
            row["state_norms"] = {v: _state_norms(states[v]) for v in VARIANTS}
            samples.append(row)
        next_ids = np.array([[token]], np.int64)
        logits = {v: m.forward(next_ids, states[v])[:, -1] for v, m in models.items()}
    return {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "config_positions": load_text_config(export_dir).max_position_embeddings,
            "seconds": time.monotonic() - started, "worst_drift": worst,
            "greedy_agreement": {v: agree[v] / decode_tokens for v in agree}, "nonfinite_steps": nonfinite,
            "samples": samples}


def _plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    positions = [s["position"] for s in report["samples"]]
    for v in VARIANTS[1:]:
        top.plot(positions, [s[f"{v}_drift"] for s in report["samples"]], label=v)
    top.set_ylabel("max |Δlogit| / scale vs fp32")
    top.set_yscale("log")
    top.legend()
    for v in VARIANTS:
        bottom.plot(positions, [s["state_norms"][v].get("recurrent", 0.0) for s in report["samples"]], label=f"{v} recurrent")
    bottom.set_ylabel("recurrent state RMS (max over layers)")
    bottom.set_xlabel("position")
    bottom.axvline(report["config_positions"], color="gray", linestyle=":")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None, help="an export of the default model with fp32,fp16,q4")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("build/long_run"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export
        if export is None:
            from exporter.onnx.backend import export_onnx

            export = export_onnx("default", Path(tmp) / "export", ",".join(VARIANTS), progress=False)
        report = run(export, args.prompt_tokens, args.decode_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_run.json").write_text(json.dumps(report, indent=1) + "\n")
    plotted = _plot(report, args.out / "long_run.png")
    summary = {k: v for k, v in report.items() if k != "samples"}
    summary["last_state_norms"] = report["samples"][-1]["state_norms"]
    summary["plot"] = str(args.out / "long_run.png") if plotted else None
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
