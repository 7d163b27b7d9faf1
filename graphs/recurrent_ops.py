"""The two recurrent kernels of Gated DeltaNet: the gated delta rule and the stateful causal conv.

Each exists in plain PyTorch (the reference, differentiable, used for training and as the oracle)
and as a `torch.library.custom_op` that the exporters map to a single graph node
(`exporter/onnx_recurrent.py` for ONNX). The custom ops take the packed layouts of the ONNX
`LinearAttention` and `CausalConvWithState` operators, so the mapping is one node each.

Gated delta rule, per head, state S of shape [dk, dv], in fp32:
    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + k_t ⊗ (beta_t * (v_t - S_tᵀ k_t))
    o_t = scale * S_tᵀ q_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFILL_CHUNK = 64


# ---- gated delta rule: reference forms ---------------------------------------------------------
def delta_rule_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form (decode). q, k: [B,H,T,dk]; v: [B,H,T,dv]; g, beta: [B,H,T]; state [B,H,dk,dv].

    q must already carry the output scale. Returns o [B,H,T,dv] and the final state, all fp32.
    """
    outputs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t]
        predicted = (state * k_t[..., None]).sum(-2)  # Sᵀk: [B,H,dv]
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k_t[..., None] * delta[..., None, :]
        outputs.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outputs, dim=2), state


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk: int = PREFILL_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel form (prefill): same contract as `delta_rule_recurrent`.

    Within a chunk, with cumulative log-decay G and Γ_t = exp(G_t), the values written to the state
    are U = (I + A)⁻¹ (β·V − β·Γ·K S₀) with A[s,r] = β_s Γ_s/Γ_r k_sᵀk_r (r < s); the outputs are
    O = Γ·Q S₀ + (QKᵀ ⊙ Γ_t/Γ_s, s ≤ t) U and the state leaves as Γ_C S₀ + (K·Γ_C/Γ)ᵀ U.
    """
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    pad = (-t) % chunk
    if pad:  # zero key, value and beta with zero log-decay leave the state untouched
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // chunk
    q, k = q.reshape(b, h, n, chunk, dk), k.reshape(b, h, n, chunk, dk)
    v = v.reshape(b, h, n, chunk, dv)
    g, beta = g.reshape(b, h, n, chunk), beta.reshape(b, h, n, chunk)

    cum = g.cumsum(-1)  # G_t
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # exp(G_t - G_s) for s <= t, zero above the diagonal (masked before exp: no overflow)
    decay_ts = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    strict = (k_beta @ k.transpose(-1, -2)) * decay_ts
    system = strict.tril(-1) + torch.eye(chunk, dtype=q.dtype, device=q.device)  # I + A
    u_values = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    u_state = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay_ts
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()

    outputs = []
    for i in range(n):
        u = u_values[:, :, i] - u_state[:, :, i] @ state
        outputs.append(q_decayed[:, :, i] @ state + scores[:, :, i] @ u)
        state = state * chunk_decay[:, :, i, None, None] + k_to_end[:, :, i].transpose(-1, -2) @ u
    out = torch.stack(outputs, dim=2).reshape(b, h, n * chunk, dv)[:, :, :t]
    return out, state


def _unpack(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D] in fp32."""
    b, t, _ = x.shape
    return x.float().reshape(b, t, heads, -1).transpose(1, 2)


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-layout entry point (the contract of ONNX `LinearAttention`, update_rule gated_delta).

    q, k: [B,T,H*dk] (k L2-normalised), v: [B,T,H*dv], g, beta: [B,T,H], state [B,H,dk,dv] fp32.
    Returns the output [B,T,H*dv] in v's dtype and the new fp32 state. T == 1 takes the recurrent
    form, longer inputs the chunked one, exactly as a runtime kernel would.
    """
    b, t, _ = v.shape
    qh, kh, vh = _unpack(q, num_heads) * scale, _unpack(k, num_heads), _unpack(v, num_heads)
    gh, bh = g.float().transpose(1, 2), beta.float().transpose(1, 2)
    form = delta_rule_recurrent if t == 1 else delta_rule_chunked
    out, new_state = form(qh, kh, vh, gh, bh, state.float())
    return out.transpose(1, 2).reshape(b, t, -1).to(v.dtype), new_state


# ---- stateful causal conv: reference --------------------------------------------------------------
def causal_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d with carried history, SiLU fused (ONNX `CausalConvWithState`).

    x: [B,C,T], weight: [C,1,K], state: [B,C,K-1] (the last K-1 inputs seen). Returns
    silu(conv) [B,C,T] and the new state: the last K-1 columns of [state | x].
    """
    window = torch.cat([state.to(x.dtype), x], dim=-1)
    y = F.conv1d(window, weight.to(x.dtype), groups=x.shape[1])
    return F.silu(y), window[:, :, -(weight.shape[-1] - 1) :].to(state.dtype)


# ---- custom ops: one graph node each at export time ------------------------------------------------
# The eager kernels are the references themselves (their outputs never alias their inputs).
gated_delta_rule = torch.library.custom_op("qwen_edge::gated_delta_rule", mutates_args=())(gated_delta_rule_reference)
causal_conv_with_state = torch.library.custom_op("qwen_edge::causal_conv_with_state", mutates_args=())(
    causal_conv_reference
)


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, state, num_heads, scale):  # noqa: ANN001, ANN202
    return torch.empty_like(v), torch.empty_like(state, dtype=torch.float32)


@causal_conv_with_state.register_fake
def _(x, weight, state):  # noqa: ANN001, ANN202
    return torch.empty_like(x), torch.empty_like(state)
