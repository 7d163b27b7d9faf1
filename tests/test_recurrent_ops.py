"""The recurrent kernels: chunked and recurrent delta rule agree, state carries across calls, the conv
matches a plain causal conv, and the custom ops equal their references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphs import recurrent_ops as ops


def _inputs(b=2, h=3, t=130, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dk, generator=g) * dk**-0.5
    k = F.normalize(torch.randn(b, h, t, dk, generator=g), dim=-1)
    v = torch.randn(b, h, t, dv, generator=g)
    decay = -torch.rand(b, h, t, generator=g) * 2
    beta = torch.rand(b, h, t, generator=g)
    state = torch.randn(b, h, dk, dv, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("t", [1, 63, 64, 65, 130])
def test_chunked_equals_recurrent(t):
    q, k, v, g, beta, s = _inputs(t=t)
    o1, s1 = ops.delta_rule_recurrent(q, k, v, g, beta, s)
    o2, s2 = ops.delta_rule_chunked(q, k, v, g, beta, s)
    torch.testing.assert_close(o2, o1, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=2e-5, rtol=1e-5)


def test_state_carries_across_calls():
    q, k, v, g, beta, s = _inputs(t=100)
    o_all, s_all = ops.delta_rule_chunked(q, k, v, g, beta, s)
    cut = 41
    o_a, s_a = ops.delta_rule_chunked(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], g[:, :, :cut], beta[:, :, :cut], s)
    o_b, s_b = ops.delta_rule_chunked(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], g[:, :, cut:], beta[:, :, cut:], s_a)
    torch.testing.assert_close(torch.cat([o_a, o_b], dim=2), o_all, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s_b, s_all, atol=2e-5, rtol=1e-5)


def test_delta_rule_step_matches_definition():
    """One step written out from the formula: S = e^g S; S += k ⊗ β(v − Sᵀk); o = Sᵀq."""
    q, k, v, g, beta, s = _inputs(b=1, h=1, t=1)
    S = s[0, 0] * g[0, 0, 0].exp()
    kk, vv = k[0, 0, 0], v[0, 0, 0]
    S = S + torch.outer(kk, beta[0, 0, 0] * (vv - S.T @ kk))
    o, s_new = ops.delta_rule_recurrent(q, k, v, g, beta, s)
    torch.testing.assert_close(s_new[0, 0], S)
    torch.testing.assert_close(o[0, 0, 0], S.T @ q[0, 0, 0])


def test_packed_custom_op_matches_reference():
    b, t, h, dk, dv = 2, 9, 4, 8, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, t, h * dk, generator=g)
    k = F.normalize(torch.randn(b, t, h, dk, generator=g), dim=-1).reshape(b, t, -1)
    v = torch.randn(b, t, h * dv, generator=g)
    decay, beta = -torch.rand(b, t, h, generator=g), torch.rand(b, t, h, generator=g)
    state = torch.zeros(b, h, dk, dv)
    out, new = torch.ops.qwen_edge.gated_delta_rule(q, k, v, decay, beta, state, h, dk**-0.5)
    ref_out, ref_new = ops.gated_delta_rule_reference(q, k, v, decay, beta, state, h, dk**-0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(new, ref_new)
    assert out.shape == (b, t, h * dv) and new.shape == (b, h, dk, dv)


@pytest.mark.parametrize("t", [1, 2, 3, 10])
def test_causal_conv_with_state_matches_full_sequence(t):
    """Running a sequence in two calls with carried state equals one causal conv over it all."""
    g = torch.Generator().manual_seed(2)
    c, kernel = 6, 4
    x = torch.randn(2, c, 12 + t, generator=g)
    w = torch.randn(c, 1, kernel, generator=g)
    full = F.silu(F.conv1d(F.pad(x, (kernel - 1, 0)), w, groups=c))
    state = torch.zeros(2, c, kernel - 1)
    y1, state = torch.ops.qwen_edge.causal_conv_with_state(x[:, :, :12], w, state)
    y2, state = torch.ops.qwen_edge.causal_conv_with_state(x[:, :, 12:], w, state)
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), full)
    torch.testing.assert_close(state, x[:, :, -(kernel - 1):])
