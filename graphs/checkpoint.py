"""Load a Hugging Face Qwen3.5 checkpoint folder lazily and check it against its config.

Headers are read with `safetensors.safe_open`; tensor data is read with positioned reads
(`read_rows`: a block of rows of one tensor), so memory holds at most the block asked for and a
checkpoint larger than RAM streams through (pages of a long-lived memory map would count in the
process's resident set). Every shape is checked against the config before any weight is read, so a
wrong or damaged file fails in seconds with the name of the tensor at fault.

The multi-token-prediction head (`mtp.*`, graphs/mtp.py) is optional: a checkpoint without it is a
plain decoder; one with it must carry the whole head. The opened config says which:
`mtp_num_hidden_layers` is the number of head layers that will be loaded (0 without a head).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from graphs.config import TextConfig, VisionConfig, load_text_config, load_vision_config
from graphs.errors import QwenEdgeError
from graphs.file_checks import member, read_json
from graphs.mtp import MTPHead, mtp_layers_problem
from graphs.qwen3_5 import LogitsMode, Qwen35Decoder
from graphs.recurrent_ops import CUSTOM_OPS, RecurrentKernels
from graphs.vision import VisionEncoder, vision_parameter_shapes

# Checkpoint name prefixes of the text decoder: multimodal layout first, then text-only.
TEXT_PREFIXES = ("model.language_model.", "model.")
# Checkpoint name prefixes of the vision tower (graphs/vision.py), loaded beside the decoder.
VISION_PREFIXES = ("model.visual.", "visual.")
# Checkpoint name prefixes of the MTP head; its parameters are indexed as `mtp.<name>`.
MTP_PREFIXES = ("mtp.", "model.mtp.", "model.language_model.mtp.")
MTP = "mtp."
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
INDEX_NAME = "model.safetensors.index.json"
# Tensors at least this large (2-D, elements) are placeholders in a skeleton decoder or MTP head: see build_skeleton.
PLACEHOLDER_MIN_ELEMENTS = 1025


@dataclass(frozen=True)
class TensorEntry:
    """Where one checkpoint tensor lives: its file, its name inside the file and its bytes' position."""

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


def _vision_name(key: str) -> str | None:
    """Map a checkpoint key to the vision tower's parameter name, or None if it is not the tower's."""
    for prefix in VISION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def _decoder_name(key: str) -> str | None:
    """Map a checkpoint key to the decoder's parameter name (`mtp.*` for the MTP head), or None if
    neither uses it (the vision tower's keys: `_vision_name`)."""
    if _vision_name(key) is not None:
        return None
    for prefix in MTP_PREFIXES:
        if key.startswith(prefix):
            return MTP + key[len(prefix) :]
    if key == "lm_head.weight":
        return key
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def index_tensors(folder: Path) -> tuple[dict[str, TensorEntry], dict[str, TensorEntry]]:
    """Read only the headers of every shard: parameter name -> where it is stored, for the decoder
    and for the vision tower."""
    entries: dict[str, TensorEntry] = {}
    vision: dict[str, TensorEntry] = {}
    for file in _shard_files(folder):
        try:
            with safe_open(file, framework="pt") as handle:  # validates the header and every range
                offsets = _data_offsets(file)
                for key in handle.keys():
                    name, into = _decoder_name(key), entries
                    if name is None:
                        name, into = _vision_name(key), vision
                    if name is None:
                        continue
                    tslice = handle.get_slice(key)
                    into[name] = TensorEntry(file, key, tuple(tslice.get_shape()), tslice.get_dtype(), offsets[key])
        except QwenEdgeError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged files
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise QwenEdgeError(
                f"{file}: unreadable safetensors file ({detail}); it is truncated or corrupt, re-download it"
            ) from None
    return entries, vision


def expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the decoder needs, with its shape, derived from the config alone."""
    with torch.device("meta"):
        model = Qwen35Decoder(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def expected_mtp_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every `mtp.*` parameter of the head the config describes (cfg.mtp_num_hidden_layers == 1)."""
    with torch.device("meta"):
        head = MTPHead(cfg)
    return {MTP + name: tuple(p.shape) for name, p in head.named_parameters()}


def _check_shapes(expected: dict[str, tuple[int, ...]], entries: dict[str, TensorEntry], folder: Path,
                  what: str) -> None:
    for name, shape in expected.items():
        entry = entries.get(name)
        if entry is None:
            raise QwenEdgeError(f"{folder}: tensor '{name}' is missing from the weights; {what}")
        if entry.shape != shape:
            raise QwenEdgeError(
                f"{entry.file.name}: tensor '{entry.key}' has shape {list(entry.shape)} but config.json implies "
                f"{list(shape)}; the weights and config.json are from different models"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise QwenEdgeError(
                f"{entry.file.name}: tensor '{entry.key}' is {entry.dtype}; expected bf16, fp16 or fp32 weights"
            )


def check_against_config(cfg: TextConfig, entries: dict[str, TensorEntry], folder: Path) -> None:
    """The decoder's tensors (the `mtp.*` ones are checked by `mtp_config`)."""
    decoder = {n: e for n, e in entries.items() if not n.startswith(MTP)}
    expected = expected_shapes(cfg)
    _check_shapes(expected, decoder, folder, "the checkpoint does not match its config.json")
    unexpected = sorted(set(decoder) - set(expected) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unexpected:
        raise QwenEdgeError(
            f"{folder}: tensor '{unexpected[0]}' is not part of the decoder described by config.json "
            f"({len(unexpected)} such); the weights and config.json are from different models"
        )


def check_vision_against_config(cfg: VisionConfig, entries: dict[str, TensorEntry], folder: Path) -> None:
    """The vision tower's tensors (named without their `model.visual.` prefix) against `vision_config`."""
    expected = vision_parameter_shapes(cfg)
    _check_shapes(expected, entries, folder, "the vision tower (model.visual.*) does not match config.json's "
                                             "vision_config")
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise QwenEdgeError(
            f"{folder}: tensor 'model.visual.{unexpected[0]}' is not part of the vision tower described by "
            f"config.json's vision_config ({len(unexpected)} such); the weights and config.json are from different models"
        )


def mtp_config(cfg: TextConfig, entries: dict[str, TensorEntry], folder: Path, wanted: bool = True) -> tuple[TextConfig, str | None]:
    """The config with `mtp_num_hidden_layers` set to the head layers that will be loaded, and why
    none are when the checkpoint has a head that is left out.

    No `mtp.*` tensors (or `wanted` False): no head. A head must be whole and of the config's shape;
    its layer count is the config's, or (as vLLM reads it) counted from the weights when the config
    does not say.
    """
    names = [n for n in entries if n.startswith(MTP)]
    if not wanted or not names:
        return replace(cfg, mtp_num_hidden_layers=0), None
    layers = cfg.mtp_num_hidden_layers or len({m.group(1) for n in names if (m := re.match(r"mtp\.layers\.(\d+)\.", n))})
    problem = mtp_layers_problem(layers)
    if problem:
        return replace(cfg, mtp_num_hidden_layers=0), problem
    cfg = replace(cfg, mtp_num_hidden_layers=layers)
    expected = expected_mtp_shapes(cfg)
    _check_shapes(expected, entries, folder, "the MTP head is incomplete: re-download the checkpoint, "
                                             "or export with --no-mtp to leave the head out")
    unexpected = sorted(set(names) - set(expected))
    if unexpected:
        raise QwenEdgeError(f"{folder}: tensor '{unexpected[0]}' is not part of a Qwen3.5 MTP head "
                            f"({len(unexpected)} such); export with --no-mtp to leave the head out")
    return cfg, None


@dataclass
class Checkpoint:
    """A validated checkpoint folder: its config and an index of its decoder (and MTP head) tensors.

    `config.mtp_num_hidden_layers` is 1 when the MTP head will be loaded, 0 otherwise;
    `mtp_note` says why a head the checkpoint carries is left out. `vision` is the tower's config
    when the checkpoint carries `model.visual.*` weights (else None)."""

    folder: Path
    config: TextConfig
    tensors: dict[str, TensorEntry]
    mtp_note: str | None = None
    vision: VisionConfig | None = None
    vision_tensors: dict[str, TensorEntry] | None = None

    @property
    def has_mtp(self) -> bool:
        return self.config.mtp_num_hidden_layers > 0

    def source_name(self, param: str) -> str:
        """The checkpoint tensor a decoder parameter is read from (a tied LM head reads the embedding)."""
        return "embed_tokens.weight" if param == "lm_head.weight" and self.config.tie_word_embeddings else param

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows `start:stop` (along the first axis) of a decoder tensor as float32, read from disk."""
        return read_entry_rows(self.tensors[self.source_name(name)], start, stop)

    def iter_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield decoder tensors one at a time, converted to `dtype`, read from disk."""
        for name in sorted(expected_shapes(self.config), key=self.read_order):
            yield name, torch.from_numpy(self.read_rows(name)).to(dtype)

    def read_order(self, name: str) -> tuple[str, int]:
        """Sort key that reads tensors in file order (sequential disk access)."""
        entry = self.tensors[self.source_name(name)]
        return str(entry.file), entry.offset

    def _params(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                placeholder: Callable[[str, tuple[int, ...]], bool]) -> dict[str, torch.Tensor]:
        """Tensors in `dtype`, read in file order; placeholders are zero-stride views of one zero."""
        params = {}
        for name, shape in sorted(shapes.items(), key=lambda item: self.read_order(item[0])):
            if placeholder(name, shape):
                params[name] = torch.zeros((), dtype=dtype).expand(shape)
            else:
                params[name] = torch.from_numpy(self.read_rows(name)).to(dtype)
        return params

    def build_vision_encoder(self, dtype: torch.dtype = torch.float32) -> VisionEncoder:
        """The vision tower with this checkpoint's weights, in `dtype` (the checkpoint must have one)."""
        if self.vision is None or self.vision_tensors is None:
            raise QwenEdgeError(f"{self.folder}: has no vision tower (no model.visual.* weights)")
        with torch.device("meta"):
            model = VisionEncoder(self.vision)
        entries = self.vision_tensors
        names = sorted(vision_parameter_shapes(self.vision), key=lambda n: (str(entries[n].file), entries[n].offset))
        params = {name: torch.from_numpy(read_entry_rows(entries[name])).to(dtype) for name in names}
        model.load_state_dict(params, strict=True, assign=True)
        return model.eval()

    def build_decoder(self, dtype: torch.dtype = torch.float32, kernels: RecurrentKernels = CUSTOM_OPS,
                      logits: LogitsMode = "all") -> Qwen35Decoder:
        """The export-friendly decoder with this checkpoint's weights, in `dtype` (see Qwen35Decoder
        for `kernels` and `logits`)."""
        return self._decoder(dtype, kernels, logits, lambda name, shape: False)

    def build_skeleton(self, dtype: torch.dtype = torch.float32, kernels: RecurrentKernels = CUSTOM_OPS,
                       logits: LogitsMode = "all",
                       placeholder: Callable[[str, tuple[int, ...]], bool] | None = None) -> Qwen35Decoder:
        """The decoder with its large matrices as placeholders: zero-stride views of one zero, so the
        model has every shape but no weight memory. Small tensors (norms, conv, A_log, dt_bias and 2-D
        tensors under PLACEHOLDER_MIN_ELEMENTS) hold their real values. The structure of a trace does not
        depend on the values, so a skeleton traces like the real model; an exporter then reads each
        placeholder's values from the checkpoint when it writes them (`is_placeholder` tells which, unless
        the exporter passes its own `placeholder` predicate)."""
        return self._decoder(dtype, kernels, logits, placeholder or is_placeholder)

    def _decoder(self, dtype: torch.dtype, kernels: RecurrentKernels, logits: LogitsMode,
                 placeholder: Callable[[str, tuple[int, ...]], bool]) -> Qwen35Decoder:
        with torch.device("meta"):
            model = Qwen35Decoder(self.config, kernels, logits)
        params = self._params(expected_shapes(self.config), dtype, placeholder)
        if self.config.tie_word_embeddings:
            params["lm_head.weight"] = params["embed_tokens.weight"]
        model.load_state_dict(params, strict=True, assign=True)
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()

    def build_mtp(self, dtype: torch.dtype = torch.float32) -> MTPHead:
        """The MTP head with this checkpoint's weights (it shares the decoder's LM head, not held here)."""
        return self._mtp(dtype, lambda name, shape: False)

    def build_mtp_skeleton(self, dtype: torch.dtype = torch.float32) -> MTPHead:
        """The MTP head with its large matrices as placeholders, as `build_skeleton` builds the decoder."""
        return self._mtp(dtype, is_placeholder)

    def _mtp(self, dtype: torch.dtype, placeholder: Callable[[str, tuple[int, ...]], bool]) -> MTPHead:
        if not self.has_mtp:
            raise QwenEdgeError(f"{self.folder}: the checkpoint has no MTP head (`mtp.*` weights)"
                                + (f": {self.mtp_note}" if self.mtp_note else ""))
        with torch.device("meta"):
            head = MTPHead(self.config)
        params = self._params(expected_mtp_shapes(self.config), dtype, placeholder)
        head.load_state_dict({n[len(MTP):]: t for n, t in params.items()}, strict=True, assign=True)
        return head.eval()


def read_entry_rows(entry: TensorEntry, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows `start:stop` (along the first axis) of one stored tensor as float32, read from disk."""
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
    if entry.dtype == "BF16":  # bf16 is the top half of an fp32: widening is exact (one pass, into the output)
        values = np.left_shift(np.frombuffer(raw, np.uint16), 16, out=np.empty(count, np.uint32),
                               dtype=np.uint32).view(np.float32)
    else:
        values = np.frombuffer(raw, np.float16 if entry.dtype == "F16" else np.float32).astype(np.float32)
    return values.reshape(stop - start, *entry.shape[1:])


def is_placeholder(name: str, shape: tuple[int, ...]) -> bool:
    """Is this parameter a placeholder in a skeleton decoder: a 2-D matrix of PLACEHOLDER_MIN_ELEMENTS or more."""
    return len(shape) == 2 and shape[0] * shape[1] >= PLACEHOLDER_MIN_ELEMENTS


def open_checkpoint(folder: Path | str, mtp: bool = True) -> Checkpoint:
    """Open and validate a checkpoint folder (config.json + single or sharded *.safetensors); with
    `mtp` False any MTP head is left out unread."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QwenEdgeError(f"{folder}: no such checkpoint folder; pass a folder with config.json and *.safetensors")
    cfg = load_text_config(folder)
    entries, vision_entries = index_tensors(folder)
    check_against_config(cfg, entries, folder)
    cfg, note = mtp_config(cfg, entries, folder, mtp)
    vision = load_vision_config(folder) if vision_entries else None
    if vision is None:  # a text-only checkpoint, or a qwen3_5 one shipped without its tower
        return Checkpoint(folder, cfg, entries, mtp_note=note)
    check_vision_against_config(vision, vision_entries, folder)
    if vision.out_hidden_size != cfg.hidden_size:
        raise QwenEdgeError(f"{folder}: vision_config.out_hidden_size {vision.out_hidden_size} differs from the text "
                            f"hidden_size {cfg.hidden_size}; the image features cannot enter the decoder")
    return Checkpoint(folder, cfg, entries, mtp_note=note, vision=vision, vision_tensors=vision_entries)
