"""Load a Hugging Face Qwen3.5 checkpoint folder lazily and check it against its config.

Headers are read with `safetensors.safe_open`; tensor data is read with positioned reads
(`read_rows`: a block of rows of one tensor), so memory holds at most the block asked for and a
checkpoint larger than RAM streams through (pages of a long-lived memory map would count in the
process's resident set). Every shape is checked against the config before any weight is read, so a
wrong or damaged file fails in seconds with the name of the tensor at fault.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from graphs.config import TextConfig, load_text_config
from graphs.errors import QwenEdgeError
from graphs.file_checks import member, read_json
from graphs.qwen3_5 import LogitsMode, Qwen35Decoder
from graphs.recurrent_ops import CUSTOM_OPS, RecurrentKernels

# Checkpoint name prefixes of the text decoder: multimodal layout first, then text-only.
TEXT_PREFIXES = ("model.language_model.", "model.")
# Parts of a published checkpoint that the text decoder does not use.
IGNORED_PREFIXES = ("mtp.", "model.visual.", "visual.", "model.mtp.")
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
INDEX_NAME = "model.safetensors.index.json"
# Tensors at least this large (2-D, elements) are placeholders in a skeleton decoder: see build_skeleton.
PLACEHOLDER_MIN_ELEMENTS = 1025


@dataclass(frozen=True)
class TensorEntry:
    """Where one decoder tensor lives: its file, its name inside the file and its bytes' position."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0  # absolute position of the first byte in `file`

    @property
    def row_elements(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1


def _data_offsets(file: Path) -> dict[str, int]:
    """{key: absolute offset of its data} from a safetensors header (8-byte length, JSON, data)."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: 8 + length + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        return _indexed_shards(folder, index)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QwenEdgeError(f"{folder}: no *.safetensors weights found; point at a checkpoint folder with weights")
    for file in files:
        _check_regular(file)
    return files


def _check_regular(path: Path) -> None:
    """Weights are read from regular files only (a FIFO or a device would block or never end)."""
    if not path.is_file():
        raise QwenEdgeError(f"{path}: not a regular file; a checkpoint's weights must be plain .safetensors files")


def _indexed_shards(folder: Path, index: Path) -> list[Path]:
    """The shards `model.safetensors.index.json` names; each name must be a file inside the checkpoint."""
    _check_regular(index)
    fix = "re-download the checkpoint's index"
    parsed = read_json(index, fix)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise QwenEdgeError(f"{index}: not a safetensors index (it needs a non-empty 'weight_map' object); {fix}")
    names = list(weight_map.values())
    for name in names:
        member(folder, name, str(index), follow_links=True)  # a string, and a plain name inside the folder
    files = [folder / name for name in sorted(set(names))]
    for file in files:
        if not file.name.endswith(".safetensors"):
            raise QwenEdgeError(f"{index}: shard {file.name!r} is not a .safetensors file; {fix}")
        if not file.exists():
            raise QwenEdgeError(f"{folder}: shard {file.name} named in {INDEX_NAME} is missing; download all shards")
        _check_regular(file)
    return files


def _decoder_name(key: str) -> str | None:
    """Map a checkpoint key to the decoder's parameter name, or None if the decoder does not use it."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    if key == "lm_head.weight":
        return key
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def index_tensors(folder: Path) -> dict[str, TensorEntry]:
    """Read only the headers of every shard: decoder parameter name -> where it is stored."""
    entries: dict[str, TensorEntry] = {}
    for file in _shard_files(folder):
        try:
            with safe_open(file, framework="pt") as handle:  # validates the header and every range
                offsets = _data_offsets(file)
                for key in handle.keys():
                    name = _decoder_name(key)
                    if name is None:
                        continue
                    tslice = handle.get_slice(key)
                    entries[name] = TensorEntry(file, key, tuple(tslice.get_shape()), tslice.get_dtype(), offsets[key])
        except QwenEdgeError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged files
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise QwenEdgeError(
                f"{file}: unreadable safetensors file ({detail}); it is truncated or corrupt, re-download it"
            ) from None
    return entries


def expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the decoder needs, with its shape, derived from the config alone."""
    with torch.device("meta"):
        model = Qwen35Decoder(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_against_config(cfg: TextConfig, entries: dict[str, TensorEntry], folder: Path) -> None:
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        entry = entries.get(name)
        if entry is None:
            raise QwenEdgeError(
                f"{folder}: tensor '{name}' is missing from the weights; the checkpoint does not match its config.json"
            )
        if entry.shape != shape:
            raise QwenEdgeError(
                f"{entry.file.name}: tensor '{entry.key}' has shape {list(entry.shape)} but config.json implies "
                f"{list(shape)}; the weights and config.json are from different models"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise QwenEdgeError(
                f"{entry.file.name}: tensor '{entry.key}' is {entry.dtype}; expected bf16, fp16 or fp32 weights"
            )
    unexpected = sorted(set(entries) - set(expected) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unexpected:
        raise QwenEdgeError(
            f"{folder}: tensor '{unexpected[0]}' is not part of the decoder described by config.json "
            f"({len(unexpected)} such); the weights and config.json are from different models"
        )


@dataclass
class Checkpoint:
    """A validated checkpoint folder: its config and an index of its decoder tensors."""

    folder: Path
    config: TextConfig
    tensors: dict[str, TensorEntry]

    def source_name(self, param: str) -> str:
        """The checkpoint tensor a decoder parameter is read from (a tied LM head reads the embedding)."""
        return "embed_tokens.weight" if param == "lm_head.weight" and self.config.tie_word_embeddings else param

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows `start:stop` (along the first axis) of a decoder tensor as float32, read from disk."""
        entry = self.tensors[self.source_name(name)]
        stop = entry.shape[0] if stop is None else stop
        item, row = ITEM_BYTES[entry.dtype], entry.row_elements
        count = (stop - start) * row
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            raw = os.pread(fd, count * item, entry.offset + start * row * item)
        finally:
            os.close(fd)
        if len(raw) != count * item:
            raise QwenEdgeError(f"{entry.file}: ended while reading tensor '{entry.key}'; the file is truncated, "
                                "re-download it")
        if entry.dtype == "BF16":  # bf16 is the top half of an fp32: widening is exact
            values = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, np.float16 if entry.dtype == "F16" else np.float32).astype(np.float32)
        return values.reshape(stop - start, *entry.shape[1:])

    def iter_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield decoder tensors one at a time, converted to `dtype`, read from disk."""
        for name in sorted(expected_shapes(self.config), key=self.read_order):
            yield name, torch.from_numpy(self.read_rows(name)).to(dtype)

    def read_order(self, name: str) -> tuple[str, int]:
        """Sort key that reads tensors in file order (sequential disk access)."""
        entry = self.tensors[self.source_name(name)]
        return str(entry.file), entry.offset

    def build_decoder(self, dtype: torch.dtype = torch.float32, kernels: RecurrentKernels = CUSTOM_OPS,
                      logits: LogitsMode = "all") -> Qwen35Decoder:
        """The export-friendly decoder with this checkpoint's weights, in `dtype` (see Qwen35Decoder
        for `kernels` and `logits`)."""
        return self._decoder(dtype, kernels, logits, lambda name, shape: False)

    def build_skeleton(self, dtype: torch.dtype = torch.float32, kernels: RecurrentKernels = CUSTOM_OPS,
                       logits: LogitsMode = "all") -> Qwen35Decoder:
        """The decoder with its large matrices as placeholders: zero-stride views of one zero, so the
        model has every shape but no weight memory. Small tensors (norms, conv, A_log, dt_bias and 2-D
        tensors under PLACEHOLDER_MIN_ELEMENTS) hold their real values. The structure of a trace does not
        depend on the values, so a skeleton traces like the real model; an exporter then reads each
        placeholder's values from the checkpoint when it writes them (`is_placeholder` tells which)."""
        return self._decoder(dtype, kernels, logits, is_placeholder)

    def _decoder(self, dtype: torch.dtype, kernels: RecurrentKernels, logits: LogitsMode,
                 placeholder: Callable[[str, tuple[int, ...]], bool]) -> Qwen35Decoder:
        with torch.device("meta"):
            model = Qwen35Decoder(self.config, kernels, logits)
        params = {}
        for name, shape in sorted(expected_shapes(self.config).items(), key=lambda item: self.read_order(item[0])):
            if placeholder(name, shape):
                params[name] = torch.zeros((), dtype=dtype).expand(shape)
            else:
                params[name] = torch.from_numpy(self.read_rows(name)).to(dtype)
        if self.config.tie_word_embeddings:
            params["lm_head.weight"] = params["embed_tokens.weight"]
        model.load_state_dict(params, strict=True, assign=True)
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()


def is_placeholder(name: str, shape: tuple[int, ...]) -> bool:
    """Is this parameter a placeholder in a skeleton decoder: a 2-D matrix of PLACEHOLDER_MIN_ELEMENTS or more."""
    return len(shape) == 2 and shape[0] * shape[1] >= PLACEHOLDER_MIN_ELEMENTS


def open_checkpoint(folder: Path | str) -> Checkpoint:
    """Open and validate a checkpoint folder (config.json + single or sharded *.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QwenEdgeError(f"{folder}: no such checkpoint folder; pass a folder with config.json and *.safetensors")
    cfg = load_text_config(folder)
    entries = index_tensors(folder)
    check_against_config(cfg, entries, folder)
    return Checkpoint(folder, cfg, entries)
