"""`qwen-edge verify`: one request in, one outcome out (the CLI only prints it and sets the exit code).

    parity   CHECKPOINT EXPORT            PyTorch reference vs an ONNX variant (exporter/verify/parity.py)
    Core ML  --format coreml CHECKPOINT EXPORT   the same loop through the MIL interpreter or Core ML
    quality  [--format coreml] EXPORT --against REF   every variant vs a float export or checkpoint (quality.py)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from default_model import resolve_checkpoint
from graphs.errors import QwenEdgeError

ONNX_PROMPT_LENGTHS = (1, 63, 64, 65, 130)
COREML_PROMPT_LENGTHS = (64, 130)


@dataclass(frozen=True)
class VerifyRequest:
    paths: tuple[Path, ...]  # (CHECKPOINT, EXPORT) for parity; (EXPORT,) with `against` for quality
    against: Path | None = None
    fmt: str = "onnx"
    variant: str = "fp32"  # parity: the variant checked
    decode_steps: int = 32
    prompt_lengths: tuple[int, ...] | None = None  # None: the format's default
    rtol: float | None = None  # None: the format's default
    per_step: bool = False
    runner: str = "mil"  # Core ML: "mil" (NumPy interpreter) or "coreml" (macOS)
    variants: tuple[str, ...] | None = None  # quality: None is every variant
    text: Path | None = None  # quality: held-out text (default: the default model's)
    tokens: int = 1024
    gates: tuple[str, ...] = ()  # quality: overrides such as "q4.min_top1=0.95"
    by_layer: bool | None = None  # ONNX parity: the decoder one layer at a time (None: when needed)


@dataclass
class VerifyOutcome:
    text: str  # what the command prints
    passed: bool
    report: dict  # the --json document
    quality: object | None = field(default=None)  # the QualityReport, for --junit

    def write_json(self, path: Path) -> None:
        from exporter.atomic import write_text_atomically

        write_text_atomically(path, json.dumps(self.report, indent=2) + "\n")

    def write_junit(self, path: Path) -> None:
        from exporter.verify.quality import write_junit

        if self.quality is None:
            raise QwenEdgeError("--junit applies to quality checks (EXPORT --against REF)")
        write_junit(self.quality, path)


def run_verify(request: VerifyRequest) -> VerifyOutcome:
    if request.by_layer is not None and (request.against is not None or request.fmt != "onnx"):
        raise QwenEdgeError("--by-layer/--whole-graph apply to ONNX parity checks (CHECKPOINT EXPORT); drop them")
    if request.against is not None:
        if len(request.paths) != 1:
            raise QwenEdgeError("give EXPORT alone with --against REF (quality), or CHECKPOINT and EXPORT (parity)")
        return _quality(request)
    if len(request.paths) != 2:
        raise QwenEdgeError("give CHECKPOINT and EXPORT (parity), or EXPORT with --against REF (quality)")
    _check_prompt_room(request)
    if request.fmt == "coreml":
        return _coreml_parity(request)
    return _onnx_parity(request)


def _check_prompt_room(request: VerifyRequest) -> None:
    """Every prompt and its decode steps fit the context (the model's, or a Core ML export's KV capacity)."""
    from graphs.config import check_within_context, load_text_config
    from runtime_py.export_format import read_manifest

    lengths = request.prompt_lengths or (COREML_PROMPT_LENGTHS if request.fmt == "coreml" else ONNX_PROMPT_LENGTHS)
    cfg = load_text_config(resolve_checkpoint(request.paths[0]))
    check_within_context(cfg, max(lengths) + request.decode_steps, "--prompt-lengths + --decode-steps")
    if request.fmt == "coreml":
        capacity = read_manifest(request.paths[1]).get("context_capacity")
        if isinstance(capacity, int) and max(lengths) + request.decode_steps > capacity:
            raise QwenEdgeError(f"--prompt-lengths + --decode-steps: {max(lengths) + request.decode_steps:,} tokens do "
                                f"not fit the export's KV cache ({capacity:,}, its --context); ask for fewer")


def _onnx_parity(request: VerifyRequest) -> VerifyOutcome:
    from exporter.verify.parity import format_report, verify_export

    report = verify_export(str(request.paths[0]), request.paths[1], request.prompt_lengths or ONNX_PROMPT_LENGTHS,
                           request.decode_steps, request.rtol, request.variant, request.by_layer)
    return VerifyOutcome(format_report(report, request.per_step), report.passed, report.to_dict())


def _coreml_parity(request: VerifyRequest) -> VerifyOutcome:
    from exporter.coreml.backend import require_coremltools
    from exporter.coreml.check import format_package_spec, verify_coreml
    from exporter.verify.parity import format_report

    require_coremltools("verify --format coreml")
    report, spec = verify_coreml(str(request.paths[0]), request.paths[1], request.variant,
                                 request.prompt_lengths or COREML_PROMPT_LENGTHS, request.decode_steps, request.rtol,
                                 request.runner)
    text = format_package_spec(spec) + "\n" + format_report(report, request.per_step)
    return VerifyOutcome(text, report.passed, {"package": spec.to_dict(), "parity": report.to_dict()})


def _quality(request: VerifyRequest) -> VerifyOutcome:
    from exporter.verify.quality import format_quality, measure_quality
    from quant.schemes import GateOverrides
    from runtime_py.export_format import read_manifest

    export = request.paths[0]
    fmt = read_manifest(export).get("format", "onnx")
    if fmt != request.fmt:
        raise QwenEdgeError(f"{export} is a{' Core ML' if fmt == 'coreml' else 'n ONNX'} export; "
                            f"{'add --format coreml' if fmt == 'coreml' else 'drop --format coreml'} to score it")
    if fmt == "coreml":
        from exporter.coreml.backend import require_coremltools

        require_coremltools("verify --format coreml")
    report = measure_quality(export, resolve_checkpoint(request.against),
                             list(request.variants) if request.variants else None, request.text, request.tokens,
                             gates=GateOverrides.parse(request.gates), runner=request.runner)
    return VerifyOutcome(format_quality(report), report.passed, report.to_dict(), report)
