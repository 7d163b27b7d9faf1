"""Hugging Face transformers as the oracle: load a checkpoint folder into Qwen3_5ForCausalLM and run it
with its own cache, step by step, like the ONNX runtime does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import DynamicCache, Qwen3_5ForCausalLM, Qwen3_5TextConfig


def hf_causal_lm(folder: Path) -> Qwen3_5ForCausalLM:
    raw = json.loads((folder / "config.json").read_text())
    text = dict(raw.get("text_config", raw))
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text.pop("model_type", None)
    text["tie_word_embeddings"] = tie
    cfg = Qwen3_5TextConfig(**text)
    model = Qwen3_5ForCausalLM(cfg).float().eval()
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.startswith(("mtp.", "model.visual.")):
                    continue
                state[key.replace("model.language_model.", "model.")] = f.get_tensor(key).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if tie else set()), missing
    if tie:
        model.tie_weights()
    return model


class HfRunner:
    """Drives the HF model with a DynamicCache: prefill, then one token per call (batch, padding aware)."""

    def __init__(self, model: Qwen3_5ForCausalLM, batch: int = 1) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros(batch, 0, dtype=torch.long)
        self.positions = torch.zeros(batch, dtype=torch.long)

    @torch.no_grad()
    def forward(self, ids: np.ndarray, token_mask: np.ndarray | None = None) -> np.ndarray:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        new = torch.ones_like(ids_t) if token_mask is None else torch.as_tensor(token_mask, dtype=torch.long)
        pos = self.positions[:, None] + new.cumsum(1) - 1
        pos = pos.masked_fill(new == 0, 0)
        self.mask = torch.cat([self.mask, new], dim=1)
        out = self.model(input_ids=ids_t, attention_mask=self.mask, position_ids=pos, cache=self.cache, use_cache=True)
        self.positions = self.positions + new.sum(1)
        return out.logits.float().numpy()
