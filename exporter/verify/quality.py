"""Accuracy of export variants against a float reference, measured on held-out text.

Per variant: top-1 agreement with the reference's next-token choice, mean KL(reference ‖ variant)
over positions, perplexity of the true next tokens (and its change against the reference), and
greedy-sequence agreement (the share of greedy tokens, from short prompts, produced before the
first divergence). Variants run token by token, the decode path a phone app uses: ONNX variants
through runtime_py, Core ML variants through the NumPy MIL interpreter (or Core ML on macOS) with
the host logic an app mirrors (greedy prompts go through the chunked `prefill` function). Each
scheme has a default gate per format (`quant/schemes.py`); a missed gate fails the run.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from default_model import HELDOUT_TEXT
from exporter.verify.runners import ReferenceRunner, SequenceRunner, greedy_reference
from exporter.verify.runners import greedy_tokens as greedy_continuation
from graphs.checkpoint import open_checkpoint
from graphs.errors import QwenEdgeError
from quant.schemes import SCHEMES, GateOverrides, QualityGate
from runtime_py.export_format import MANIFEST, export_variants, read_manifest
from runtime_py.generate import generate
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer

PositionLogits = Callable[[list[int]], np.ndarray]  # ids [T] -> logits [T, V] (row t predicts ids[t+1])
Greedy = Callable[[list[int], int], list[int]]
Scorer = tuple[PositionLogits, Greedy]


@dataclass
class VariantQuality:
    variant: str
    positions: int
    top1_agreement: float
    mean_kl: float
    perplexity: float
    reference_perplexity: float
    perplexity_increase: float  # relative
    greedy_agreement: float
    gate: QualityGate
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class GateCheck:
    """One gated metric of one variant: its value, the limit, and whether it holds."""

    metric: str  # the VariantQuality field
    label: str
    value: float
    limit: float
    higher_is_better: bool

    @property
    def ok(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    @property
    def message(self) -> str:
        """The failure as the report prints it, e.g. 'mean KL 0.2 > 0.1'."""
        op = "<" if self.higher_is_better else ">"
        if self.metric == "top1_agreement":
            return f"{self.label} {self.value:.2%} {op} {self.limit:.2%}"
        if self.metric == "perplexity_increase":
            return f"{self.label} +{self.value:.2%} {op} +{self.limit:.2%}"
        return f"{self.label} {self.value:.4g} {op} {self.limit:g}"

    @property
    def junit_message(self) -> str:
        """The failure in raw numbers, ending with the limit as given."""
        return f"{self.value:.4g} {'<' if self.higher_is_better else '>'} {self.limit}"


def gate_checks(q: "VariantQuality") -> list[GateCheck]:
    """The one place a variant is held to its gate."""
    return [GateCheck("top1_agreement", "top-1 agreement", q.top1_agreement, q.gate.min_top1, True),
            GateCheck("mean_kl", "mean KL", q.mean_kl, q.gate.max_kl, False),
            GateCheck("perplexity_increase", "perplexity", q.perplexity_increase, q.gate.max_ppl_increase, False)]


@dataclass
class QualityReport:
    export: str
    reference: str
    text: str
    variants: list[VariantQuality]
    format: str = "onnx"  # of the scored export; Core ML variants ran through `runner`
    runner: str = "onnxruntime"

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)

    def to_dict(self) -> dict:
        out = asdict(self)
        for v, raw in zip(self.variants, out["variants"]):
            raw["passed"] = v.passed
        out["passed"] = self.passed
        return out


class _Accumulator:
    def __init__(self) -> None:
        self.agree = self.count = 0
        self.kl = self.nll = self.ref_nll = 0.0

    def add(self, ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> None:
        ref_logp, got_logp = _log_softmax(ref), _log_softmax(got)
        self.kl += float((np.exp(ref_logp) * (ref_logp - got_logp)).sum())
        self.agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        rows = np.arange(len(targets))
        self.nll -= float(got_logp[rows, targets].sum())
        self.ref_nll -= float(ref_logp[rows, targets].sum())
        self.count += len(targets)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _onnx_runner(model: OnnxModel) -> Scorer:
    def logits(ids: list[int]) -> np.ndarray:
        state = model.new_state(1)
        if model.all_logits:
            return model.forward(np.array([ids]), state)[0]
        return np.stack([model.forward(np.array([[t]]), state)[0, -1] for t in ids])

    return logits, lambda prompt, n: generate(model, prompt, n)


def _sequence_scorer(runner: SequenceRunner) -> Scorer:
    """A runner scored token by token (its decode function); greedy prompts go through its prefill."""
    def logits(ids: list[int]) -> np.ndarray:
        runner.start()
        return np.concatenate([runner.decode(t) for t in ids])

    return logits, lambda prompt, n: greedy_continuation(runner, prompt, n)


def variant_scorer(export_dir: Path, variant: str, runner: str = "mil") -> Scorer:
    """One variant of an export, ONNX or Core ML (`runner`: "mil" interpreter or "coreml" on macOS)."""
    if read_manifest(export_dir).get("format") == "coreml":
        from exporter.coreml.check import coreml_runner

        return _sequence_scorer(coreml_runner(export_dir, variant, runner))
    return _onnx_runner(OnnxModel(export_dir, variant))


def checkpoint_scorer(folder: Path) -> Scorer:
    """The PyTorch reference of a checkpoint folder."""
    model = open_checkpoint(folder).build_decoder()
    return (lambda ids: ReferenceRunner(model).forward(ids)), (lambda prompt, n: greedy_reference(model, prompt, n))


def _reference(against: Path, runner: str) -> tuple[PositionLogits, Greedy, str]:
    """A float export (its fp32 variant, else its first; ONNX or Core ML) or a checkpoint (the PyTorch reference)."""
    if (against / MANIFEST).is_file():
        names = export_variants(against)
        variant = "fp32" if "fp32" in names else names[0]
        return (*variant_scorer(against, variant, runner), f"{against} ({variant})")
    if (against / "config.json").is_file():
        return (*checkpoint_scorer(against), f"{against} (PyTorch reference)")
    raise QwenEdgeError(f"--against {against}: neither an export folder ({MANIFEST}) nor a checkpoint (config.json)")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure_quality(
    export_dir: Path,
    against: Path,
    variants: list[str] | None = None,
    text_path: Path | None = None,
    tokens: int = 1024,
    window: int = 128,
    greedy_prompts: int = 4,
    greedy_tokens: int = 32,
    gates: GateOverrides = GateOverrides(),
    token_ids: list[int] | None = None,
    runner: str = "mil",
) -> QualityReport:
    """Score `variants` of `export_dir` (ONNX or Core ML) against `against` on held-out text (or on
    `token_ids` directly), each held to its scheme's gate for that format."""
    text_path = text_path or HELDOUT_TEXT
    if token_ids is None and not text_path.is_file():
        raise QwenEdgeError(f"--text {text_path}: file not found; give a UTF-8 text file of held-out text")
    fmt = read_manifest(export_dir).get("format", "onnx")
    names = variants or export_variants(export_dir)
    unknown = [v for v in names if v not in SCHEMES]
    if unknown:
        raise QwenEdgeError(f"--variants {unknown[0]!r} is not a scheme; choose from {', '.join(SCHEMES)}")
    ids = (token_ids if token_ids is not None else TextTokenizer(export_dir).encode(text_path.read_text()))[:tokens]
    if len(ids) < 2 * window:
        raise QwenEdgeError(f"{text_path}: only {len(ids)} tokens; need at least {2 * window} of held-out text")
    reference = _reference(against, runner)
    scorers = {name: variant_scorer(export_dir, name, runner) for name in names}
    results = score_variants(reference[:2], scorers, {n: gates.gate_for(SCHEMES[n], fmt) for n in names}, ids,
                             window, greedy_prompts, greedy_tokens)
    return QualityReport(str(export_dir), reference[2], "given token ids" if token_ids is not None else str(text_path),
                         results, fmt, runner if fmt == "coreml" else "onnxruntime")


