"""Benchmark: speculative decoding with the MTP head against plain decoding, and restored prompt state.

    nice -n 10 .venv/bin/python -m exporter.bench.speculative EXPORT --variant q4 --threads 2

Random weights cannot show acceptance, so the speculative loop runs with `forced_acceptance` (a
benchmark-only switch: each draft is accepted with that probability), which measures the real
loop's cost (draft calls, verify calls, rollback) as a function of acceptance. Every configuration
decodes from the same prefilled prompt, and the configurations are interleaved within each repeat,
so ratios between them hold on a shared machine even when absolute speeds move.

Time to first token with a long system prompt is measured both ways: prefill system + user prompt,
against reading the system prompt's saved state (runtime_py/state_file.py) and prefilling the user
prompt only. Results print as Markdown and go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime_py.sequence import PlainSession, PrefixState, prefill, run_session
from runtime_py.session import OnnxModel
from runtime_py.speculative import SpeculativeSession
from runtime_py.state_file import load_sequence, save_sequence
from runtime_py.tokenizer import TextTokenizer


def _ids(length: int, vocab: int, seed: int) -> list[int]:
    return (np.random.default_rng(seed).integers(1, vocab - 1, length)).tolist()


def _decode(model: OnnxModel, prefix: PrefixState, tokens: int, k: int | None, acceptance: float | None) -> dict:
    session = (PlainSession(model) if k is None else
               SpeculativeSession(model, k, forced_acceptance=acceptance))
    start = time.perf_counter()
    generated, _ = run_session(session, prefix, tokens)
    seconds = time.perf_counter() - start
    out = {"tok_s": len(generated) / seconds}
    if k is not None:
        out.update(decoder_calls=session.stats.decoder_calls, mtp_calls=session.stats.mtp_calls,
                   rounds=session.stats.rounds)
    return out


def measure_decode(model: OnnxModel, prompt: int, tokens: int, drafts: list[int], acceptances: list[float],
                   repeats: int) -> list[dict]:
    """tok/s of plain decoding and of each (k, forced acceptance), interleaved, median over repeats."""
    vocab = model.decoder.get_outputs()[0].shape[-1]
    prefix = prefill(model, _ids(prompt, vocab, 0), with_head=True)
    configs = [(None, None)] + [(k, a) for k in drafts for a in acceptances]
    samples: dict = {c: [] for c in configs}
    _decode(model, prefix, 4, None, None)  # warm-up
    for i in range(repeats):
        for k, a in configs:
            samples[(k, a)].append(_decode(model, prefix, tokens, k, a))
            print(f"repeat {i}: draft tokens {k}, acceptance {a}: {samples[(k, a)][-1]}", file=sys.stderr, flush=True)
    rows = []
    plain = statistics.median(s["tok_s"] for s in samples[(None, None)])
    for (k, a), runs in samples.items():
        tok_s = statistics.median(r["tok_s"] for r in runs)
        row = {"draft_tokens": k, "acceptance": a, "tok_s": tok_s, "vs_plain": tok_s / plain,
               "tok_s_runs": [r["tok_s"] for r in runs]}
        if k is not None:
            row.update(decoder_calls=runs[0]["decoder_calls"], mtp_calls=runs[0]["mtp_calls"],
                       rounds=runs[0]["rounds"])
        rows.append(row)
    return rows


def measure_restore(model: OnnxModel, system: int, user: int, repeats: int) -> dict:
    """Time to first token after system + user prompt tokens: prefilled, or the system part restored."""
    vocab = model.decoder.get_outputs()[0].shape[-1]
    system_ids, user_ids = _ids(system, vocab, 1), _ids(user, vocab, 2)
    full, restored = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_sequence(Path(tmp) / "system.safetensors", model,
                             prefill(model, system_ids, with_head=model.draftable))
        print(f"saved the {system}-token state", file=sys.stderr, flush=True)
        for _ in range(repeats):
            start = time.perf_counter()
            np.argmax(prefill(model, system_ids + user_ids).last_logits)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            np.argmax(prefill(model, user_ids, load_sequence(path, model)).last_logits)
            restored.append(time.perf_counter() - start)
        size = path.stat().st_size
    return {"system_tokens": system, "user_tokens": user, "ttft_prefill_s": statistics.median(full),
            "ttft_restored_s": statistics.median(restored), "state_file_bytes": size,
            "runs_prefill_s": full, "runs_restored_s": restored}


def measure_acceptance(model: OnnxModel, text: str, prompts: int, prompt_chars: int, tokens: int, k: int) -> dict:
    """Acceptance per draft position of the real head (greedy), over `prompts` prompts cut from `text`
    (held-out text), each continued for `tokens` tokens."""
    tokenizer = TextTokenizer(model.export_dir)
    total = None
    generated = 0
    step = max(1, (len(text) - prompt_chars) // prompts)
    for i in range(prompts):
        session = SpeculativeSession(model, k)
        ids = tokenizer.encode(text[i * step : i * step + prompt_chars])
        generated += len(run_session(session, prefill(model, ids, with_head=True), tokens)[0])
        if total is None:
            total = session.stats
        else:
            total.rounds += session.stats.rounds
            total.offered = [a + b for a, b in zip(total.offered, session.stats.offered)]
            total.accepted = [a + b for a, b in zip(total.accepted, session.stats.accepted)]
            total.decoder_calls += session.stats.decoder_calls
    return {"draft_tokens": k, "prompts": prompts, "generated": generated, "rounds": total.rounds,
            "offered": total.offered, "accepted": total.accepted, "acceptance": total.acceptance(),
            "tokens_per_decoder_call": generated / total.decoder_calls}


def markdown(report: dict) -> str:
    lines = ["| draft tokens k | forced acceptance | decode tok/s | ÷ plain | decoder calls | MTP calls |",
             "|---|---|---|---|---|---|"]
    for r in report["decode"]:
        if r["draft_tokens"] is None:
            lines.append(f"| plain | – | {r['tok_s']:.1f} | 1.00× | {report['tokens']} | 0 |")
        else:
            lines.append(f"| {r['draft_tokens']} | {r['acceptance']:.2f} | {r['tok_s']:.1f} | {r['vs_plain']:.2f}× | "
                         f"{r['decoder_calls']} | {r['mtp_calls']} |")
    for a in report.get("acceptance", []):
        lines += ["", f"Acceptance of the real head, k = {a['draft_tokens']}, {a['prompts']} held-out prompts, "
                  f"{a['generated']} tokens: " + ", ".join(f"position {j + 1}: {x:.1%} ({n} offered)" for j, (x, n) in
                                                           enumerate(zip(a["acceptance"], a["offered"])))
                  + f"; {a['tokens_per_decoder_call']:.2f} tokens per decoder call"]
    s = report.get("restore")
    if s is None:
        return "\n".join(lines)
    lines += ["", "| time to first token | seconds |", "|---|---|",
              f"| prefill {s['system_tokens']} system + {s['user_tokens']} user tokens | {s['ttft_prefill_s']:.3f} |",
              f"| restore the {s['system_tokens']}-token state ({s['state_file_bytes'] / 2**20:.1f} MiB file), "
              f"prefill {s['user_tokens']} | {s['ttft_restored_s']:.3f} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--variant", default="q4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", default="1,2,3")
    parser.add_argument("--acceptance", default="0,0.5,0.8,1")
    parser.add_argument("--system", type=int, default=1024)
    parser.add_argument("--user", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--heldout", type=Path, default=None,
                        help="also measure the real head's acceptance on prompts cut from this text file")
    parser.add_argument("--skip-restore", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_out/speculative.json"))
    args = parser.parse_args()
    model = OnnxModel(args.export, args.variant, threads=args.threads)
    report = {"export": str(args.export), "variant": args.variant, "threads": args.threads, "prompt": args.prompt,
              "tokens": args.tokens,
              "decode": measure_decode(model, args.prompt, args.tokens, [int(k) for k in args.draft_tokens.split(",")],
                                       [float(a) for a in args.acceptance.split(",")], args.repeats),
              }
    if args.heldout is not None:
        text = args.heldout.read_text()
        report["acceptance"] = [measure_acceptance(model, text, 16, 200, args.tokens, k)
                                for k in (int(k) for k in args.draft_tokens.split(","))]
    if not args.skip_restore:
        report["restore"] = measure_restore(model, args.system, args.user, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
