"""Write random-weight checkpoints of real shapes in the Hugging Face layout.

The real Qwen3.5 weights are not reachable from CI, so tests and benchmarks use checkpoints of the
exact published shapes (the presets) filled with random values scaled so that activations and
logits keep a realistic magnitude (a parity test on near-zero logits would prove nothing).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from graphs.config import TextConfig, text_config_from_dict, vision_config_from_dict
from graphs.checkpoint import INDEX_NAME, expected_shapes
from graphs.vision import vision_parameter_shapes


def random_tensor(name: str, shape: tuple[int, ...], cfg: TextConfig, gen: torch.Generator) -> torch.Tensor:
    """A plausible random value for one decoder parameter, chosen by its role."""
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


def random_vision_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A plausible random value for one vision tower parameter (features of order 1 out of the merger)."""
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if name == "pos_embed.weight":
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


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
    A config with a `vision_config` also gets the vision tower (`model.visual.*`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = text_config_from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    prefix = "model.language_model." if multimodal_names else "model."
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        key = name if name == "lm_head.weight" else prefix + name
        tensors[key] = random_tensor(name, shape, cfg, gen).to(dtype).contiguous()
    vision = vision_config_from_dict(config) if "vision_config" in config else None
    if vision is not None:
        for name, shape in vision_parameter_shapes(vision).items():
            tensors["model.visual." + name] = random_vision_tensor(name, shape, gen).to(dtype).contiguous()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if max_shard_bytes is None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder
