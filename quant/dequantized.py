"""A checkpoint read through a variant's own weight rounding: the reference for that variant's parity.

Comparing a compressed variant with the float checkpoint mixes two errors, the scheme's rounding
(what the quality report measures) and any mistake in the graph. Reading every weight as the variant
stores it leaves the graph's part alone, so `verify --variant q4` can tell a wrong graph from an int4
one. ONNX: each weight through the pack → unpack round trip of the exporter's packer, in the format
its scheme assigns. Core ML: the weights the package stores, decoded (exporter/coreml/check.py).
"""

from __future__ import annotations

import numpy as np

from graphs.checkpoint import Checkpoint
from graphs.config import TextConfig
from quant.onnx_weights import pack_blockwise, unpack_blockwise
from quant.schemes import SCHEMES, QuantOptions, Scheme

FLOAT_REFERENCE = "the checkpoint's weights in fp32"  # what a float variant's reference computes with


class RoundedCheckpoint:
    """The decoder tensors of `checkpoint` as `scheme` stores them (compressed weights dequantized,
    every float in the activation dtype), returned as float32 like `Checkpoint.read_rows`."""

    def __init__(self, checkpoint: Checkpoint, scheme: Scheme, opts: QuantOptions) -> None:
        self.checkpoint, self.scheme, self.opts = checkpoint, scheme, opts

    @property
    def config(self) -> TextConfig:
        return self.checkpoint.config

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        rows = self.checkpoint.read_rows(name, start, stop)
        if self.scheme.activations == "float16":
            rows = rows.astype(np.float16)
        fmt = self.scheme.weight_format(name, self.opts)
        if fmt is not None:  # [out, in] rows; blocks run along `in`, each output row independent
            rows = unpack_blockwise(pack_blockwise(np.ascontiguousarray(rows.T), fmt), rows.shape[1], fmt).T
        return np.ascontiguousarray(rows, dtype=np.float32)


class StoredWeightsCheckpoint:
    """The decoder tensors of `checkpoint` with the compressed ones replaced by `stored` ({parameter:
    decoded weight}; a tied table is stored under the LM head's name), floats rounded to fp16 if asked."""

    def __init__(self, checkpoint: Checkpoint, stored: dict[str, np.ndarray], float16: bool) -> None:
        self.checkpoint, self.stored, self.float16 = checkpoint, stored, float16

    @property
    def config(self) -> TextConfig:
        return self.checkpoint.config

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        tied = self.config.tie_word_embeddings and name == "embed_tokens.weight"
        source = "lm_head.weight" if tied and name not in self.stored else name
        if source in self.stored:
            rows = self.stored[source][start:stop]
        else:
            rows = self.checkpoint.read_rows(name, start, stop)
            rows = rows.astype(np.float16) if self.float16 else rows
        return np.ascontiguousarray(rows, dtype=np.float32)


def _is_float32(scheme: Scheme) -> bool:
    """Does the scheme store the checkpoint's weights as they are (fp32, uncompressed)?"""
    return scheme.activations == "float32" and not scheme.weight_bits


def variant_weights(checkpoint: Checkpoint, name: str, record: dict) -> Checkpoint | RoundedCheckpoint:
    """What the variant `name` (its manifest `record`) computes with: the checkpoint itself for fp32."""
    scheme = SCHEMES[name]
    if _is_float32(scheme):
        return checkpoint
    opts = QuantOptions(record.get("block_size", QuantOptions.block_size), record.get("symmetric", True))
    return RoundedCheckpoint(checkpoint, scheme, opts)


def describe_reference(name: str, record: dict) -> str:
    """One line saying which weights the reference of variant `name` computes with."""
    scheme = SCHEMES[name]
    if _is_float32(scheme):
        return FLOAT_REFERENCE
    formats = sorted({f"{f['bits']}-bit/b{f['block_size']}" for f in record.get("weight_formats", {}).values() if f})
    stored = (f"compressed weights {', '.join(formats)} {'symmetric' if record.get('symmetric', True) else 'asymmetric'}"
              " (packed and unpacked as the export packs them)") if formats else ""
    floats = "floats rounded to fp16" if scheme.activations == "float16" else ""
    return f"the checkpoint's weights as {name} stores them: " + "; ".join(filter(None, (stored, floats)))
