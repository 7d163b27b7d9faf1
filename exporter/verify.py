"""Parity of an ONNX export against the PyTorch reference decoder built from the same checkpoint.

For each prompt: one prefill call, then greedy decode steps. Both sides are fed the reference's
greedy token (teacher forcing), so every step compares logits for the same history; if all greedy
choices agree, the free-running greedy sequences are identical.

Tolerance: max |logits_onnx - logits_ref| <= rtol * max(1, max |logits_ref|) per call, i.e. relative
to the logit scale of that call (fp32 default rtol 1e-4). A greedy disagreement fails unless it is a
near-tie: the reference prefers its token by no more than that same tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporter.export import resolve_checkpoint
from graphs.checkpoint import open_checkpoint
from graphs.qwen3_5 import Qwen35Decoder
from runtime_py.session import OnnxModel

DEFAULT_PROMPT_LENGTHS = (1, 63, 64, 65, 130)
SINGLE_CALL = 1 << 30


@dataclass
class StepResult:
    step: int  # 0 is the prefill call
    max_abs_diff: float
    logit_scale: float
    ref_token: int
    onnx_token: int
    within_tolerance: bool
    token_ok: bool  # same greedy token, or a near-tie


@dataclass
class PromptReport:
    prompt_length: int
    steps: list[StepResult] = field(default_factory=list)

    @property
    def greedy_agreement(self) -> float:
        return sum(s.ref_token == s.onnx_token for s in self.steps) / len(self.steps)

    @property
    def passed(self) -> bool:
        return all(s.within_tolerance and s.token_ok for s in self.steps)


@dataclass
class VerifyReport:
    checkpoint: str
    export: str
    rtol: float
    decode_steps: int
    prompts: list[PromptReport]

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.prompts)

    def to_dict(self) -> dict:
        out = asdict(self)
        for p, raw in zip(self.prompts, out["prompts"]):
            raw["greedy_agreement"] = p.greedy_agreement
            raw["passed"] = p.passed
        out["passed"] = self.passed
        out["tolerance_rule"] = "max|onnx-ref| <= rtol * max(1, max|ref|) per call; greedy ties within the same bound allowed"
        return out


class ReferenceRunner:
    """The PyTorch decoder driven like the runtime: explicit state carried between calls."""

    def __init__(self, model: Qwen35Decoder) -> None:
        self.model = model
        self.state = model.initial_state(1)
        self.length = 0

    @torch.no_grad()
    def forward(self, ids: list[int]) -> np.ndarray:
        t = len(ids)
        embeds = self.model.embed_tokens(torch.tensor([ids]))
        mask = torch.ones(1, self.length + t, dtype=torch.int64)
        pos = torch.arange(self.length, self.length + t).expand(3, 1, t)
        logits, *self.state = self.model(embeds, mask, pos, *self.state)
        self.length += t
        return logits[0].numpy()


def greedy_reference(model: Qwen35Decoder, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation of `prompt` by the PyTorch reference, carrying state like the runtime."""
    runner = ReferenceRunner(model)
    out, logits = [], runner.forward(prompt)
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        logits = runner.forward([out[-1]])
    return out


def compare_step(step: int, ref: np.ndarray, got: np.ndarray, rtol: float) -> StepResult:
    """Compare the logits of one call ([T, V] each); tokens are read at the last position.

    An export with last-position logits returns one row: it is compared with the reference's last.
    """
    ref = ref[-got.shape[0] :]
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    tol = rtol * max(1.0, scale)
    ref_token, onnx_token = int(ref[-1].argmax()), int(got[-1].argmax())
    near_tie = float(ref[-1, ref_token] - ref[-1, onnx_token]) <= tol
    return StepResult(step, diff, scale, ref_token, onnx_token, diff <= tol, ref_token == onnx_token or near_tie)


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=length).tolist()


def verify_export(
    checkpoint: str | Path,
    export_dir: str | Path,
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS,
    decode_steps: int = 32,
    rtol: float = 1e-4,
    variant: str = "fp32",
) -> VerifyReport:
    folder = resolve_checkpoint(checkpoint)
    model = open_checkpoint(folder).build_decoder()
    onnx_model = OnnxModel(export_dir, variant, prefill_chunk=SINGLE_CALL)  # each prompt in one graph call
    reports = []
    for n, length in enumerate(prompt_lengths):
        ids = prompt_ids(length, model.cfg.vocab_size, seed=n)
        ref_runner, state = ReferenceRunner(model), onnx_model.new_state(1)
        report = PromptReport(length)
        ref = ref_runner.forward(ids)
        got = onnx_model.forward(np.array([ids]), state)[0]
        for step in range(decode_steps + 1):
            result = compare_step(step, ref, got, rtol)
            report.steps.append(result)
            if step == decode_steps:
                break
            ref = ref_runner.forward([result.ref_token])
            got = onnx_model.forward(np.array([[result.ref_token]]), state)[0]
        reports.append(report)
    return VerifyReport(str(folder), str(export_dir), rtol, decode_steps, reports)


def format_report(report: VerifyReport, per_step: bool = False) -> str:
    lines = [f"{'prompt':>6}  {'prefill Δ':>10}  {'decode max Δ':>12}  {'logit scale':>11}  {'greedy':>7}  result"]
    for p in report.prompts:
        decode = max((s.max_abs_diff for s in p.steps[1:]), default=0.0)
        scale = max(s.logit_scale for s in p.steps)
        lines.append(f"{p.prompt_length:>6}  {p.steps[0].max_abs_diff:>10.2e}  {decode:>12.2e}  {scale:>11.2f}  "
                     f"{p.greedy_agreement:>7.1%}  {'ok' if p.passed else 'FAIL'}")
        if per_step:
            lines += [f"        step {s.step:3d}: Δ {s.max_abs_diff:.2e}  tokens {s.ref_token}/{s.onnx_token}" for s in p.steps]
    verdict = "PASS" if report.passed else "FAIL"
    lines.append(f"{verdict}: tolerance {report.rtol:g} × logit scale, {report.decode_steps} decode steps per prompt")
    return "\n".join(lines)
