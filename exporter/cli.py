"""The `qwen-edge` command line: options in, one typed request, one function per command, output out.

No domain logic lives here. Each command works on the embedded default model (`default`). Commands
that need no torch (`generate`, `bench`, `package`, `package verify`, `devices`) import none: every
import of a command's work happens inside the command.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# NumPy's BLAS serves only the Core ML interpreter's small matmuls here, where threads cost more than
# they give (a 64x128x352 matmul: 1 ms on one thread, 40 ms on two on a busy 2-core machine). Set
# before NumPy loads; ONNX Runtime and PyTorch keep their own thread pools.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click

# Library progress bars (coremltools' pass-by-pass tqdm bars) would flood logs; our own stages report
# progress. tqdm reads this when it is first imported, which torch does, so it is set before any import.
os.environ.setdefault("TQDM_DISABLE", "1")

from exporter.cli_types import ContextLength, FiniteFloat
from graphs.errors import QwenEdgeError


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that every `with` block cleans up as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Interrupted(signum)


class CliGroup(click.Group):
    """Every user error is one clear line on stderr: ours exit 1, click's usage errors exit 2.
    SIGINT and SIGTERM remove partial output and exit 130 and 143 (128 + the signal number)."""

    def main(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        kwargs.pop("standalone_mode", None)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            names, ctx = [], getattr(exc, "ctx", None)
            while ctx is not None and ctx.parent is not None:  # e.g. ['build', 'package']
                names.append(ctx.info_name)
                ctx = ctx.parent
            hint = f" (see 'qwen-edge {' '.join(reversed(names))} --help')" if names else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QwenEdgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            signum = exc.args[0] if isinstance(exc, Interrupted) else signal.SIGINT
            click.echo(f"error: interrupted by {signal.Signals(signum).name}; partial output was removed", err=True)
            sys.exit(128 + signum)


def _output_file(option: str, path: Path | None, *inputs: Path | str | None) -> None:
    """Check an output file option (e.g. --json FILE) before any work is done."""
    if path is not None:
        from default_model import resolve_checkpoint
        from exporter.atomic import check_output_file

        check_output_file(path, option, [resolve_checkpoint(p) for p in inputs if p is not None])


MAX_THREADS = 1024
MAX_REPEATS = 1000


def _ints(text: str | None, option: str, most: int = 1 << 24) -> tuple[int, ...] | None:
    """'1,64,130' -> (1, 64, 130); every value an integer from 1 to `most`."""
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QwenEdgeError(f"{option} {text!r:.60}: give comma-separated integers, e.g. 1,64,130") from None
    if not values or min(values) < 1 or max(values) > most:
        raise QwenEdgeError(f"{option} {text!r:.60}: give one or more integers from 1 to {most:,}")
    return values


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(n.strip() for n in text.split(",") if n.strip()) if text else None


def _given(ctx: click.Context, *names: str) -> list[str]:
    """The options among `names` the user set on the command line."""
    return [f"--{n.replace('_', '-')}" for n in names
            if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]


@click.group(cls=CliGroup)
@click.version_option(package_name="qwen-edge")
def main() -> None:
    """Export, verify and run Qwen3.5 hybrid models for phones."""


ONNX_ONLY = ("recurrent_ops", "block_size", "asymmetric", "accuracy_level", "all_logits", "no_mtp", "draft_vocab")
COREML_ONLY = ("chunk", "context", "recurrent_state", "image_sizes")


@main.command()
@click.argument("checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "coreml"]), default="onnx", show_default=True,
              help="coreml: OUT/coreml/model{suffix}.mlpackage (iOS 18 / macOS 15), functions prefill + decode.")
@click.option("--quant", "quant_names", default="fp32", show_default=True,
              help="Comma-separated variants: fp32, fp16, q8, q4, q4f16, q4mix (file suffixes '', _fp16, _quantized, _q4, "
                   "_q4f16, _q4mix); Core ML also p4.")
@click.option("--recurrent-ops", type=click.Choice(["standard", "contrib"]), default="contrib", show_default=True,
              help="ONNX: contrib = com.microsoft ops (ORT >= 1.25, fused CPU kernels, web, Android); standard = "
                   "opset 27 ops (ORT >= 1.32, whose CPU provider expands them into a slower Scan).")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="ONNX: quantization block size along the input dimension.")
@click.option("--asymmetric", is_flag=True, help="ONNX: per-block zero points (default: symmetric).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="ONNX: MatMulNBits compute: 4 = int8 activations (fastest on CPU), 1 = fp32, 0 = runtime default.")
@click.option("--all-logits", is_flag=True, help="ONNX: logits for every position (default: last position only).")
@click.option("--no-mtp", is_flag=True, help="ONNX: leave out the checkpoint's MTP head (no speculative decoding).")
@click.option("--draft-vocab", type=click.IntRange(min=1), default=None,
              help="ONNX: the MTP head drafts among the first N token ids only (cheaper drafts, the same output; "
                   "int4/int8 variants). Default: the whole vocabulary.")
@click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True, help="Core ML: tokens per prefill call.")
@click.option("--context", type=ContextLength(), default=4096, show_default=True,
              help="Core ML: KV-cache capacity (a multiple of --chunk).")
@click.option("--recurrent-state", default="state", show_default=True,
              help="Core ML: 'state' (fp16 Core ML state) or 'io' (fp32 input/output the app carries).")
@click.option("--image-sizes", default=None,
              help="Core ML: vision functions for these image sizes, e.g. 448x448,640x480 (multiples of 32).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only a folder qwen-edge wrote).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def export(ctx: click.Context, checkpoint: str, out: Path, fmt: str, quant_names: str, recurrent_ops: str,
           block_size: str, asymmetric: bool, accuracy_level: int, all_logits: bool, chunk: int, context: int,
           recurrent_state: str, image_sizes: str | None, force: bool, quiet: bool, no_mtp: bool,
           draft_vocab: int | None) -> None:
    """Export CHECKPOINT (a Hugging Face folder, or 'default') to ONNX or Core ML in OUT.

    \b
    Core ML --quant names: fp32, fp16, q8 (int8 per-channel), q4 (int4 block 32),
    q4f16 (int4, fp16 compute), p4 (4-bit palettization, fp16 compute).
    """
    import time

    from exporter.pipeline import ExportRequest, run_export
    from exporter.progress import peak_rss_bytes
    from quant.schemes import QuantOptions, parse_schemes

    started = time.perf_counter()
    wrong = _given(ctx, *(ONNX_ONLY if fmt == "coreml" else COREML_ONLY))
    if wrong:
        other = "Core ML" if fmt == "onnx" else "ONNX"
        raise QwenEdgeError(f"{other} options ({', '.join(wrong)}) do not apply to --format {fmt}; "
                            "drop them or change --format")
    request = ExportRequest(checkpoint, out, tuple(parse_schemes(quant_names, fmt)), force, not quiet)
    if fmt == "coreml":
        from exporter.coreml.backend import CoreMLBackend, CoreMLOptions
        from exporter.coreml.vision import parse_image_sizes

        backend = CoreMLBackend(CoreMLOptions(chunk, context, recurrent_state, parse_image_sizes(image_sizes)))
    else:
        from exporter.onnx.backend import OnnxBackend, OnnxOptions

        backend = OnnxBackend(OnnxOptions(recurrent_ops, QuantOptions(int(block_size), not asymmetric, accuracy_level),
                                          all_logits, not no_mtp, draft_vocab=draft_vocab))
    run_export(request, backend)
    label = "Core ML: " if fmt == "coreml" else ""
    click.echo(f"exported {checkpoint} -> {out} ({label}{', '.join(s.name for s in request.schemes)}) in "
               f"{time.perf_counter() - started:.1f} s, peak memory {peak_rss_bytes() / 2**30:.2f} GiB")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--against", type=click.Path(path_type=Path),
              help="Quality mode: measure every variant of EXPORT against this float export or checkpoint.")
@click.option("--variant", default="fp32", show_default=True, help="Parity mode: the variant to check.")
@click.option("--decode-steps", type=click.IntRange(min=0), default=32, show_default=True,
              help="Parity: greedy decode steps after each prefill.")
@click.option("--prompt-lengths", default=None, help="Parity: comma-separated prompt lengths [ONNX 1,63,64,65,130; Core ML 64,130].")
@click.option("--rtol", type=FiniteFloat(min=0), default=None,
              help="Parity: logit tolerance relative to the logit scale [ONNX 1e-4, 5e-2 for fp16 activations; Core ML 1e-2 fp32 compute, 5e-2 fp16].")
@click.option("--per-step", is_flag=True, help="Parity: print every step's difference.")
@click.option("--by-layer/--whole-graph", "by_layer", default=None,
              help="Parity (ONNX): run the decoder one layer's session at a time, decode fed a fixed continuation, "
                   "in the memory of one layer [default: when the whole session could exceed half the RAM].")
@click.option("--variants", "variant_names", default=None, help="Quality: comma-separated variants (default: all).")
@click.option("--text", "text_path", type=click.Path(path_type=Path), help="Quality: held-out text file.")
@click.option("--tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Quality: tokens of held-out text to score.")
@click.option("--gate", "gate_items", multiple=True, help="Quality: override a gate, e.g. q4.min_top1=0.95.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full report as JSON.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="Quality: write a JUnit XML report.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "coreml"]), default="onnx", show_default=True,
              help="coreml: check a Core ML export (spec + MIL program run by a NumPy interpreter).")
@click.option("--runner", type=click.Choice(["mil", "coreml"]), default="mil", show_default=True,
              help="Core ML: 'mil' = NumPy MIL interpreter (any OS); 'coreml' = Core ML prediction (macOS 15+).")
def verify(paths: tuple[Path, ...], against: Path | None, variant: str, decode_steps: int, prompt_lengths: str | None,
           rtol: float | None, per_step: bool, variant_names: str | None, text_path: Path | None, tokens: int,
           gate_items: tuple[str, ...], json_path: Path | None, junit_path: Path | None, fmt: str, runner: str,
           by_layer: bool | None) -> None:
    """Check an export; exit 1 when a tolerance or quality gate is missed.

    \b
    Parity:  qwen-edge verify CHECKPOINT EXPORT   (PyTorch reference vs ONNX, per-step logits)
    Core ML: qwen-edge verify --format coreml CHECKPOINT EXPORT (prompts 64,130 by default)
    Quality: qwen-edge verify EXPORT --against REF (each variant vs a float export or checkpoint)
    """
    from exporter.verify.command import VerifyRequest, run_verify

    for option, path in (("--json", json_path), ("--junit", junit_path)):
        _output_file(option, path, *paths, against)
    if junit_path is not None and against is None:
        raise QwenEdgeError("--junit applies to quality checks (EXPORT --against REF)")
    if text_path is not None and not text_path.is_file():
        raise QwenEdgeError(f"--text {text_path}: not a regular file; give a UTF-8 text file of held-out text")
    outcome = run_verify(VerifyRequest(paths, against, fmt, variant, decode_steps,
                                       _ints(prompt_lengths, "--prompt-lengths"), rtol, per_step, runner,
                                       _names(variant_names), text_path, tokens, gate_items, by_layer))
    click.echo(outcome.text)
    if json_path:
        outcome.write_json(json_path)
    if junit_path:
        outcome.write_junit(junit_path)
    if not outcome.passed:
        sys.exit(1)


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text (a plain prompt, or with --chat one user turn).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the model's chat template.")
@click.option("--messages", "messages_path", type=click.Path(path_type=Path), default=None,
              help="A JSON list of chat messages ({role, content}; multi-turn, text and image parts) instead of --prompt.")
@click.option("--tools", "tools_path", type=click.Path(path_type=Path), default=None,
              help="A JSON list of tool definitions (JSON schemas) for the chat template.")
@click.option("--system", default=None, help="A system message in front of the conversation.")
@click.option("--no-thinking", is_flag=True, help="Chat: ask the template to turn thinking off (enable_thinking=false).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: prompt ids, generated ids, text (and reasoning, content, tool calls).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed (reproducible output).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--variant", default=None, help="Which exported variant to run (default: the first one exported).")
@click.option("--speculative", type=click.Choice(["mtp"]), default=None,
              help="Speculative decoding: the export's MTP head drafts, the decoder verifies (same output).")
@click.option("--draft-tokens", type=click.IntRange(1, 8), default=None,
              help="Tokens the MTP head drafts per round (with --speculative) [default: 2].")
@click.option("--save-state", type=click.Path(path_type=Path), default=None,
              help="Write the sequence state after the prompt to this file (safetensors).")
@click.option("--load-state", type=click.Path(path_type=Path), default=None,
              help="Continue a state saved with --save-state: the prompt follows its tokens.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image for the prompt (repeat for several); needs an export with a vision encoder.")
@click.option("--video", type=click.Path(path_type=Path), default=None,
              help="A folder of video frames (sorted by name) for the prompt; give their rate with --fps.")
@click.option("--fps", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Frames per second the --video frames were taken at.")
def generate(export_dir: Path, prompt: str | None, chat: bool, messages_path: Path | None, tools_path: Path | None,
             system: str | None, no_thinking: bool, as_json: bool, max_new_tokens: int, temperature: float,
             top_p: float, seed: int | None, threads: int | None, variant: str | None, speculative: str | None,
             draft_tokens: int | None, save_state: Path | None, load_state: Path | None, images: tuple[Path, ...],
             video: Path | None, fps: float | None) -> None:
    """Generate text from an export, streaming tokens to stdout (or one JSON object with --json)."""
    import json

    from runtime_py.chat import load_messages, load_tools
    from runtime_py.generate import GenerateRequest, Sampling, generate_text
    from runtime_py.vision import VisualRequest

    if draft_tokens is not None and speculative is None:
        raise QwenEdgeError("--draft-tokens applies to speculative decoding; add --speculative mtp")
    request = GenerateRequest(export_dir, prompt, chat, load_messages(messages_path) if messages_path else None,
                              system, load_tools(tools_path) if tools_path else None, False if no_thinking else None,
                              max_new_tokens, Sampling(temperature, top_p, seed), threads, variant,
                              (draft_tokens or 2) if speculative else None, save_state, load_state,
                              VisualRequest(images, video, fps))
    result = generate_text(request, None if as_json else lambda text: click.echo(text, nl=False))
    click.echo(json.dumps(result.to_json(), ensure_ascii=False) if as_json else "")


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--variant", default=None, help="Variant to measure (default: the first one exported).")
@click.option("--threads", "threads_text", default=None, help="Comma-separated thread counts (default: 1 and all cores).")
@click.option("--prompt-lengths", default="128,512", show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(1, MAX_REPEATS), default=3, show_default=True,
              help="Measured repetitions after one warm-up.")
@click.option("--contexts", default="1024,2048,4096,8192,16384,32768", show_default=True,
              help="Context lengths for the state-memory curve.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench_out"), show_default=True)
@click.option("--compare", "compare_checkpoint", type=click.Path(path_type=Path), default=None,
              help="Also run the peers on this checkpoint: onnxruntime-genai int4 (its own builder), transformers eager, and llama.cpp Q4_0 and Q4_K_M (built from the llama-cpp-python sdist; skipped with the reason where it cannot be built).")
def bench(export_dir: Path, variant: str | None, threads_text: str | None, prompt_lengths: str, decode_tokens: int,
          repeats: int, contexts: str, out_dir: Path, compare_checkpoint: Path | None) -> None:
    """Measure speed, latency, memory and CPU cost of EXPORT_DIR; write JSON, Markdown and PNG plots."""
    from exporter.bench.command import BenchRequest, run_bench
    from runtime_py.bench import markdown_table

    request = BenchRequest(export_dir, variant, _ints(threads_text, "--threads", MAX_THREADS),
                           _ints(prompt_lengths, "--prompt-lengths"), decode_tokens, repeats,
                           _ints(contexts, "--contexts"), out_dir, compare_checkpoint)
    report, files = run_bench(request, lambda line: click.echo(line, err=True))
    click.echo(markdown_table(report))
    click.echo("wrote " + ", ".join(str(f) for f in files))


class PackageGroup(click.Group):
    """`package EXPORT --target T OUT` builds a bundle; `package verify BUNDLE` checks one. Anything that
    is not a subcommand name is read as the arguments of `package build`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["build", *args]
        return super().parse_args(ctx, args)


