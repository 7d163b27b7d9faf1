"""The `qwen-edge` command line. Each command works on the embedded default model (`default`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from graphs.errors import QwenEdgeError


class CliGroup(click.Group):
    """Every user error is one clear line on stderr: ours exit 1, click's usage errors exit 2."""

    def main(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        kwargs.pop("standalone_mode", None)
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


@click.group(cls=CliGroup)
@click.version_option(package_name="qwen-edge")
def main() -> None:
    """Export, verify and run Qwen3.5 hybrid models for phones."""


@main.command()
@click.argument("checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--recurrent-ops", type=click.Choice(["standard", "contrib"]), default="standard", show_default=True,
              help="standard: ONNX opset 27 ops (ORT >= 1.32); contrib: com.microsoft ops (ORT >= 1.25, web, Android).")
@click.option("--quant", "quant_names", default="fp32", show_default=True,
              help="Comma-separated variants: fp32, fp16, q8, q4, q4f16 (file suffixes '', _fp16, _quantized, _q4, _q4f16).")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="Quantization block size along the input dimension.")
@click.option("--asymmetric", is_flag=True, help="Per-block zero points (default: symmetric).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="MatMulNBits compute: 4 = int8 activations (fastest on CPU), 1 = fp32, 0 = runtime default.")
@click.option("--all-logits", is_flag=True, help="Logits for every position (default: last position only).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "coreml"]), default="onnx", show_default=True,
              help="coreml: OUT/coreml/model{suffix}.mlpackage (iOS 18 / macOS 15), functions prefill + decode.")
@click.option("--chunk", default=64, show_default=True, help="Core ML: tokens per prefill call.")
@click.option("--context", default=4096, show_default=True, help="Core ML: KV-cache capacity (a multiple of --chunk).")
@click.option("--recurrent-state", default="state", show_default=True,
              help="Core ML: 'state' (fp16 Core ML state) or 'io' (fp32 input/output the app carries).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(checkpoint: str, out: Path, recurrent_ops: str, quant_names: str, block_size: str, asymmetric: bool,
           accuracy_level: int, all_logits: bool, fmt: str, chunk: int, context: int, recurrent_state: str,
           force: bool, quiet: bool) -> None:
    """Export CHECKPOINT (a Hugging Face folder, or 'default') to ONNX or Core ML in OUT.

    \b
    Core ML --quant names: fp32, fp16, q8 (int8 per-channel), q4 (int4 block 32),
    q4f16 (int4, fp16 compute), p4 (4-bit palettization, fp16 compute).
    """
    from exporter.export import export_checkpoint
    from quant.schemes import QuantOptions, parse_schemes

    if fmt == "coreml":
        from exporter.coreml_export import export_coreml
        from quant.coreml_weights import parse_coreml_schemes

        if block_size != "32" or asymmetric or all_logits or recurrent_ops != "standard" or accuracy_level != 4:
            raise QwenEdgeError("--block-size, --asymmetric, --accuracy-level, --all-logits and --recurrent-ops are ONNX options; "
                                "Core ML takes --quant, --chunk, --context and --recurrent-state")
        coreml_schemes = parse_coreml_schemes(quant_names)
        export_coreml(checkpoint, out, schemes=coreml_schemes, chunk=chunk, capacity=context,
                      recurrent_mode=recurrent_state, force=force, progress=not quiet)
        click.echo(f"exported {checkpoint} -> {out} (Core ML: {', '.join(s.name for s in coreml_schemes)})")
        return

    schemes = parse_schemes(quant_names)
    options = QuantOptions(int(block_size), not asymmetric, accuracy_level)
    export_checkpoint(checkpoint, out, recurrent_ops=recurrent_ops, schemes=schemes, quant=options,
                      all_logits=all_logits, force=force, progress=not quiet)
    click.echo(f"exported {checkpoint} -> {out} ({', '.join(s.name for s in schemes)})")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--against", type=click.Path(path_type=Path),
              help="Quality mode: measure every variant of EXPORT against this float export or checkpoint.")
@click.option("--variant", default="fp32", show_default=True, help="Parity mode: the variant to check.")
@click.option("--decode-steps", default=32, show_default=True, help="Parity: greedy decode steps after each prefill.")
@click.option("--prompt-lengths", default=None, help="Parity: comma-separated prompt lengths [ONNX 1,63,64,65,130; Core ML 64,130].")
@click.option("--rtol", type=float, default=None,
              help="Parity: logit tolerance relative to the logit scale [ONNX 1e-4; Core ML 1e-2 fp32 compute, 5e-2 fp16].")
