"""The decoder as one fixed-shape Core ML step: state lives in buffers that the step updates in place.

Core ML states (`ct.StateType`) are traced from registered buffers written by slice assignment, so
this module wraps `Qwen35Decoder` (sharing its parameters) and keeps, per layer, the conv and
delta-rule states or a key/value cache of fixed `capacity`. In an export every shape is fixed by the
number of tokens T (the prefill chunk, or 1 for decode) and `capacity`; what varies at run time comes in as inputs:

    input_ids       [1, T] int32
    position_ids    [1, T] int32   RoPE positions; -1 marks padding (a zero embedding)
    attention_mask  [1, 1, T, capacity] fp32 additive (0 = may attend, -1e4 = may not)
    write_position  [1] int32      the cache slot of the first of the T tokens

Padding goes at the start of a sequence's first chunk: a zero embedding stays exactly zero through
every layer (norms of 0 are 0, projections have no bias), so it leaves the conv and delta-rule
states untouched; a padding row attends to its own (zero) key only.

States are fp16 (Core ML accepts no other state dtype). With `recurrent_io=True` the delta-rule
state is instead one fp32 input `recurrent_in` [linear layers, Hv, dk, dv] and output `recurrent_out`
that the caller carries between calls.
"""

from __future__ import annotations

import torch
from torch import nn

from graphs import recurrent_ops
from graphs.qwen3_5 import GatedAttention, Qwen35Decoder, apply_rope, rope_cos_sin

STATE_DTYPE = torch.float16


class CoreMLStep(nn.Module):
    """forward(input_ids, position_ids, attention_mask, write_position[, recurrent_in]) -> (logits[, recurrent_out]).

    Buffers (the Core ML states) are named conv_i, recurrent_i, key_i, value_i by layer index. The
    wrapped model's Gated DeltaNet kernels are switched to the plain PyTorch references (the custom
    ops exist for ONNX) with the matmul-only triangular solve.
    """

    def __init__(self, model: Qwen35Decoder, capacity: int, recurrent_io: bool = False) -> None:
        super().__init__()
        self.model, self.capacity, self.recurrent_io = model, capacity, recurrent_io
        cfg = model.cfg
        for i, layer in enumerate(model.layers):
            if layer.is_linear:
                layer.linear_attn.causal_conv = recurrent_ops.causal_conv_reference
                layer.linear_attn.delta_rule = _delta_rule_by_products
                self.register_buffer(f"conv_{i}", torch.zeros(1, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=STATE_DTYPE))
                if not recurrent_io:
                    self.register_buffer(f"recurrent_{i}", torch.zeros(self.recurrent_shape(), dtype=STATE_DTYPE))
            else:
                shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
                self.register_buffer(f"key_{i}", torch.zeros(shape, dtype=STATE_DTYPE))
                self.register_buffer(f"value_{i}", torch.zeros(shape, dtype=STATE_DTYPE))

    def recurrent_shape(self, layers: int = 1) -> tuple[int, int, int, int]:
        cfg = self.model.cfg
        return layers, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim

    def recurrent_io_shape(self) -> tuple[int, int, int, int]:
        return self.recurrent_shape(len(self.model.cfg.linear_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        write_position: torch.Tensor,
        recurrent_in: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        model, cfg = self.model, self.model.cfg
        t = input_ids.shape[1]  # static in an export: the prefill chunk, or 1 for decode
        real = (position_ids >= 0).to(torch.float32)[..., None]  # [1,T,1]
        x = model.embed_tokens(input_ids).float() * real
        cos, sin = rope_cos_sin(cfg, position_ids.clamp(min=0)[None].expand(3, -1, -1), x.dtype)
        ones = torch.ones(1, t)
        start = write_position[0].item()  # a dynamic slice start: Core ML slice_update at run time
        torch._check(start >= 0)
        torch._check(start + t <= self.capacity)
        recurrent_out = []
        linear_seen = 0
        for i, layer in enumerate(model.layers):
            h = layer.input_layernorm(x)
            if layer.is_linear:
                conv = getattr(self, f"conv_{i}")
                if self.recurrent_io:
                    rec = recurrent_in[linear_seen : linear_seen + 1]
                else:
                    rec = getattr(self, f"recurrent_{i}").float()
                h, new_conv, new_rec = layer.linear_attn(h, ones, conv.float(), rec)
                conv[:, :, :] = new_conv  # copy_ rounds to the fp16 buffer
                if self.recurrent_io:
                    recurrent_out.append(new_rec)
                else:
                    getattr(self, f"recurrent_{i}")[:, :, :, :] = new_rec
                linear_seen += 1
            else:
                h = self._attention(layer.self_attn, h, cos, sin, attention_mask, start,
                                    getattr(self, f"key_{i}"), getattr(self, f"value_{i}"))
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = model.lm_head(model.norm(x[:, -1:])).float()
        if self.recurrent_io:
            return logits, torch.cat(recurrent_out, dim=0)
        return (logits,)

    def _attention(self, attn: GatedAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, start: int, key_cache: torch.Tensor,
                   value_cache: torch.Tensor) -> torch.Tensor:
        """Gated attention over the fixed-capacity cache, after writing this step's keys and values."""
        cfg = attn.cfg
        t, d, kvh = x.shape[1], cfg.head_dim, cfg.num_key_value_heads
        q, gate = attn.q_proj(x).reshape(1, t, cfg.num_attention_heads, 2 * d).chunk(2, dim=-1)
        q = attn.q_norm(q).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).reshape(1, t, kvh, d)).transpose(1, 2)
        v = attn.v_proj(x).reshape(1, t, kvh, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_cache[:, :, start : start + t] = _as_state(k)
        value_cache[:, :, start : start + t] = _as_state(v)
        groups = cfg.num_attention_heads // kvh
        q = q.reshape(1, kvh, groups * t, d)
        scores = (q @ key_cache.float().transpose(-1, -2)) * d**-0.5
        scores = scores.reshape(1, kvh, groups, t, -1) + mask[:, :, None]
        probs = torch.softmax(scores, dim=-1).reshape(1, kvh, groups * t, -1)
        out = (probs @ value_cache.float()).reshape(1, cfg.num_attention_heads, t, d).transpose(1, 2).reshape(1, t, -1)
        return attn.o_proj(out * torch.sigmoid(gate.reshape(1, t, -1)))


def _as_state(x: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 state dtype in eager runs; under export the converter inserts that cast
    itself (it reads states as fp32 and casts on write), so the value must stay fp32 there."""
    return x if torch.compiler.is_exporting() else x.to(STATE_DTYPE)


def _delta_rule_by_products(q, k, v, g, beta, state, num_heads, scale):  # noqa: ANN001, ANN202
    return recurrent_ops.gated_delta_rule_reference(q, k, v, g, beta, state, num_heads, scale,
                                                    solve_by_products=True)