@main.group(cls=PackageGroup)
def package() -> None:
    """App bundles: qwen-edge package EXPORT --target android|ios|web OUT; qwen-edge package verify BUNDLE."""


@package.command("build")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["android", "ios", "web"]), required=True,
              help="android: ONNX + ORT format + genai_config.json; ios: Core ML + ONNX; web: transformers.js layout.")
@click.option("--variants", "variant_names", default=None,
              help="Comma-separated variants to include (default: all exported; the first one is genai_config.json's).")
@click.option("--coreml", "coreml_dir", type=click.Path(path_type=Path), default=None,
              help="ios: the Core ML export (qwen-edge export --format coreml) of the same checkpoint.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only a folder qwen-edge wrote).")
def package_build(export_dir: Path, out: Path, target: str, variant_names: str | None, coreml_dir: Path | None,
                  force: bool) -> None:
    """Write the TARGET app bundle of EXPORT_DIR into OUT, with manifest.json (sizes, SHA-256 of every file)."""
    from exporter.package.build import package_export

    names = _names(variant_names)
    manifest = package_export(export_dir, out, target, list(names) if names else None, force, coreml_dir)
    from exporter.package.manifest import BUNDLE_MANIFEST, sha256

    click.echo(f"packaged {export_dir} -> {out} ({target}: {', '.join(manifest['variants'])}; "
               f"{len(manifest['files'])} files, {manifest['total_bytes']:,} bytes); "
               f"manifest sha256 {sha256(out / BUNDLE_MANIFEST)}")


