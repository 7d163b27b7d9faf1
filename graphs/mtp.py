"""Qwen3.5's multi-token-prediction (MTP) head, and the decoder as a speculative runtime calls it.

Published checkpoints carry the head as `mtp.*`; transformers ignores it. The layout, as vLLM and
llama.cpp read it (DESIGN.md):

    e = pre_fc_norm_embedding(embed(x[t+1]))     zero-centred RMSNorms, like the decoder's
    g = pre_fc_norm_hidden(h[t])                 h[t]: the decoder's final-normed hidden state at t
    y = fc([e | g])                              fc: [hidden, 2·hidden]
    y = layers.0(y)                              one full-attention decoder layer, its own KV cache
    h'[t] = norm(y);  lm_head(h'[t])             the decoder's (shared) LM head predicts x[t+2]

Entry t of the head's cache pairs h[t] with token t+1 and sits at position t, the position of h[t]
(llama.cpp places it at t+1; RoPE scores depend only on position differences and the head attends
over its own cache alone, so the two give the same attention). To draft a second token the head
chains on itself: h'[t] stands in for the decoder's h[t+1].

Only one-layer heads exist (every published Qwen3.5 size); `mtp_layers_problem` says why another
count is not exported.
"""

from __future__ import annotations

import torch
from torch import nn

from graphs.config import TextConfig
from graphs.qwen3_5 import DecoderLayer, Qwen35Decoder, RMSNorm, layer_inputs, layer_step


def mtp_layers_problem(layers: int) -> str | None:
    """Why a head with `layers` layers cannot be exported, or None when it can."""
    if layers == 1:
        return None
    return (f"the MTP head has {layers} layers; qwen-edge exports one-layer heads (every published Qwen3.5 size "
            "has one)")


class MTPHead(nn.Module):
    """The `mtp.*` parameters (names as in the checkpoint, minus `mtp.`), without the shared LM head."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        problem = mtp_layers_problem(cfg.mtp_num_hidden_layers)
        if problem:
            raise ValueError(problem)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, eps)
        self.pre_fc_norm_hidden = RMSNorm(h, eps)
        self.layers = nn.ModuleList([DecoderLayer(cfg, "full_attention")])
        self.norm = RMSNorm(h, eps)

    def forward(self, inputs_embeds: torch.Tensor, hidden_states: torch.Tensor, token_mask: torch.Tensor,
                bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs_embeds: embeddings of tokens t+1 [B,T,hidden]; hidden_states: h[t] [B,T,hidden].
        Returns h'[t] (normed) [B,T,hidden] and the head's new key and value caches."""
        x = torch.cat([self.pre_fc_norm_embedding(inputs_embeds), self.pre_fc_norm_hidden(hidden_states)], dim=-1)
        x, key, value = layer_step(self.layers[0], self.fc(x), token_mask, bias, cos, sin, key, value)
        return self.norm(x), key, value


class MTPDraftStep(nn.Module):
    """The `mtp` graph: T (hidden, next token) pairs into the head's cache; logits and h' of the last.

    Module names match the checkpoint (`mtp.fc`, `mtp.layers.0.mlp.up_proj`, `lm_head`), so the
    quantization predicate (quant/schemes.py) sees the same parameter names as in the checkpoint.
    """

    def __init__(self, cfg: TextConfig, mtp: MTPHead, lm_head: nn.Linear) -> None:
        super().__init__()
        self.cfg, self.mtp, self.lm_head = cfg, mtp, lm_head

    def forward(self, inputs_embeds: torch.Tensor, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """attention_mask [B,past+T] covers the head's own cache; position_ids [3,B,T] are those of h[t]."""
        out, key, value = self.mtp(inputs_embeds, hidden_states,
                                   *layer_inputs(self.cfg, inputs_embeds, attention_mask, position_ids), key, value)
        last = out[:, -1:]
        return self.lm_head(last).float(), last, key, value


class DraftableDecoder(nn.Module):
    """The decoder graph of an export with an MTP head: what the plain decoder returns, plus the
    final-normed hidden state of every position (the head's input), with logits at chosen positions.

    forward(inputs_embeds, attention_mask, position_ids, [logit_positions], *state): with
    logits="last" the decoder takes `logit_positions` [N] (int64, negative counts from the end) and
    gives logits [B,N,V] there; the export makes it default to [-1], so a client that does not know
    it sees the plain decoder. With logits="all" there is no such input.
    """

    def __init__(self, decoder: Qwen35Decoder) -> None:
        super().__init__()
        # the decoder's own modules under their own names (`layers.3.mlp.up_proj`, `lm_head`), so node
        # names and the quantization predicate see what they see in the plain decoder
        self.cfg, self.logits_mode = decoder.cfg, decoder.logits_mode
        self.layers, self.norm, self.lm_head = decoder.layers, decoder.norm, decoder.lm_head
        self.layer_boundary = decoder.layer_boundary

    run_layers = Qwen35Decoder.run_layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        select = self.logits_mode == "last"
        state = rest[1:] if select else rest
        hidden, new_state = self.run_layers(inputs_embeds, *layer_inputs(self.cfg, inputs_embeds, attention_mask,
                                                                           position_ids), state)
        normed = self.norm(hidden)
        if select:
            positions = rest[0]
            positions = torch.where(positions < 0, positions + inputs_embeds.shape[1], positions)
            return (self.lm_head(normed.index_select(1, positions)).float(), normed, *new_state)
        return (self.lm_head(normed).float(), normed, *new_state)
