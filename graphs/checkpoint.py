"""Load a Hugging Face Qwen3.5 checkpoint folder lazily and check it against its config.

Tensors are memory-mapped with `safetensors.safe_open` and read one at a time, so a checkpoint is
never held twice in memory. Every shape is checked against the config before any weight is read,
so a wrong or damaged file fails in seconds with the name of the tensor at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from graphs.config import TextConfig, VisionConfig, load_text_config, load_vision_config
from graphs.errors import QwenEdgeError
from graphs.qwen3_5 import LogitsMode, Qwen35Decoder
from graphs.recurrent_ops import CUSTOM_OPS, RecurrentKernels
from graphs.vision import VisionEncoder, vision_parameter_shapes

# Checkpoint name prefixes of the text decoder: multimodal layout first, then text-only.
TEXT_PREFIXES = ("model.language_model.", "model.")
# Checkpoint name prefixes of the vision tower (graphs/vision.py), loaded beside the decoder.
VISION_PREFIXES = ("model.visual.", "visual.")
# Parts of a published checkpoint that qwen-edge does not use.
IGNORED_PREFIXES = ("mtp.", "model.mtp.")
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """Where one decoder tensor lives: its file and its name inside the file."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise QwenEdgeError(f"{index}: not a valid safetensors index ({exc}); re-download it") from exc
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise QwenEdgeError(f"{folder}: shard {missing[0]} named in {INDEX_NAME} is missing; download all shards")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QwenEdgeError(f"{folder}: no *.safetensors weights found; point at a checkpoint folder with weights")
    return files


def _vision_name(key: str) -> str | None:
    """Map a checkpoint key to the vision tower's parameter name, or None if it is not the tower's."""
    for prefix in VISION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def _decoder_name(key: str) -> str | None:
    """Map a checkpoint key to the decoder's parameter name, or None if the decoder does not use it."""
    if key.startswith(IGNORED_PREFIXES) or _vision_name(key) is not None:
        return None
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
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    name, into = _decoder_name(key), entries
                    if name is None:
                        name, into = _vision_name(key), vision
                    if name is None:
                        continue
                    tslice = handle.get_slice(key)
                    into[name] = TensorEntry(file, key, tuple(tslice.get_shape()), tslice.get_dtype())
        except QwenEdgeError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged files
            raise QwenEdgeError(
                f"{file}: unreadable safetensors file ({str(exc).splitlines()[0]}); it is truncated or corrupt, re-download it"
            ) from exc
    return entries, vision


def expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the decoder needs, with its shape, derived from the config alone."""
    with torch.device("meta"):
        model = Qwen35Decoder(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_against_config(cfg: TextConfig, entries: dict[str, TensorEntry], folder: Path) -> None:
    expected = expected_shapes(cfg)
    _check_shapes(expected, entries, folder, "")
    unexpected = sorted(set(entries) - set(expected) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unexpected:
        raise QwenEdgeError(
            f"{folder}: tensor '{unexpected[0]}' is not part of the decoder described by config.json "
            f"({len(unexpected)} such); the weights and config.json are from different models"
        )


def check_vision_against_config(cfg: VisionConfig, entries: dict[str, TensorEntry], folder: Path) -> None:
    expected = vision_parameter_shapes(cfg)
    _check_shapes(expected, entries, folder, "vision tower ")
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        raise QwenEdgeError(
            f"{folder}: tensor 'model.visual.{unexpected[0]}' is not part of the vision tower described by "
            f"config.json's vision_config ({len(unexpected)} such); the weights and config.json are from different models"
        )


def _check_shapes(expected: dict[str, tuple[int, ...]], entries: dict[str, TensorEntry], folder: Path,
                  part: str) -> None:
    for name, shape in expected.items():
        entry = entries.get(name)
        if entry is None:
            raise QwenEdgeError(
                f"{folder}: {part}tensor '{name}' is missing from the weights; the checkpoint does not match its config.json"
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


@dataclass
class Checkpoint:
    """A validated checkpoint folder: its config and an index of its decoder tensors; `vision` is
    the tower's config when the checkpoint carries `model.visual.*` weights (else None)."""

    folder: Path
    config: TextConfig
    tensors: dict[str, TensorEntry]
    vision: VisionConfig | None = None
    vision_tensors: dict[str, TensorEntry] | None = None

    def iter_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield decoder tensors one at a time, converted to `dtype`, read from the memory map."""
        return _read_tensors(self.tensors, list(expected_shapes(self.config)), dtype)

    def build_vision_encoder(self, dtype: torch.dtype = torch.float32) -> VisionEncoder:
        """The vision tower with this checkpoint's weights, in `dtype` (the checkpoint must have one)."""
        if self.vision is None or self.vision_tensors is None:
            raise QwenEdgeError(f"{self.folder}: has no vision tower (no model.visual.* weights)")
        with torch.device("meta"):
            model = VisionEncoder(self.vision)
        params = dict(_read_tensors(self.vision_tensors, list(vision_parameter_shapes(self.vision)), dtype))
        model.load_state_dict(params, strict=True, assign=True)
        return model.eval()

    def build_decoder(self, dtype: torch.dtype = torch.float32, kernels: RecurrentKernels = CUSTOM_OPS,
                      logits: LogitsMode = "all") -> Qwen35Decoder:
        """The export-friendly decoder with this checkpoint's weights, in `dtype` (see Qwen35Decoder
        for `kernels` and `logits`)."""
        with torch.device("meta"):
            model = Qwen35Decoder(self.config, kernels, logits)
        params = dict(self.iter_tensors(dtype))
        if self.config.tie_word_embeddings:
            params["lm_head.weight"] = params["embed_tokens.weight"]
        model.load_state_dict(params, strict=True, assign=True)
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()


def _read_tensors(index: dict[str, TensorEntry], names: list[str], dtype: torch.dtype
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name].file, []).append(name)
    with ExitStack() as stack:
        for file, names_in_file in by_file.items():
            handle = stack.enter_context(safe_open(file, framework="pt"))
            for name in names_in_file:
                try:
                    tensor = handle.get_tensor(index[name].key)
                except Exception as exc:
                    raise QwenEdgeError(
                        f"{file}: cannot read tensor '{index[name].key}' ({exc}); the file is corrupt, re-download it"
                    ) from exc
                yield name, tensor.to(dtype)


def open_checkpoint(folder: Path | str) -> Checkpoint:
    """Open and validate a checkpoint folder (config.json + single or sharded *.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QwenEdgeError(f"{folder}: no such checkpoint folder; pass a folder with config.json and *.safetensors")
    cfg = load_text_config(folder)
    entries, vision_entries = index_tensors(folder)
    check_against_config(cfg, entries, folder)
    vision = load_vision_config(folder) if vision_entries else None
    if vision is None:  # a text-only checkpoint, or a qwen3_5 one shipped without its tower
        return Checkpoint(folder, cfg, entries)
    check_vision_against_config(vision, vision_entries, folder)
    if vision.out_hidden_size != cfg.hidden_size:
        raise QwenEdgeError(f"{folder}: vision_config.out_hidden_size {vision.out_hidden_size} differs from the text "
                            f"hidden_size {cfg.hidden_size}; the image features cannot enter the decoder")
    return Checkpoint(folder, cfg, entries, vision, vision_entries)
