"""Parity of an export against the PyTorch reference decoder built from the same checkpoint.

`teacher_forced` is the one parity loop, for any target runner (exporter/verify/runners.py: ONNX
here, the MIL interpreter or Core ML in exporter/coreml/check.py) and any reference scorer. For each
prompt the target runs as an app would: one prefill call, then greedy decode steps, each fed the
target's own greedy token. The reference is then teacher-forced with that sequence (prompt + the
target's tokens): it gives the logits of every position, and each call of the target is compared with
the reference's logits at the same positions, so every comparison is for the same history; if every
greedy choice agrees, the free-running greedy sequences are identical. Scoring whole sequences lets
the reference run layer by layer over all prompts with each weight read once (graphs/layerwise.py),
so a 9B export is checked in the memory of one layer.

Tolerance: max |logits_onnx - logits_ref| <= rtol * max(1, max |logits_ref|) per call, i.e. relative
to the logit scale of that call (fp32 default rtol 1e-4). A greedy disagreement fails unless it is a
near-tie: the reference prefers its token by no more than that same tolerance.

A compressed variant is checked against the reference with the same rounded weights
(quant/dequantized.py), its MatMulNBits computing in fp32: that isolates the export (graphs and
stored bytes) from the scheme's rounding and from the kernel's int8 inputs, which `verify --against`
measures. Against the raw checkpoint, random weights cannot tell the two apart (a tiny untied model:
q4 greedy agreement 41 %; against its rounded weights, 100 % within 2e-6).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from default_model import resolve_checkpoint
from exporter.onnx.forms import all_nodes
from exporter.pipeline import files_bytes
from exporter.verify.runners import LayerwiseReference, OnnxRunner, SequenceRunner, SequenceScorer
from exporter.verify.sliced import sliced_calls
from graphs.checkpoint import open_checkpoint
from quant.dequantized import FLOAT_REFERENCE, describe_reference, variant_weights
from runtime_py.export_format import variant_record
from runtime_py.session import OnnxModel

DEFAULT_PROMPT_LENGTHS = (1, 63, 64, 65, 130)
# Logit tolerance relative to the logit scale, by the variant's activation dtype. fp16: measured on a
# tiny random untied model against its fp16-rounded weights, 8.8e-3 (fp16) and 1.3e-2 (q4f16).
DEFAULT_RTOL = {"float32": 1e-4, "float16": 5e-2}
FP32_COMPUTE = 1  # MatMulNBits accuracy level: fp32 inputs and accumulation
INPUT_ROUNDING = {2: "fp16", 3: "bf16", 4: "int8"}  # what the lower accuracy levels round the inputs to
SINGLE_CALL = 1 << 30
WHOLE_GRAPH = "whole graph, decode fed its own greedy tokens"
BY_LAYER = "one decoder layer's session at a time, decode fed a fixed seeded continuation"
CONTINUATION_SEED = 1000  # + the prompt's index: the tokens a layer-by-layer run decodes
# ONNX Runtime's session memory per byte of decoder on disk, measured (BENCHMARKS.md issue 12): fp16
# weights are cast to fp32 at load (2B 9.8 GB and 4B 19.0 GB for 4.9 and 9.9 GB), int4 ones repacked
# (9B q4 7.6 GB for 6.4 GB)
SESSION_BYTES_PER_BYTE = {"float16": 2.0, "quantized": 1.2, "float32": 1.1}


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
    reference: str = FLOAT_REFERENCE
    mode: str = WHOLE_GRAPH

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


def teacher_forced(reference: SequenceScorer, target: SequenceRunner, prompts: list[list[int]], decode_steps: int,
                   rtol: float) -> list[PromptReport]:
    """Per prompt: the target's prefill, then `decode_steps` steps fed its greedy token; then the
    reference scores every sequence at once, and each target call is compared with it."""
    return compare_with_reference(reference, prompts, *target_calls(target, prompts, decode_steps), rtol)


def target_calls(target: SequenceRunner, prompts: list[list[int]],
                 decode_steps: int) -> tuple[list[list[np.ndarray]], list[list[int]]]:
    """(each prompt's call logits, each prompt with its greedy continuation): the target's half of
    `teacher_forced`, so a caller can free the target before the reference runs."""
    calls, sequences = [], []
    for ids in prompts:
        target.start()
        got = [target.prefill(ids)]
        tokens = []
        for _ in range(decode_steps):
            tokens.append(int(got[-1][-1].argmax()))
            got.append(target.decode(tokens[-1]))
        calls.append(got)
        sequences.append(list(ids) + tokens)
    return calls, sequences


def compare_with_reference(reference: SequenceScorer, prompts: list[list[int]], calls: list[list[np.ndarray]],
                           sequences: list[list[int]], rtol: float) -> list[PromptReport]:
    """The reference's logits of every sequence, compared call by call with the target's."""
    reports = []
    for ids, got, ref in zip(prompts, calls, reference.score(sequences)):
        report = PromptReport(len(ids))
        t = len(ids)
        report.steps.append(compare_step(0, ref[:t], got[0], rtol))
        for step in range(1, len(got)):  # each decode call after the prefill
            report.steps.append(compare_step(step, ref[t + step - 1 : t + step], got[step], rtol))
        reports.append(report)
    return reports


def fp32_matmuls(path: Path) -> bytes:
    """The graph at `path` (weights left external) with every MatMulNBits computing in fp32."""
    model = onnx.load(str(path), load_external_data=False)
    for node in all_nodes(model.graph):
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = FP32_COMPUTE
    return model.SerializeToString()


def verify_export(
    checkpoint: str | Path,
    export_dir: str | Path,
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS,
    decode_steps: int = 32,
    rtol: float | None = None,
    variant: str = "fp32",
    by_layer: bool | None = None,
) -> VerifyReport:
    """Parity of one ONNX variant: each prompt in one graph call, then decode steps; the reference
    runs layer by layer from the checkpoint (graphs/layerwise.py). `by_layer`: the ONNX decoder too,
    one layer's session at a time (None: when the whole session might not fit, `needs_slicing`)."""
    folder = resolve_checkpoint(checkpoint)
    ck = open_checkpoint(folder)
    record = variant_record(export_dir, variant)
    rtol = DEFAULT_RTOL[record.get("activations", "float32")] if rtol is None else rtol
    prompts = [prompt_ids(length, ck.config.vocab_size, seed=n) for n, length in enumerate(prompt_lengths)]
    exact = record.get("accuracy_level", FP32_COMPUTE) > FP32_COMPUTE  # only quantized variants record one
    rewrite = fp32_matmuls if exact else None
    if by_layer is None:
        by_layer = needs_slicing(export_dir, variant, record)
    if by_layer:  # decode fed a fixed continuation (exporter/verify/sliced.py says why)
        sequences = [ids + prompt_ids(decode_steps, ck.config.vocab_size, seed=CONTINUATION_SEED + n)
                     for n, ids in enumerate(prompts)]
        calls = sliced_calls(Path(export_dir), variant, sequences, list(prompt_lengths), rewrite)
    else:
        target = OnnxModel(export_dir, variant, prefill_chunk=SINGLE_CALL, rewrite=rewrite)
        # The sessions are dropped before the reference runs: peak memory is the larger of the two, not their sum.
        calls, sequences = target_calls(OnnxRunner(target), prompts, decode_steps)
        del target
    reference = variant_weights(ck, variant, record)
    reports = compare_with_reference(LayerwiseReference(reference), prompts, calls, sequences, rtol)
    described = describe_reference(variant, record)
    if exact:
        level = record["accuracy_level"]
        described += (f"; MatMulNBits run with fp32 compute (the export's accuracy level {level} rounds their inputs "
                      f"to {INPUT_ROUNDING.get(level, 'a lower precision')}: `verify --against` measures that)")
    mode = BY_LAYER if by_layer else WHOLE_GRAPH
    return VerifyReport(str(folder), str(export_dir), rtol, decode_steps, reports, described, mode)


def needs_slicing(export_dir: str | Path, variant: str, record: dict) -> bool:
    """Whether the whole decoder's session could take more than half of this machine's memory."""
    kind = "quantized" if "accuracy_level" in record else record.get("activations", "float32")
    decoder = record["decoder"]  # the graph and its data file, as save_graph names it
    estimate = SESSION_BYTES_PER_BYTE[kind] * files_bytes(Path(export_dir), [decoder, decoder + "_data"])
    return estimate > 0.5 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_report(report: VerifyReport, per_step: bool = False) -> str:
    lines = [f"{'prompt':>6}  {'prefill Δ':>10}  {'decode max Δ':>12}  {'logit scale':>11}  {'greedy':>7}  result"]
    for p in report.prompts:
        decode = max((s.max_abs_diff for s in p.steps[1:]), default=0.0)
        scale = max(s.logit_scale for s in p.steps)
        lines.append(f"{p.prompt_length:>6}  {p.steps[0].max_abs_diff:>10.2e}  {decode:>12.2e}  {scale:>11.2f}  "
                     f"{p.greedy_agreement:>7.1%}  {'ok' if p.passed else 'FAIL'}")
        if per_step:
            lines += [f"        step {s.step:3d}: Δ {s.max_abs_diff:.2e}  tokens {s.ref_token}/{s.onnx_token}" for s in p.steps]
    lines.append(f"reference: {report.reference}")
    if report.mode != WHOLE_GRAPH:
        lines.append(f"ONNX side: {report.mode}")
    verdict = "PASS" if report.passed else "FAIL"
    lines.append(f"{verdict}: tolerance {report.rtol:g} × logit scale, {report.decode_steps} decode steps per prompt")
    return "\n".join(lines)
