"""The Qwen3.5 text decoder, written for export: every piece of state is an explicit input and output.

One forward call is a pure function `(inputs_embeds, attention_mask, position_ids, state) ->
(logits, new_state)`. It serves prefill (T > 1) and decode (T = 1) alike; the state is, per layer,
conv + recurrent state (Gated DeltaNet) or key + value cache (gated attention), as `graphs/state.py`
describes it. Parameter names match the Hugging Face checkpoint (minus its `model.` /
`model.language_model.` prefix), so loading is a rename, not a conversion.

What differs between uses is chosen by arguments, never by patching the model from outside: the
recurrent kernels and the logits mode when the decoder is built, and how the attention cache is
written (`kv_write`) when `run_layers` is called (the Core ML step writes into fixed-size buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from graphs.config import TextConfig
from graphs.recurrent_ops import CUSTOM_OPS, RecurrentKernels
from graphs.state import state_tensors

# (past_key, past_value, key, value) -> the key and value to attend over, this call's included
KVWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LogitsMode = Literal["all", "last"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = True) -> torch.Tensor:
    """RMSNorm in fp32. Qwen3.5's decoder norms store `w - 1` (zero-centred); the gated norm does not."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    scale = 1.0 + weight.float() if zero_centred else weight.float()
    return (xf * scale).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centred: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim))
        self.eps, self.zero_centred = eps, zero_centred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centred)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """Linear-attention mixer: projections, stateful causal conv, gated delta rule, gated norm."""

    def __init__(self, cfg: TextConfig, kernels: RecurrentKernels = CUSTOM_OPS) -> None:
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, cfg.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, cfg.value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, hv, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, hv, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.linear_conv_kernel_dim, groups=cfg.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(hv))
        self.A_log = nn.Parameter(torch.zeros(hv))
        self.norm = RMSNorm(cfg.linear_value_head_dim, cfg.rms_norm_eps, zero_centred=False)
        self.out_proj = nn.Linear(cfg.value_dim, cfg.hidden_size, bias=False)
        self.repeat = hv // hk

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor, conv_state: torch.Tensor, recurrent_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,T,hidden]; token_mask [B,T] (0 = padding, kept out of both states)."""
        cfg = self.cfg
        b, t, _ = x.shape
        x = torch.where(token_mask[:, :, None] > 0, x, torch.zeros((), dtype=x.dtype))  # padding stays out
        mixed, conv_state = self.kernels.causal_conv(self.in_proj_qkv(x).transpose(1, 2), self.conv1d.weight, conv_state)
        q, k, v = torch.split(mixed.transpose(1, 2), [cfg.key_dim, cfg.key_dim, cfg.value_dim], dim=-1)
        q = l2_normalize(q.reshape(b, t, cfg.linear_num_key_heads, -1).float())
        k = l2_normalize(k.reshape(b, t, cfg.linear_num_key_heads, -1).float())
        if self.repeat > 1:  # value heads outnumber key heads (4B, 9B): each q/k head serves `repeat`
            q, k = q.repeat_interleave(self.repeat, dim=2), k.repeat_interleave(self.repeat, dim=2)
        beta = torch.sigmoid(self.in_proj_b(x)).float()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())
        out, recurrent_state = self.kernels.delta_rule(
            q.reshape(b, t, -1),
            k.reshape(b, t, -1),
            v.float(),
            g,
            beta,
            recurrent_state,
            cfg.linear_num_value_heads,
            cfg.linear_key_head_dim**-0.5,
        )
        out = out.reshape(b, t, cfg.linear_num_value_heads, -1)
        z = self.in_proj_z(x).reshape(b, t, cfg.linear_num_value_heads, -1)
        out = (self.norm(out) * F.silu(z.float())).to(x.dtype)
        return self.out_proj(out.reshape(b, t, -1)), conv_state, recurrent_state


def rope_cos_sin(cfg: TextConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved multimodal RoPE: position_ids [3,B,T] (time, height, width rows) -> cos, sin [B,T,rot].

    Frequency j takes its position from row 1 (height) when j % 3 == 1 and j < 3*sections[1], from
    row 2 (width) when j % 3 == 2 and j < 3*sections[2], else from row 0. For text, rows are equal.
    """
    half = cfg.rotary_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float32) * 2 / cfg.rotary_dim))
    rows = [0] * half
    for row in (1, 2):
        for j in range(row, min(3 * cfg.mrope_section[row], half), 3):
            rows[j] = row
    pos = position_ids.float()[torch.tensor(rows)]  # [half, B, T]
    freqs = pos.permute(1, 2, 0) * inv_freq  # [B, T, half]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the leading `rot` dims of x [B,H,T,D]; the rest passes through."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


