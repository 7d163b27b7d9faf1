"""Write random-weight checkpoints of real shapes in the Hugging Face layout, in bounded memory.

The real Qwen3.5 weights are not reachable from CI, so tests and benchmarks use checkpoints of the
exact published shapes (the presets) filled with random values scaled so that activations and
logits keep a realistic magnitude (a parity test on near-zero logits would prove nothing).

Each safetensors file is written as it is generated: its header (every shape and offset follows from
the config) first, then each tensor in blocks of rows, so a 9B checkpoint (18 GB in bf16) needs the
memory of one block, not of the model. Large checkpoints are split into shards with an index, as
published checkpoints are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from graphs.checkpoint import INDEX_NAME, expected_shapes
from graphs.config import TextConfig, text_config_from_dict

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
BLOCK_ELEMENTS = 1 << 24  # values generated at a time


def random_block(name: str, shape: tuple[int, ...], cfg: TextConfig, gen: torch.Generator) -> torch.Tensor:
    """Plausible random values (float32) for rows of one decoder parameter, chosen by its role;
    `shape` is the block's, its last axis the parameter's."""
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if name.endswith("dt_bias"):
        return torch.randn(shape, generator=gen) * 0.5
    if name.endswith("linear_attn.norm.weight"):  # gated norm: plain scale around 1
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):  # zero-centred norms store w - 1
        return 0.1 * torch.randn(shape, generator=gen)
    if ".conv1d." in name:
        return torch.randn(shape, generator=gen) / math.sqrt(cfg.linear_conv_kernel_dim)
    if name in ("embed_tokens.weight", "lm_head.weight"):  # logits of order 10, like a trained model
        return torch.randn(shape, generator=gen) * 4.0 / math.sqrt(cfg.hidden_size)
    std = 1.0 / math.sqrt(shape[-1])  # linear: keep activation scale
    if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.num_hidden_layers)  # residual branches: GPT-2 style damping
    return torch.randn(shape, generator=gen) * std


def _tensor_bytes(name: str, shape: tuple[int, ...], cfg: TextConfig, gen: torch.Generator,
                  dtype: torch.dtype) -> Iterator[bytes]:
    """One parameter's bytes in `dtype`, generated in blocks of whole rows."""
    row = math.prod(shape[1:])
    step = max(1, BLOCK_ELEMENTS // max(row, 1))
    for start in range(0, shape[0], step):
        block = random_block(name, (min(step, shape[0] - start), *shape[1:]), cfg, gen)
        yield block.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()


def _write_safetensors(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], item: int,
                       data: Iterator[bytes]) -> None:
    """A safetensors file whose tensors ((key, dtype, shape), in order) get their bytes from `data`."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in tensors:
        size = math.prod(shape) * item
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for chunk in data:
            f.write(chunk)
    if path.stat().st_size != 8 + len(text) + offset:
        raise RuntimeError(f"{path}: wrote {path.stat().st_size} bytes, expected {8 + len(text) + offset}")


def write_random_checkpoint(
    config: dict[str, Any],
    folder: Path | str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    multimodal_names: bool = True,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write `config.json` and random `*.safetensors` for `config` into `folder`.

    multimodal_names picks the published layout (`model.language_model.*`) over the text-only one
    (`model.*`). max_shard_bytes splits the weights into shards with a `model.safetensors.index.json`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = text_config_from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    prefix = "model.language_model." if multimodal_names else "model."
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    names = {}
    for name, shape in expected_shapes(cfg).items():
        key = name if name == "lm_head.weight" else prefix + name
        names[key] = name
        nbytes = math.prod(shape) * item
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, SAFETENSORS_DTYPES[dtype], shape))
        size += nbytes
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = ["model.safetensors"] if max_shard_bytes is None else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, tensors in zip(files, shards):
        data = (chunk for key, _, shape in tensors for chunk in _tensor_bytes(names[key], shape, cfg, gen, dtype))
        _write_safetensors(folder / file, tensors, item, data)
        weight_map.update(dict.fromkeys((key for key, _, _ in tensors), file))
    if max_shard_bytes is not None:
        total = sum(math.prod(shape) * item for shard in shards for _, _, shape in shard)
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    return folder
