"""The two recurrent kernels of Gated DeltaNet: the gated delta rule and the stateful causal conv.

Each exists in plain PyTorch (the reference, differentiable, used for training and as the oracle)
and as a `torch.library.custom_op` that the exporters map to a single graph node
(`exporter/onnx/recurrent.py` for ONNX). The custom ops take the packed layouts of the ONNX
`LinearAttention` and `CausalConvWithState` operators, so the mapping is one node each.

Gated delta rule, per head, state S of shape [dk, dv], in fp32:
    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + k_t ⊗ (beta_t * (v_t - S_tᵀ k_t))
    o_t = scale * S_tᵀ q_t
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

PREFILL_CHUNK = 64
Solve = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def solve_unit_lower(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x with system @ x = rhs, for a unit lower-triangular system (LAPACK's triangular solve)."""
    return torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)


def solve_unit_lower_by_products(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The same solve in matmuls and element-wise ops only, for exporters without a triangular solve.

    Recursive block inversion: with the inverses P, Q of the two diagonal halves of a unit
    lower-triangular block [[L11, 0], [L21, L22]], its inverse is [[P, 0], [-Q L21 P, Q]]. Starting
    from 1×1 blocks (1, the unit diagonal), log2(n) doublings give the whole inverse; every level
    handles all blocks of its size at once. n must be a power of two. (The Neumann product
    (I+N)(I+N²)… is shorter but loses all accuracy once powers of N grow large, as they do on a
    trained model's keys.)
    """
    n = system.shape[-1]
    if n & (n - 1):
        raise ValueError(f"solve_unit_lower_by_products needs a power-of-two size, got {n}")
    lead = system.shape[:-2]
    system = system.reshape(-1, n, n)  # one batch axis keeps every tensor within rank 5 (Core ML's limit)
    inverse = torch.ones(system.shape[0], n, 1, 1, dtype=system.dtype, device=system.device)  # n blocks of 1×1
    size = 1
    while size < n:
        pairs = n // (2 * size)
        # the diagonal blocks of size 2·size, picked by a block-diagonal mask: [..., pairs, 2s, 2s]
        tiles = system.reshape(-1, pairs, 2 * size, pairs, 2 * size)
        pick = torch.eye(pairs, dtype=system.dtype, device=system.device)[:, None, :, None]
        diagonal = (tiles * pick).sum(-2).reshape(-1, pairs, 2 * size, 2 * size)
        lower_left = diagonal[..., size:, :size]
        halves = inverse.reshape(-1, pairs, 2, size, size)
        first, second = halves[:, :, 0], halves[:, :, 1]
        corner = -(second @ lower_left @ first)
        top = torch.cat([first, torch.zeros_like(first)], dim=-1)
        inverse = torch.cat([top, torch.cat([corner, second], dim=-1)], dim=-2)
        size *= 2
    return inverse.reshape(*lead, n, n) @ rhs


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
    solve: Solve = solve_unit_lower,
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
    u_values = solve(system, v * beta[..., None])
    u_state = solve(system, k_beta * cum.exp()[..., None])
    scores = (q @ k.transpose(-1, -2)) * decay_ts
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()

    outputs = []
    for i in range(n):
        u = u_values[:, :, i] - u_state[:, :, i] @ state
        outputs.append(q_decayed[:, :, i] @ state + scores[:, :, i] @ u)
        state = state * chunk_decay[:, :, i, None, None] + k_to_end[:, :, i].transpose(-1, -2) @ u
    out = torch.stack(outputs, dim=2).reshape(b, h, n * chunk, dv)
    return (out[:, :, :t] if pad else out), state


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
    solve_by_products: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-layout entry point (the contract of ONNX `LinearAttention`, update_rule gated_delta).

    q, k: [B,T,H*dk] (k L2-normalised), v: [B,T,H*dv], g, beta: [B,T,H], state [B,H,dk,dv] fp32.
    Returns the output [B,T,H*dv] in v's dtype and the new fp32 state. T == 1 takes the recurrent
    form, longer inputs the chunked one, exactly as a runtime kernel would. `solve_by_products` takes
    the matmul-only triangular solve (for exporters without one).
    """
    b, t, _ = v.shape
    qh, kh, vh = _unpack(q, num_heads) * scale, _unpack(k, num_heads), _unpack(v, num_heads)
    gh, bh = g.float().transpose(1, 2), beta.float().transpose(1, 2)
    if t == 1:
        out, new_state = delta_rule_recurrent(qh, kh, vh, gh, bh, state.float())
    else:
        out, new_state = delta_rule_chunked(qh, kh, vh, gh, bh, state.float(),
                                              solve=solve_unit_lower_by_products if solve_by_products else solve_unit_lower)
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
def _(q, k, v, g, beta, state, num_heads, scale, solve_by_products=False):  # noqa: ANN001, ANN202
    return torch.empty_like(v), torch.empty_like(state, dtype=torch.float32)


@causal_conv_with_state.register_fake
def _(x, weight, state):  # noqa: ANN001, ANN202
    return torch.empty_like(x), torch.empty_like(state)


# ---- kernel sets: what a decoder is built with ------------------------------------------------------
DeltaRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]
CausalConv = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RecurrentKernels:
    """The two Gated DeltaNet kernels a decoder runs, chosen when it is built (see graphs/qwen3_5.py)."""

    name: str
    delta_rule: DeltaRule
    causal_conv: CausalConv


# one graph node each at ONNX export; eagerly they run the references
CUSTOM_OPS = RecurrentKernels("custom ops", gated_delta_rule, causal_conv_with_state)
# the plain differentiable references (training, drift measurements)
REFERENCE = RecurrentKernels("reference", gated_delta_rule_reference, causal_conv_reference)
# the references with the matmul-only triangular solve: what the Core ML converter can trace
MATMUL_ONLY = RecurrentKernels("matmul only", partial(gated_delta_rule_reference, solve_by_products=True),
                               causal_conv_reference)