class GatedAttention(nn.Module):
    """Full attention with per-head q/k norms, partial RoPE, GQA and a sigmoid output gate."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * d * 2, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        kv_write: KVWrite | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bias [B,1,T,keys] is 0 where attending is allowed and very negative elsewhere; the keys are
        what `kv_write` returns (by default the past cache with this call's keys appended)."""
        cfg = self.cfg
        b, t, _ = x.shape
        d = cfg.head_dim
        q, gate = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, 2 * d).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).reshape(b, t, -1, d)).transpose(1, 2)
        v = self.v_proj(x).reshape(b, t, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key, value = (kv_write or append_to_cache)(past_key, past_value, k, v)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        q = q.reshape(b, cfg.num_key_value_heads, groups * t, d)  # fold the query group into T
        scores = (q @ key.transpose(-1, -2)).float() * d**-0.5  # fp32 from here: the mask must not overflow
        scores = scores.reshape(b, cfg.num_key_value_heads, groups, t, -1) + bias[:, :, None]
        probs = torch.softmax(scores, dim=-1).to(v.dtype).reshape(b, cfg.num_key_value_heads, groups * t, -1)
        out = (probs @ value).reshape(b, cfg.num_attention_heads, t, d).transpose(1, 2).reshape(b, t, -1)
        out = out * torch.sigmoid(gate.reshape(b, t, -1))
        return self.o_proj(out), key, value


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def append_to_cache(past_key: torch.Tensor, past_value: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The growing cache of the ONNX graph: past entries, then this call's."""
    return torch.cat([past_key.to(key.dtype), key], dim=2), torch.cat([past_value.to(value.dtype), value], dim=2)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str, kernels: RecurrentKernels = CUSTOM_OPS) -> None:
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, kernels)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def layer_step(layer: DecoderLayer, x: torch.Tensor, token_mask: torch.Tensor, bias: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor,
               kv_write: KVWrite | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer: hidden states and the layer's two state tensors, updated. (A function, not
    the layer's forward: the exported graphs name nodes by the modules called, and the layer's own
    residual adds belong to the decoder.)"""
    h = layer.input_layernorm(x)
    if layer.is_linear:
        h, s0, s1 = layer.linear_attn(h, token_mask, s0, s1)
    else:
        h, s0, s1 = layer.self_attn(h, cos, sin, bias, s0, s1, kv_write)
    x = x + h
    return x + layer.mlp(layer.post_attention_layernorm(x)), s0, s1


class Qwen35Decoder(nn.Module):
    """Embedding, decoder layers, final norm and LM head; forward takes embeddings and explicit state.

    State order (flat, as in the ONNX graph): `graphs/state.py`. `kernels` picks the recurrent kernels
    (custom ops for ONNX export, references for training, matmul-only for Core ML); with
    logits="last" they are computed for the last position only (a 512-token prefill then never
    holds 512 × vocab logits).
    """

    def __init__(self, cfg: TextConfig, kernels: RecurrentKernels = CUSTOM_OPS, logits: LogitsMode = "all") -> None:
        super().__init__()
        self.cfg, self.kernels, self.logits_mode = cfg, kernels, logits
        # (x, i) -> x, called before layer i and before the head (i = layer count); the ONNX exporter's
        # layer template sets it to a marker op (exporter/onnx/layer_stack.py), every other use leaves None
        self.layer_boundary: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t, kernels) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *state: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """inputs_embeds [B,T,hidden]; attention_mask [B,past+T] (1 = real token); position_ids [3,B,T]."""
        hidden, new_state = self.run_layers(inputs_embeds, *layer_inputs(self.cfg, inputs_embeds, attention_mask,
                                                                           position_ids), state)
        return (self.logits(hidden), *new_state)

    def run_layers(self, x: torch.Tensor, token_mask: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, state: Sequence[torch.Tensor],
                   kv_write: KVWrite | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The layer stack: hidden states [B,T,hidden] and the new state, two tensors per layer."""
        new_state: list[torch.Tensor] = []
        mark = self.layer_boundary
        for i, layer in enumerate(self.layers):
            x = x if mark is None else mark(x, i)
            x, s0, s1 = layer_step(layer, x, token_mask, bias, cos, sin, state[2 * i], state[2 * i + 1], kv_write)
            new_state += [s0, s1]
        return (x if mark is None else mark(x, len(self.layers))), new_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of every position, or of the last one (logits="last")."""
        if self.logits_mode == "last":
            hidden = hidden[:, -1:]
        return self.lm_head(self.norm(hidden)).float()

    def initial_state(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Zero state for a fresh sequence: empty KV cache, zero conv and recurrent states."""
        return [torch.zeros(t.shape(batch), dtype=torch.float32 if t.role.always_fp32 else dtype)
                for t in state_tensors(self.cfg)]


def layer_inputs(cfg: TextConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every layer of a call takes besides x: token mask [B,T], attention bias, RoPE cos and sin."""
    t = inputs_embeds.shape[1]
    cos, sin = rope_cos_sin(cfg, position_ids, inputs_embeds.dtype)
    return attention_mask[:, -t:], attention_bias(attention_mask, t), cos, sin


def attention_bias(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """[B,1,T,past+T] fp32 additive bias: causal over absolute positions, padding keys masked.

    Uses the lowest finite fp32 value, not -inf, so a fully masked (padding) query row stays finite.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - t :]
    allowed = (key_pos[None, :] <= query_pos[:, None])[None] & (attention_mask[:, None, :] > 0)
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)[:, None]


class EmbedTokens(nn.Module):
    """The token-embedding graph of the onnx-community layout: input_ids -> inputs_embeds."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)
