"""What a user would run instead, measured the same way: onnxruntime-genai's int4 builder export and
Hugging Face transformers (eager PyTorch). Each configuration runs in its own process, like ours, and
reports the same fields as `runtime_py.bench.measure_config`. A peer that is not installed is skipped
with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from runtime_py.bench import Spread


def missing_peer(name: str) -> str | None:
    module = {"onnxruntime-genai": "onnxruntime_genai", "transformers": "transformers"}[name]
    return None if importlib.util.find_spec(module) else f"{name} is not installed (pip install {name})"


def build_genai_export(checkpoint: Path, out: Path) -> Path:
    """onnxruntime-genai's own builder, int4 for CPU (the MTP head is left out, as qwen-edge does)."""
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache"),
                        "--extra_options", "exclude_mtp=true"], check=True, capture_output=True)
    return out


Run = Callable[[list[int], int], tuple[float, float, float]]  # (prompt, new tokens) -> prefill s, decode s, decode CPU s


def _measure(name: str, threads: int, load_s: float, run: Run, vocab: int, prompt_lengths: list[int],
             decode_tokens: int, repeats: int) -> dict:
    """The fields of `runtime_py.bench.measure_config`, from a peer's `run`; one warm-up is dropped."""
    prefill = {}
    for length in prompt_lengths:
        s = Spread.of([run(_prompt(length, vocab), 0)[0] for _ in range(repeats + 1)][1:])
        prefill[str(length)] = {"seconds": s.__dict__, "tokens_per_s": length / s.median, "time_to_first_token_s": s.median}
    decode = [run(_prompt(min(prompt_lengths), vocab), decode_tokens) for _ in range(repeats + 1)][1:]
    return {"peer": name, "threads": threads, "load_s": load_s, "prefill": prefill,
            "decode": {"tokens": decode_tokens, "after_prompt": min(prompt_lengths),
                       "tokens_per_s": Spread.of([decode_tokens / d[1] for d in decode]).__dict__,
                       "cpu_s_per_token": Spread.of([d[2] / decode_tokens for d in decode]).__dict__},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _prompt(length: int, vocab: int) -> list[int]:
    return [(i * 7919) % (vocab - 1) + 1 for i in range(length)]


def measure_genai(model_dir: Path, threads: int, prompt_lengths: list[int], decode_tokens: int, repeats: int) -> dict:
    import onnxruntime_genai as og

    config_path = model_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=4))
    start = time.perf_counter()
    model = og.Model(str(model_dir))
    load_s = time.perf_counter() - start
    vocab = config["model"]["vocab_size"]

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens + 1, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            gen.generate_next_token()
        return t1 - t0, time.perf_counter() - t1, time.process_time() - c1

    return _measure("onnxruntime-genai int4", threads, load_s, run, vocab, prompt_lengths, decode_tokens, repeats)


def measure_transformers(checkpoint: Path, threads: int, prompt_lengths: list[int], decode_tokens: int,
                         repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    vocab = model.config.get_text_config().vocab_size

    @torch.no_grad()
    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, float]:
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
        return t1 - t0, time.perf_counter() - t1, time.process_time() - c1

    return _measure("transformers eager fp32", threads, load_s, run, vocab, prompt_lengths, decode_tokens, repeats)


def run_peer(kind: str, path: Path, threads: int, prompt_lengths: list[int], decode_tokens: int, repeats: int) -> dict:
    """One peer configuration in a fresh process (its peak RSS is its own)."""
    cmd = [sys.executable, "-m", "exporter.bench.peers", kind, str(path), str(threads), ",".join(map(str, prompt_lengths)),
           str(decode_tokens), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(ours: list[dict], peers: list[dict]) -> list[dict]:
    """ours / peer for decode and prefill speed (higher is better) and CPU-s per token (lower is better)."""
    rows = []
    for p in peers:
        mine = next((c for c in ours if c["threads"] == p["threads"]), None)
        if mine is None:
            continue
        row = {"peer": p["peer"], "threads": p["threads"],
               "decode_speed_ratio": mine["decode"]["tokens_per_s"]["median"] / p["decode"]["tokens_per_s"]["median"],
               "cpu_s_per_token_ratio": mine["decode"]["cpu_s_per_token"]["median"] / p["decode"]["cpu_s_per_token"]["median"],
               "peak_rss_ratio": mine["peak_rss_mib"] / p["peak_rss_mib"]}
        for length in mine["prefill"]:
            if length in p["prefill"]:
                row[f"prefill_{length}_speed_ratio"] = mine["prefill"][length]["tokens_per_s"] / p["prefill"][length]["tokens_per_s"]
        rows.append(row)
    return rows


if __name__ == "__main__":  # worker: one peer configuration, JSON on the last stdout line
    kind, path, threads, lengths, tokens, reps = sys.argv[1:7]
    measure = {"genai": measure_genai, "transformers": measure_transformers}[kind]
    print(json.dumps(measure(Path(path), int(threads), [int(x) for x in lengths.split(",")], int(tokens), int(reps))))
