"""llama.cpp as a benchmark peer: built from the source vendored in the `llama-cpp-python` sdist on PyPI,
its converter and quantizer timed on the same checkpoint as `qwen-edge export`, and `llama-bench` run
at the same prompt and decode lengths as `qwen-edge bench`. Where it cannot be built (no cmake, no
registry) every caller skips it with the reason `LlamaCppUnavailable` carries.

Three quirks of its converter on our random checkpoints: it needs `--no-mtp` when a checkpoint has no
`mtp.*` tensors; it refuses stand-in tokenizers ("BPE pre-tokenizer was not recognized"), so the
converter runs with Qwen3.5's pre-tokenizer name as the answer for a tokenizer it does not know; and
a checkpoint without a tokenizer (the random ones) converts to a GGUF that llama.cpp cannot load
("cannot find tokenizer merges"), so the peer reads the checkpoint beside the default model's BPE
tokenizer (`peer_input`; the converter pads the vocabulary to the config's size).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from safetensors import safe_open

from runtime_py.bench import Spread

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # vendors llama.cpp with the qwen35 architecture
TOOLS = ("llama-quantize", "llama-bench")
QUANT_TYPES = ("Q4_0", "Q4_K_M")
# A native build on a CPU that reports AMX (Sapphire Rapids here) runs ggml's AMX matmul, which crashed
# in llama-bench on this machine (SIGSEGV in ggml_backend_amx_mul_mat, 2026-12-02); AVX-512 it keeps.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

# Runs convert_hf_to_gguf.main() with an unknown tokenizer taken as Qwen3.5's (argv: source folder, then
# the converter's own arguments).
_CONVERT = """
import sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
known = TextModel.get_vocab_base_pre
def pre_tokenizer(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "qwen35"
TextModel.get_vocab_base_pre = pre_tokenizer
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


class LlamaCppUnavailable(Exception):
    """llama.cpp could not be fetched or built here; the message says why."""


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LlamaCppUnavailable(f"{what} failed (exit {done.returncode}): {last[0][:200]}")


def build_llama_cpp(work: Path) -> Path:
    """The vendored llama.cpp folder with `TOOLS` built in `build/bin` (kept in `work` for later runs)."""
    work.mkdir(parents=True, exist_ok=True)
    sources = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not sources:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
              LLAMA_CPP_PYTHON, "-d", str(work)], f"pip download {LLAMA_CPP_PYTHON}")
        archive = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        sources = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        if not sources:
            raise LlamaCppUnavailable(f"{archive.name} has no vendor/llama.cpp")
    src = sources[-1]
    if all((src / "build" / "bin" / tool).is_file() for tool in TOOLS):
        return src
    if shutil.which("cmake") is None:
        raise LlamaCppUnavailable("cmake is not installed (apt-get install cmake)")
    _run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"], "cmake configure of llama.cpp", src)
    _run(["cmake", "--build", "build", "--target", *TOOLS, f"-j{os.cpu_count() or 1}"], "cmake build of llama.cpp", src)
    return src


def has_mtp_weights(checkpoint: Path) -> bool:
    """Does any safetensors file of the checkpoint hold `mtp.*` tensors (read from the headers only)?"""
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if any(name.startswith("mtp.") for name in f.keys()):
                return True
    return False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def peer_input(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint as llama.cpp's converter reads it: its files linked into `folder`, with the
    default model's tokenizer where the checkpoint has none."""
    from default_model import CHECKPOINT_DIR

    checkpoint = Path(checkpoint).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file():
            (folder / path.name).symlink_to(path)
    if not (checkpoint / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            shutil.copyfile(CHECKPOINT_DIR / name, folder / name)
    return folder


def convert_command(src: Path, checkpoint: Path, out: Path, outtype: str = "bf16") -> list[str]:
    """llama.cpp's Hugging Face converter, to one GGUF file of `outtype`."""
    mtp = [] if has_mtp_weights(checkpoint) else ["--no-mtp"]
    return [sys.executable, "-c", _CONVERT, str(src), str(checkpoint), "--outfile", str(out), "--outtype", outtype, *mtp]


def quantize_command(src: Path, gguf: Path, out: Path, kind: str = "Q4_0") -> list[str]:
    return [str(src / "build" / "bin" / "llama-quantize"), str(gguf), str(out), kind]


def measure_llama_bench(src: Path, gguf: Path, threads: int, prompt_lengths: list[int], decode_tokens: int,
                        repeats: int, name: str) -> dict:
    """`llama-bench` in the fields of `runtime_py.bench.measure_config`: prefill per prompt length and
    decode after the shortest prompt (its `-d` depth); peak RSS and CPU-s per token from the kernel's
    rusage of the decode run (that process's CPU, load and prefill to the depth included, over the tokens
    it decoded: an upper bound)."""
    binary = str(src / "build" / "bin" / "llama-bench")
    common = ["-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    prefill_run = subprocess.run([binary, *common, "-p", ",".join(map(str, prompt_lengths)), "-n", "0"],
                                 capture_output=True, text=True, check=True)
    prefill = {}
    for row in json.loads(prefill_run.stdout):
        seconds = Spread.of([ns / 1e9 for ns in row["samples_ns"]])
        prefill[str(row["n_prompt"])] = {"seconds": seconds.__dict__, "tokens_per_s": row["n_prompt"] / seconds.median,
                                         "time_to_first_token_s": seconds.median}
    depth = min(prompt_lengths)
    proc = subprocess.Popen([binary, *common, "-p", "0", "-n", str(decode_tokens), "-d", str(depth)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), binary)
    row = json.loads(out)[0]
    decoded = decode_tokens * (repeats + 1)  # llama-bench warms up once, then runs `repeats` times
    return {"peer": name, "threads": threads, "load_s": None,  # llama-bench does not report its load time
            "prefill": prefill,
            "decode": {"tokens": decode_tokens, "after_prompt": depth,
                       "tokens_per_s": Spread.of(row["samples_ts"]).__dict__,
                       "cpu_s_per_token": Spread.of([(usage.ru_utime + usage.ru_stime) / decoded]).__dict__},
            "peak_rss_mib": usage.ru_maxrss / 1024}


def quantized_models(checkpoint: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    """(llama.cpp source, {peer name: GGUF file}) of `checkpoint` in each of `QUANT_TYPES`, built and
    converted once into `work`; LlamaCppUnavailable where a step fails."""
    src = build_llama_cpp(work)
    bf16 = work / "model-bf16.gguf"
    if not bf16.is_file():
        _run(convert_command(src, peer_input(checkpoint, work / "input"), bf16), "llama.cpp's convert_hf_to_gguf.py")
    models = {}
    for kind in QUANT_TYPES:
        out = work / f"model-{kind}.gguf"
        if not out.is_file():
            _run(quantize_command(src, bf16, out, kind), f"llama-quantize {kind}")
        models[f"llama.cpp {kind}"] = out
    return src, models