def score_variants(reference: Scorer, scorers: dict[str, Scorer], gates: dict[str, QualityGate], ids: list[int],
                   window: int = 128, greedy_prompts: int = 4, greedy_tokens: int = 32) -> list[VariantQuality]:
    """Each scorer against the reference on `ids` in windows of `window` tokens, held to its gate."""
    ref_logits, ref_greedy = reference
    windows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    stats = {name: _Accumulator() for name in scorers}
    agreement: dict[str, list[float]] = {name: [] for name in scorers}
    for n, w in enumerate(windows):
        ref = ref_logits(w)[:-1]
        targets = np.array(w[1:])
        ref_continuation = ref_greedy(w[:16], greedy_tokens) if n < greedy_prompts else None
        for name, (logits, greedy) in scorers.items():
            stats[name].add(ref, logits(w)[:-1], targets)
            if ref_continuation is not None:
                agreement[name].append(_common_prefix(ref_continuation, greedy(w[:16], greedy_tokens)) / greedy_tokens)
    results = []
    for name in scorers:
        s = stats[name]
        ppl, ref_ppl = float(np.exp(s.nll / s.count)), float(np.exp(s.ref_nll / s.count))
        q = VariantQuality(name, s.count, s.agree / s.count, s.kl / s.count, ppl, ref_ppl, ppl / ref_ppl - 1,
                           float(np.mean(agreement[name])) if agreement[name] else float("nan"), gates[name])
        q.failures.extend(c.message for c in gate_checks(q) if not c.ok)
        results.append(q)
    return results


def format_quality(report: QualityReport) -> str:
    scored = f"{report.export} ({report.format}" + (f", {report.runner} runner)" if report.format == "coreml" else ")")
    lines = [f"export: {scored}", f"reference: {report.reference}", f"text: {report.text}",
             f"{'variant':>8}  {'top-1':>7}  {'mean KL':>9}  {'ppl':>8}  {'Δppl':>7}  {'greedy':>7}  result"]
    for v in report.variants:
        lines.append(f"{v.variant:>8}  {v.top1_agreement:>7.2%}  {v.mean_kl:>9.2e}  {v.perplexity:>8.3f}  "
                     f"{v.perplexity_increase:>+7.2%}  {v.greedy_agreement:>7.1%}  "
                     + ("ok" if v.passed else "FAIL: " + "; ".join(v.failures)))
    lines.append(("PASS" if report.passed else "FAIL") + f": reference perplexity "
                 f"{report.variants[0].reference_perplexity:.3f} over {report.variants[0].positions} positions")
    return "\n".join(lines)


def write_junit(report: QualityReport, path: Path) -> None:
    """One test case per variant and gated metric, so CI systems show exactly which gate failed."""
    suite = ET.Element("testsuite", name="qwen-edge quality")
    cases = failures = 0
    for v in report.variants:
        for check in gate_checks(v):
            case = ET.SubElement(suite, "testcase", classname=f"quality.{v.variant}", name=check.metric)
            cases += 1
            if not check.ok:
                failures += 1
                ET.SubElement(case, "failure", message=check.junit_message)
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    from exporter.atomic import write_text_atomically

    write_text_atomically(path, ET.tostring(suite, encoding="unicode", xml_declaration=True))
