"""Measure how far the Core ML step drifts from the fp32 reference over a long greedy decode.

    python -m exporter.coreml.drift [--checkpoint default] [--steps 2048] [--prompt 64]

Core ML states are fp16. The step (graphs/coreml_step.CoreMLStep, run eagerly in fp32 compute so
only state precision differs) runs greedily and is compared with the reference decoder,
teacher-forced with the step's tokens (exporter/verify/parity.py), in both recurrent-state modes: `state` (fp16 Core ML state) and `io`
(fp32 input/output carried by the caller). Conv state and KV cache are fp16 in both.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from default_model import resolve_checkpoint
from exporter.coreml.sequence import CoreMLRunner
from exporter.verify.parity import prompt_ids, teacher_forced
from exporter.verify.runners import ReferenceRunner
from graphs.checkpoint import open_checkpoint
from graphs.coreml_step import CoreMLStep
from graphs.recurrent_ops import MATMUL_ONLY, REFERENCE


@dataclass
class DriftReport:
    mode: str
    steps: int
    greedy_agreement: float  # share of decode steps whose argmax equals the reference's
    first_disagreement: int | None  # decode step index, None if all agree
    max_relative_diff: float  # max |Δlogits| / max(1, max |logits|) over all steps
    relative_diff_by_window: list[float]  # the same, per window of `window` steps
    window: int


def eager_call(step: CoreMLStep):  # noqa: ANN201
    """A CoreMLSequence call function running the step module in PyTorch."""

    @torch.no_grad()
    def call(function: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(feeds[k]) for k in ("input_ids", "position_ids", "attention_mask", "write_position")]
        if "recurrent_in" in feeds:
            logits, rec = step(*args, torch.from_numpy(feeds["recurrent_in"]))
            return {"logits": logits.numpy(), "recurrent_out": rec.numpy()}
        return {"logits": step(*args)[0].numpy()}

    return call


def measure_drift(checkpoint: str, mode: str, steps: int, prompt_len: int, chunk: int = 64, window: int = 256,
                  seed: int = 0) -> DriftReport:
    ck = open_checkpoint(resolve_checkpoint(checkpoint))
    reference = ck.build_decoder(kernels=REFERENCE)
    capacity = -(-(prompt_len + steps + chunk) // chunk) * chunk
    step = CoreMLStep(ck.build_decoder(kernels=MATMUL_ONLY, logits="last"), capacity, recurrent_io=mode == "io").eval()
    target = CoreMLRunner(eager_call(step), step.reset_states, chunk, capacity,
                          step.recurrent_io_shape() if mode == "io" else None)
    ids = prompt_ids(prompt_len, reference.cfg.vocab_size, seed)
    [report] = teacher_forced(ReferenceRunner(reference), target, [ids], steps, rtol=float("inf"))
    decode = report.steps[1:]
    diffs = [s.max_abs_diff / max(1.0, s.logit_scale) for s in decode]
    first = next((i for i, s in enumerate(decode) if s.ref_token != s.onnx_token), None)
    agree = sum(s.ref_token == s.onnx_token for s in decode)
    by_window = [max(diffs[i : i + window]) for i in range(0, steps, window)]
    return DriftReport(mode, steps, agree / steps, first, max(diffs), by_window, window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--modes", default="state,io")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        report = measure_drift(args.checkpoint, mode, args.steps, args.prompt)
        print(json.dumps(asdict(report)), flush=True)


if __name__ == "__main__":
    main()