@click.option("--per-step", is_flag=True, help="Parity: print every step's difference.")
@click.option("--variants", "variant_names", default=None, help="Quality: comma-separated variants (default: all).")
@click.option("--text", "text_path", type=click.Path(path_type=Path), help="Quality: held-out text file.")
@click.option("--tokens", default=1024, show_default=True, help="Quality: tokens of held-out text to score.")
@click.option("--gate", "gate_items", multiple=True, help="Quality: override a gate, e.g. q4.min_top1=0.95.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full report as JSON.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="Quality: write a JUnit XML report.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "coreml"]), default="onnx", show_default=True,
              help="coreml: check a Core ML export (spec + MIL program run by a NumPy interpreter).")
@click.option("--runner", type=click.Choice(["mil", "coreml"]), default="mil", show_default=True,
              help="Core ML: 'mil' = NumPy MIL interpreter (any OS); 'coreml' = Core ML prediction (macOS 15+).")
def verify(paths: tuple[Path, ...], against: Path | None, variant: str, decode_steps: int, prompt_lengths: str,
           rtol: float | None, per_step: bool, variant_names: str | None, text_path: Path | None, tokens: int,
           gate_items: tuple[str, ...], json_path: Path | None, junit_path: Path | None, fmt: str, runner: str) -> None:
    """Check an export; exit 1 when a tolerance or quality gate is missed.

    \b
    Parity:  qwen-edge verify CHECKPOINT EXPORT   (PyTorch reference vs ONNX, per-step logits)
    Core ML: qwen-edge verify --format coreml CHECKPOINT EXPORT (prompts 64,130 by default)
    Quality: qwen-edge verify EXPORT --against REF (each variant vs a float export or checkpoint)
    """
    if fmt == "coreml":
        if against is not None or len(paths) != 2:
            raise QwenEdgeError("verify --format coreml takes CHECKPOINT and EXPORT (no --against)")
        _verify_coreml(paths, variant, decode_steps, prompt_lengths, rtol, per_step, json_path, runner)
        return
    rtol = 1e-4 if rtol is None else rtol
    if against is not None:
        if len(paths) != 1:
            raise QwenEdgeError("with --against give exactly one path, the export to measure: verify EXPORT --against REF")
        _verify_quality(paths[0], against, variant_names, text_path, tokens, gate_items, json_path, junit_path)
        return
    if len(paths) != 2:
        raise QwenEdgeError("give CHECKPOINT and EXPORT (parity), or EXPORT with --against REF (quality)")
    from exporter.verify import format_report, verify_export

    lengths = _prompt_lengths(prompt_lengths or "1,63,64,65,130")
    report = verify_export(str(paths[0]), paths[1], lengths, decode_steps, rtol, variant)
    click.echo(format_report(report, per_step))
    if json_path:
        json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.passed:
        sys.exit(1)


def _prompt_lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise QwenEdgeError(f"--prompt-lengths {text!r}: give comma-separated integers, e.g. 1,64,130") from None
    if any(n < 1 for n in lengths):
        raise QwenEdgeError("--prompt-lengths: every prompt needs at least one token")
    return lengths


def _verify_coreml(paths: tuple[Path, ...], variant: str, decode_steps: int, prompt_lengths: str | None,
                   rtol: float | None, per_step: bool, json_path: Path | None, runner: str) -> None:
    from exporter.coreml_check import format_package_spec, verify_coreml
    from exporter.verify import format_report

    lengths = _prompt_lengths(prompt_lengths or "64,130")
    report, spec = verify_coreml(str(paths[0]), paths[1], variant, lengths, decode_steps, rtol, runner)
    click.echo(format_package_spec(spec))
    click.echo(format_report(report, per_step))
    if json_path:
        json_path.write_text(json.dumps({"package": spec.to_dict(), "parity": report.to_dict()}, indent=2) + "\n")
    if not report.passed:
        sys.exit(1)


