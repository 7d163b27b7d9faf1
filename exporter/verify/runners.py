"""What the parity loop drives.

A target runs a sequence as one prefill, then one token per call:

    start()            a fresh sequence
    prefill(ids)       logits of the prompt: [T, V], or [1, V] for last-position graphs
    decode(token)      logits of one more token: [1, V]

A reference scores whole sequences: `score(sequences)` gives the logits of every position of each.

`OnnxRunner` is an ONNX export through runtime_py (the Core ML runners are in exporter/coreml/check.py).
`LayerwiseReference` is the PyTorch decoder run layer by layer from the checkpoint (graphs/layerwise.py);
`ReferenceRunner` is the decoder in memory, driven like the runtime (it is also a reference).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from graphs.checkpoint import Checkpoint
from graphs.layerwise import score_sequences
from graphs.qwen3_5 import Qwen35Decoder
from runtime_py.session import OnnxModel


class SequenceRunner(Protocol):
    def start(self) -> None: ...

    def prefill(self, ids: list[int]) -> np.ndarray: ...

    def decode(self, token: int) -> np.ndarray: ...


class SequenceScorer(Protocol):
    def score(self, sequences: list[list[int]]) -> list[np.ndarray]: ...


class LayerwiseReference:
    """The reference decoder, layer by layer from the checkpoint: each weight read once per `score`."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def score(self, sequences: list[list[int]]) -> list[np.ndarray]:
        return score_sequences(self.checkpoint, sequences)


class ReferenceRunner:
    """The PyTorch decoder driven like the runtime: explicit state carried between calls."""

    def __init__(self, model: Qwen35Decoder) -> None:
        self.model = model
        self.start()

    def start(self) -> None:
        self.state = self.model.initial_state(1)
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

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.forward(ids)

    def decode(self, token: int) -> np.ndarray:
        return self.forward([token])

    def score(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Each sequence as one call from a fresh state (the model must give every position's logits)."""
        out = []
        for ids in sequences:
            self.start()
            out.append(self.forward(ids))
        return out


class OnnxRunner:
    """An ONNX export through runtime_py (each prompt in the calls `model.prefill_chunk` makes)."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.start()

    def start(self) -> None:
        self.state = self.model.new_state(1)

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.model.forward(np.array([ids]), self.state)[0]

    def decode(self, token: int) -> np.ndarray:
        return self.model.forward(np.array([[token]]), self.state)[0]


def greedy_tokens(runner: SequenceRunner, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation of `prompt`: `steps` new tokens."""
    runner.start()
    out, logits = [], runner.prefill(prompt)
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        logits = runner.decode(out[-1])
    return out


def greedy_reference(model: Qwen35Decoder, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation of `prompt` by the PyTorch reference, carrying state like the runtime."""
    return greedy_tokens(ReferenceRunner(model), prompt, steps)
