"""The host side of a Core ML sequence: what an app feeds the `prefill` and `decode` functions.

NumPy only, so the same logic drives the eager PyTorch step (tests, drift), the Linux MIL
interpreter (`exporter/coreml/check.py`) and coremltools prediction on macOS; an app mirrors it.

A prompt of n tokens runs as ceil(n / chunk) prefill calls. The padding of the last partial chunk
goes at the start of the first chunk (token 0, position -1): zero embeddings leave every state
untouched, and the attention mask keeps the padding slots out of every real token's view. The
cache slot of a token is therefore its position plus the padding; the capacity bounds slots.

An image or video prompt runs through `prefill_visual` instead (exports with --image-sizes): the
same chunks, 3-row mRoPE positions (runtime_py/vision.py `rope_index`) and the image features at
the pad rows. Decode then continues at max(position) + 1 = prompt length + delta in all rows,
while cache slots keep counting tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphs.errors import QwenEdgeError

MASK_VALUE = -1e4  # additive mask of a slot a token may not see: finite in fp16, exp() underflows to 0

# call(function_name, feeds) -> outputs; outputs hold "logits" [1, 1, vocab] and, when the
# recurrent state is carried by the caller, "recurrent_out".
CallFn = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


class CoreMLSequence:
    """One sequence over a Core ML decoder (fresh states are the caller's job: one per sequence)."""

    def __init__(self, call: CallFn, chunk: int, capacity: int, recurrent_io_shape: tuple[int, ...] | None = None):
        self.call, self.chunk, self.capacity = call, chunk, capacity
        self.recurrent = None if recurrent_io_shape is None else np.zeros(recurrent_io_shape, np.float32)
        self.slot = 0  # next free cache slot
        self.position = 0  # next RoPE position
        self.first_real_slot = 0

    def _run(self, function: str, ids: list[int], positions: list[int] | np.ndarray,
             extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        t = len(ids)
        if self.slot + t > self.capacity:
            raise QwenEdgeError(f"context full: {self.slot + t} cache slots needed, capacity {self.capacity}; "
                                "export with a larger --context")
        slots = np.arange(self.slot, self.slot + t)[:, None]
        keys = np.arange(self.capacity)[None, :]
        allowed = ((keys >= self.first_real_slot) & (keys <= slots)) | (keys == slots)
        feeds = {
            "input_ids": np.array([ids], np.int32),
            "position_ids": positions if isinstance(positions, np.ndarray) else np.array([positions], np.int32),
            "attention_mask": np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[None, None],
            "write_position": np.array([self.slot], np.int32),
            **(extra or {}),
        }
        if self.recurrent is not None:
            feeds["recurrent_in"] = self.recurrent
        out = self.call(function, feeds)
        if self.recurrent is not None:
            self.recurrent = np.asarray(out["recurrent_out"], np.float32)
        self.slot += t
        return np.asarray(out["logits"], np.float32).reshape(-1)

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run a fresh sequence's prompt; returns the last position's logits [vocab]."""
        if self.slot:
            raise QwenEdgeError("prefill starts a sequence: use decode() to extend one, or a new sequence")
        if not ids:
            raise QwenEdgeError("the prompt is empty; give at least one token")
        pad = (-len(ids)) % self.chunk
        self.first_real_slot = pad
        tokens = [0] * pad + list(ids)
        positions = [-1] * pad + list(range(len(ids)))
        for start in range(0, len(tokens), self.chunk):
            logits = self._run("prefill", tokens[start : start + self.chunk], positions[start : start + self.chunk])
        self.position = len(ids)
        return logits

    def prefill_visual(self, ids: list[int], positions: np.ndarray, features: np.ndarray) -> np.ndarray:
        """A fresh sequence's image/video prompt: `positions` [3, n] mRoPE rows, `features` [n, hidden]
        (the encoder's rows at the pad tokens, anything elsewhere); returns the last logits [vocab]."""
        if self.slot:
            raise QwenEdgeError("prefill starts a sequence: use decode() to extend one, or a new sequence")
        n = len(ids)
        if not n or positions.shape != (3, n) or len(features) != n:
            raise QwenEdgeError(f"prefill_visual needs positions [3, {n}] and features [{n}, hidden] for {n} tokens; "
                                f"got {positions.shape} and {len(features)} rows")
        pad = (-n) % self.chunk
        self.first_real_slot = pad
        tokens = [0] * pad + list(ids)
        rows = np.concatenate([np.full((3, pad), -1, np.int64), positions], axis=1).astype(np.int32)
        embeds = np.concatenate([np.zeros((pad, features.shape[1]), np.float32), features.astype(np.float32)])
        for start in range(0, len(tokens), self.chunk):
            end = start + self.chunk
            logits = self._run("prefill_visual", tokens[start:end], rows[:, None, start:end],
                               {"image_features": embeds[None, start:end]})
        self.position = int(positions.max()) + 1
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token; returns its logits [vocab]."""
        logits = self._run("decode", [token], [self.position])
        self.position += 1
        return logits


class CoreMLRunner:
    """A Core ML decoder as a runner of the parity loop (exporter/verify/runners.py): `reset` gives it
    fresh states, `call` runs one function."""

    def __init__(self, call: CallFn, reset: Callable[[], None], chunk: int, capacity: int,
                 recurrent_io_shape: tuple[int, ...] | None = None) -> None:
        self.call, self.reset = call, reset
        self.chunk, self.capacity, self.recurrent_io_shape = chunk, capacity, recurrent_io_shape
        self.start()

    def start(self) -> None:
        self.reset()
        self.sequence = CoreMLSequence(self.call, self.chunk, self.capacity, self.recurrent_io_shape)

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.sequence.prefill(ids)[None]

    def decode(self, token: int) -> np.ndarray:
        return self.sequence.decode(token)[None]