def _verify_quality(export_dir: Path, against: Path, variant_names: str | None, text_path: Path | None, tokens: int,
                    gate_items: tuple[str, ...], json_path: Path | None, junit_path: Path | None) -> None:
    from exporter.export import resolve_checkpoint
    from exporter.quality import format_quality, measure_quality, write_json, write_junit
    from quant.schemes import GateOverrides

    names = [n.strip() for n in variant_names.split(",")] if variant_names else None
    report = measure_quality(export_dir, resolve_checkpoint(against), names, text_path, tokens,
                             gates=GateOverrides.parse(gate_items))
    click.echo(format_quality(report))
    if json_path:
        write_json(report, json_path)
    if junit_path:
        write_junit(report, junit_path)
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the model's chat template.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--variant", default=None, help="Which exported variant to run (default: the first one exported).")
def generate(export_dir: Path, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float,
             seed: int | None, threads: int | None, variant: str | None) -> None:
    """Generate text from an export, streaming tokens to stdout."""
    from runtime_py.generate import Sampling, generate as run_generate
    from runtime_py.session import OnnxModel, export_variants
    from runtime_py.tokenizer import StreamDecoder, TextTokenizer

    try:
        sampling = Sampling(temperature, top_p, seed)
    except ValueError as exc:
        raise QwenEdgeError(str(exc)) from exc
    tokenizer = TextTokenizer(export_dir)
    model = OnnxModel(export_dir, variant or export_variants(export_dir)[0], threads=threads)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    stream = StreamDecoder(tokenizer)
    click.echo(prompt if not chat else "", nl=False)
    run_generate(model, tokenizer.encode(text), max_new_tokens, sampling, stop_ids=_stop_ids(export_dir),
                 on_token=lambda t: click.echo(stream.push(t), nl=False))
    click.echo()


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QwenEdgeError(f"{option} {text!r}: give comma-separated integers") from None
    if not values or min(values) < 1:
        raise QwenEdgeError(f"{option} {text!r}: give one or more positive integers")
    return values


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--variant", default=None, help="Variant to measure (default: the first one exported).")
@click.option("--threads", "threads_text", default=None, help="Comma-separated thread counts (default: 1 and all cores).")
@click.option("--prompt-lengths", default="128,512", show_default=True)
@click.option("--decode-tokens", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Measured repetitions after one warm-up.")
@click.option("--contexts", default="1024,2048,4096,8192,16384,32768", show_default=True,
              help="Context lengths for the state-memory curve.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench_out"), show_default=True)
@click.option("--compare", "compare_checkpoint", type=click.Path(path_type=Path), default=None,
              help="Also run the peers on this checkpoint: onnxruntime-genai int4 (its own builder) and transformers eager.")
def bench(export_dir: Path, variant: str | None, threads_text: str | None, prompt_lengths: str, decode_tokens: int,
          repeats: int, contexts: str, out_dir: Path, compare_checkpoint: Path | None) -> None:
    """Measure speed, latency, memory and CPU cost of EXPORT_DIR; write JSON, Markdown and PNG plots."""
    from exporter.bench_report import write_report
    from exporter.export import resolve_checkpoint
    from runtime_py.bench import markdown_table, run_benchmark
    from runtime_py.session import export_variants

    cores = os.cpu_count() or 1
    threads = _int_list(threads_text, "--threads") if threads_text else sorted({1, cores})
    report = run_benchmark(export_dir, variant or export_variants(export_dir)[0], threads,
                           _int_list(prompt_lengths, "--prompt-lengths"), decode_tokens, repeats,
                           _int_list(contexts, "--contexts"))
    if compare_checkpoint is not None:
        report.update(_compare_peers(report, resolve_checkpoint(compare_checkpoint), threads, out_dir,
                                     _int_list(prompt_lengths, "--prompt-lengths"), decode_tokens, repeats))
    files = write_report(report, out_dir)
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
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def package_build(export_dir: Path, out: Path, target: str, variant_names: str | None, coreml_dir: Path | None,
                  force: bool) -> None:
    """Write the TARGET app bundle of EXPORT_DIR into OUT, with manifest.json (sizes, SHA-256 of every file)."""
    from exporter.package import package_export

    names = [n.strip() for n in variant_names.split(",") if n.strip()] if variant_names else None
    manifest = package_export(export_dir, out, target, names, force, coreml_dir)
    click.echo(f"packaged {export_dir} -> {out} ({target}: {', '.join(manifest['variants'])}; "
               f"{len(manifest['files'])} files, {manifest['total_bytes']:,} bytes)")


@package.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
def package_verify(bundle: Path) -> None:
    """Re-check every file's size and SHA-256 against BUNDLE's manifest.json; exit 1 on any difference."""
    from exporter.package import verify_bundle

    manifest = verify_bundle(bundle)
    click.echo(f"ok: {bundle} ({manifest['target']}): {len(manifest['files'])} files, "
               f"{manifest.get('total_bytes', 0):,} bytes match the manifest")


@main.group()
def devices() -> None:
    """Target device profiles, and whether an export fits them."""


