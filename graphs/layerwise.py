"""The decoder run layer by layer over whole sequences, each layer's weights read from the checkpoint
once: the reference for checking exports of models larger than memory.

The decoder is a pure function of (inputs, state), so the logits of every position of a sequence are
one causal pass over it from the empty state: per layer, its weights are read, applied to every
sequence, and dropped. The embedding reads only the rows of the tokens used, and the LM head runs in
blocks of vocabulary rows. Peak memory is one layer's fp32 weights plus the activations, whatever
the model's size; each weight is read once per call.
"""

from __future__ import annotations

import numpy as np
import torch

from graphs.checkpoint import Checkpoint
from graphs.qwen3_5 import Qwen35Decoder, attention_bias, layer_step, rms_norm, rope_cos_sin
from graphs.recurrent_ops import CUSTOM_OPS, RecurrentKernels

HEAD_BLOCK_BYTES = 256 << 20  # fp32 bytes of LM-head rows multiplied at a time


def _load(module: torch.nn.Module, checkpoint: Checkpoint, prefix: str) -> None:
    """Give a meta-device submodule its real float32 weights (parameters named `prefix` + local name)."""
    params = {name: torch.from_numpy(checkpoint.read_rows(prefix + name))
              for name, _ in module.named_parameters()}
    module.load_state_dict(params, strict=True, assign=True)


@torch.no_grad()
def score_sequences(checkpoint: Checkpoint, sequences: list[list[int]],
                    kernels: RecurrentKernels = CUSTOM_OPS) -> list[np.ndarray]:
    """float32 logits [T, vocab] at every position of each token sequence, from the empty state."""
    cfg = checkpoint.config
    with torch.device("meta"):
        skeleton = Qwen35Decoder(cfg, kernels, logits="all")
    rows = {t: checkpoint.read_rows("embed_tokens.weight", t, t + 1)[0] for t in {t for s in sequences for t in s}}
    hidden = [torch.from_numpy(np.stack([rows[t] for t in seq]))[None] for seq in sequences]
    context = []
    for seq in sequences:
        t = len(seq)
        mask = torch.ones(1, t, dtype=torch.int64)
        cos, sin = rope_cos_sin(cfg, torch.arange(t).expand(3, 1, t), torch.float32)
        context.append((mask, attention_bias(mask, t), cos, sin))
    initial = skeleton.initial_state(1)
    for i, layer in enumerate(skeleton.layers):
        _load(layer, checkpoint, f"layers.{i}.")
        for n, (mask, bias, cos, sin) in enumerate(context):
            hidden[n], _, _ = layer_step(layer, hidden[n], mask, bias, cos, sin, initial[2 * i], initial[2 * i + 1])
        skeleton.layers[i] = torch.nn.Identity()  # drop the layer's weights
    norm = checkpoint.read_rows("norm.weight")
    normed = [rms_norm(h[0], torch.from_numpy(norm), cfg.rms_norm_eps) for h in hidden]
    return _lm_head(checkpoint, normed)


def _lm_head(checkpoint: Checkpoint, normed: list[torch.Tensor]) -> list[np.ndarray]:
    vocab, width = checkpoint.config.vocab_size, checkpoint.config.hidden_size
    out = [np.empty((h.shape[0], vocab), np.float32) for h in normed]
    step = max(1, HEAD_BLOCK_BYTES // (4 * width))
    for start in range(0, vocab, step):
        stop = min(vocab, start + step)
        weight = torch.from_numpy(checkpoint.read_rows("lm_head.weight", start, stop))
        for h, logits in zip(normed, out):
            logits[:, start:stop] = (h @ weight.T).numpy()
    return out
