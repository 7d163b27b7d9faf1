"""A checkpoint read through a variant's own weight rounding: the reference for that variant's parity.

Comparing a compressed variant with the float checkpoint mixes two errors, the scheme's rounding
(what the quality report measures) and any mistake in the graph. Reading every weight as the variant
stores it leaves the graph's part alone, so `verify --variant q4` can tell a wrong graph from an int4
one. ONNX: each weight through the pack → unpack round trip of the exporter's packer, in the format
the export's manifest records for its family (`weight_formats`). Core ML: the weights the package stores, decoded (exporter/coreml/check.py).
"""

from __future__ import annotations

import numpy as np

from graphs.checkpoint import Checkpoint
from graphs.config import TextConfig
from graphs.errors import QwenEdgeError
from quant.onnx_weights import pack_blockwise, unpack_blockwise
from quant.schemes import WeightFormat, family_of

FLOAT_REFERENCE = "the checkpoint's weights in fp32"  # what a float variant's reference computes with


class RoundedCheckpoint:
    """The decoder tensors of `checkpoint` as an export stores them: each family's compressed weights in
    its `formats` entry, packed and unpacked (absent or None: float), every float rounded to fp16 when
    `float16`; returned as float32 like `Checkpoint.read_rows`."""

    def __init__(self, checkpoint: Checkpoint, formats: dict[str, WeightFormat | None], float16: bool) -> None:
        self.checkpoint, self.formats, self.float16 = checkpoint, formats, float16

    @property
    def config(self) -> TextConfig:
        return self.checkpoint.config

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        rows = self.checkpoint.read_rows(name, start, stop)
        if self.float16:
            rows = rows.astype(np.float16)
        fmt = self.formats.get(family_of(name) or "")
        if fmt is not None:  # [out, in] rows; blocks run along `in`, each output row independent
            rows = unpack_blockwise(pack_blockwise(rows.T, fmt), rows.shape[1], fmt).T
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


def recorded_formats(name: str, record: dict) -> dict[str, WeightFormat | None]:
    """{family: format} of an ONNX variant's compressed weights, as its manifest `record` states them
    (`weight_formats`, with the export's symmetry): the file's own account, whatever the variant's name."""
    if not record.get("weight_bits"):
        return {}
    formats = record.get("weight_formats")
    if not isinstance(formats, dict) or not all(
            f is None or (isinstance(f, dict) and f.get("bits") in (4, 8) and type(f.get("block_size")) is int
                          and f["block_size"] > 0) for f in formats.values()):
        raise QwenEdgeError(f"variant {name!r:.40}: the manifest's 'weight_formats' must map each weight family to "
                            "null or {bits: 4 or 8, block_size: a positive integer}; re-export")
    symmetric = record.get("symmetric", True)
    return {family: None if f is None else WeightFormat(f["bits"], f["block_size"], symmetric)
            for family, f in formats.items()}


def variant_weights(checkpoint: Checkpoint, name: str, record: dict) -> Checkpoint | RoundedCheckpoint:
    """What the ONNX variant `name` (its manifest `record`) computes with: the checkpoint itself for fp32."""
    formats, float16 = recorded_formats(name, record), record.get("activations") == "float16"
    return RoundedCheckpoint(checkpoint, formats, float16) if formats or float16 else checkpoint


def describe_reference(name: str, record: dict) -> str:
    """One line saying which weights the reference of ONNX variant `name` computes with."""
    formats = sorted({str(f) for f in recorded_formats(name, record).values() if f})
    floats = "floats rounded to fp16" if record.get("activations") == "float16" else ""
    if not formats and not floats:
        return FLOAT_REFERENCE
    stored = (f"compressed weights {', '.join(formats)} {'symmetric' if record.get('symmetric', True) else 'asymmetric'}"
              " (packed and unpacked as the export packs them)") if formats else ""
    return f"the checkpoint's weights as {name} stores them: " + "; ".join(filter(None, (stored, floats)))