@devices.command("list")
def devices_list() -> None:
    """Every profile with its numbers and sources."""
    from devices.profiles import DEVICES

    for d in DEVICES:
        click.echo(f"{d.name} ({d.soc})")
        for field in ("ram_gb", "app_memory_gb", "bandwidth_gb_s", "performance_cores", "npu", "sustained_power_w"):
            v = getattr(d, field)
            shown = "unknown" if v.value is None else v.value
            extra = f" [{v.note}]" if v.note else ""
            click.echo(f"  {field}: {shown}{extra} — {v.source or 'no source'} ({v.confidence}"
                       f"{', derived' if v.derived else ''})")


@devices.command("fit")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--context", default=4096, show_default=True, help="Context length the state must hold.")
@click.option("--threads", type=int, default=None, help="Threads for the calibration run on this machine.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the estimates as JSON.")
def devices_fit(export_dir: Path, context: int, threads: int | None, json_path: Path | None) -> None:
    """Per device and variant: does it fit, and an ESTIMATE of decode tok/s and joules per token."""
    import dataclasses

    from devices.fit import FORMULA, bytes_per_token, calibrate_efficiency, fit, measure_host_bandwidth
    from devices.profiles import DEVICES
    from runtime_py.bench import measure_config, state_bytes
    from runtime_py.session import OnnxModel, read_manifest

    manifest = read_manifest(export_dir)
    names = list(manifest["variants"])
    bandwidth = measure_host_bandwidth()
    rows = []
    for name in names:
        entry = manifest["variants"][name]
        decoder = export_dir / entry["decoder"]
        weight_bytes = decoder.stat().st_size + (Path(str(decoder) + "_data").stat().st_size
                                                 if Path(str(decoder) + "_data").is_file() else 0)
        state = state_bytes(OnnxModel(export_dir, name, threads=1), context)
        per_token = bytes_per_token(weight_bytes, state["recurrent_and_conv_bytes"], state["kv_cache_bytes"])
        measured = measure_config(export_dir, name, threads or (os.cpu_count() or 1), [16], 32, 1)
        tok_s = measured["decode"]["tokens_per_s"]["median"]
        efficiency = calibrate_efficiency(tok_s, per_token, bandwidth)
        for device in DEVICES:
            rows.append(fit(device, name, entry["bytes_on_disk"], state["total_bytes"], per_token, efficiency))
        click.echo(f"{name}: {tok_s:.1f} tok/s here, {per_token / 2**20:.1f} MiB read per token, "
                   f"host copy bandwidth {bandwidth:.1f} GB/s -> efficiency {efficiency:.3f}")
    click.echo(f"ESTIMATES ({FORMULA}); context {context}")
    click.echo(f"{'device':<24} {'variant':<7} {'needs MiB':>9} {'budget':>16} {'fits':>5} {'tok/s*':>8} {'J/tok*':>8}")
    for r in rows:
        budget = f"{r.budget_bytes / 1e9:.0f} GB {r.budget_kind}" if r.budget_bytes else "unknown"
        fits = "?" if r.fits is None else ("yes" if r.fits else "no")
        tok = f"{r.decode_tok_s:.1f}" if r.decode_tok_s else "?"
        joules = f"{r.joules_per_token:.3f}" if r.joules_per_token else "?"
        click.echo(f"{r.device:<24} {r.variant:<7} {r.needed_bytes / 2**20:>9.1f} {budget:>16} {fits:>5} {tok:>8} {joules:>8}")
    if json_path:
        json_path.write_text(json.dumps({"formula": FORMULA, "context": context, "host_bandwidth_gb_s": bandwidth,
                                         "estimates": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")


def _compare_peers(report: dict, checkpoint: Path, threads: list[int], out_dir: Path, prompt_lengths: list[int],
                   decode_tokens: int, repeats: int) -> dict:
    from exporter.peers import build_genai_export, missing_peer, ratios, run_peer

    peers, skipped = [], {}
    for name, kind in (("onnxruntime-genai", "genai"), ("transformers", "transformers")):
        reason = missing_peer(name)
        if reason:
            skipped[name] = reason
            click.echo(f"skipping {name}: {reason}", err=True)
            continue
        path = build_genai_export(checkpoint, out_dir / "peers" / "genai-int4") if kind == "genai" else checkpoint
        for t in threads:
            peers.append(run_peer(kind, path, t, prompt_lengths, decode_tokens, repeats))
    return {"peers": peers, "skipped_peers": skipped, "ratios": ratios(report["configs"], peers)}


def _stop_ids(export_dir: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = export_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
    return []


if __name__ == "__main__":
    main()