@package.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--manifest-sha256", "pinned", default=None, metavar="HEX",
              help="The released manifest's SHA-256 (printed by package and verify): also catches a bundle whose "
                   "files and manifest were rewritten together.")
def package_verify(bundle: Path, pinned: str | None) -> None:
    """Check BUNDLE against its manifest.json: every file listed with its size and SHA-256, nothing else
    present, and the manifest's fields (graph I/O, opsets, model shape, state layout, quantization) as the
    files say; exit 1 naming every difference."""
    import re

    from exporter.package.verify import check_bundle

    if pinned is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pinned):
        raise click.BadParameter("give the 64 hexadecimal digits of a SHA-256", param_hint="'--manifest-sha256'")
    manifest, digest = check_bundle(bundle, pinned)
    click.echo(f"ok: {bundle} ({manifest['target']}): {len(manifest['files'])} files, "
               f"{manifest['total_bytes']:,} bytes match the manifest; manifest sha256 {digest}"
               + (" (the pinned release)" if pinned else ""))


@main.group()
def devices() -> None:
    """Target device profiles, and whether an export fits them."""


@devices.command("list")
def devices_list() -> None:
    """Every profile with its numbers and sources."""
    from devices.profiles import describe_devices

    click.echo(describe_devices())


@devices.command("fit")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--context", type=ContextLength(), default=4096, show_default=True,
              help="Context length the state must hold.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="Threads for the calibration run on this machine.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the estimates as JSON.")
def devices_fit(export_dir: Path, context: int, threads: int | None, json_path: Path | None) -> None:
    """Per device and variant: does it fit, and an ESTIMATE of decode tok/s and joules per token."""
    import json

    from devices.fit import fit_export

    _output_file("--json", json_path, export_dir)
    report = fit_export(export_dir, context, threads)
    click.echo(report.text())
    if json_path:
        from exporter.atomic import write_text_atomically

        write_text_atomically(json_path, json.dumps(report.to_dict(), indent=2) + "\n")


if __name__ == "__main__":
    main()
