"""The torch references in agentrt.kernels against independent formulations, with fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentrt.kernels.attention import attention_ref
from agentrt.kernels.mamba import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    gated_rmsnorm_ref,
    selective_state_update_ref,
    ssd_scan_ref,
)
from agentrt.kernels.moe import moe_experts_ref


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ssd_inputs(Bt=2, T=37, H=4, P=8, G=2, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, T, H, P, generator=g)
    dt = F.softplus(torch.randn(Bt, T, H, generator=g) - 1)
    A = -torch.rand(H, generator=g) * 4 - 0.1
    B, C = torch.randn(Bt, T, G, N, generator=g), torch.randn(Bt, T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    h0 = torch.randn(Bt, H, P, N, generator=g)
    return x, dt, A, B, C, D, h0


@pytest.mark.parametrize("chunk", [4, 8, 32, 64])
def test_ssd_scan_equals_the_step_by_step_recurrence(chunk):
    x, dt, A, B, C, D, h0 = ssd_inputs(seed=chunk)
    y, final = ssd_scan_ref(x, dt, A, B, C, D, chunk, h0)
    state = h0.clone()
    steps = [selective_state_update_ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(x.shape[1])]
    torch.testing.assert_close(y, torch.stack(steps, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, state, atol=1e-4, rtol=1e-4)


def test_ssd_scan_resumes_from_its_own_final_state():
    x, dt, A, B, C, D, h0 = ssd_inputs(T=50, seed=3)
    y, final = ssd_scan_ref(x, dt, A, B, C, D, 16, h0)
    y1, mid = ssd_scan_ref(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], D, 16, h0)
    y2, end = ssd_scan_ref(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], D, 16, mid)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(end, final, atol=1e-4, rtol=1e-4)


def test_causal_conv_matches_conv1d_and_its_one_token_update():
    Bt, T, Cd, K = 3, 11, 24, 4
    x, w, b = rand(Bt, T, Cd, seed=1), rand(Cd, K, seed=2), rand(Cd, seed=3)
    expected = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], b, padding=K - 1, groups=Cd)[..., :T]).transpose(1, 2)
    y, state = causal_conv1d_ref(x, w, b, None)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    running = torch.zeros(Bt, Cd, K - 1)
    steps = [causal_conv1d_update_ref(x[:, t], running, w, b) for t in range(T)]
    torch.testing.assert_close(torch.stack(steps, 1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(running, state)


def test_attention_matches_sdpa_with_a_cached_prefix():
    T, S, Hq, Hkv, D = 5, 19, 8, 2, 16
    q, k, v = rand(T, Hq, D, seed=4), rand(S, Hkv, D, seed=5), rand(S, Hkv, D, seed=6)
    got = attention_ref(q, k, v, D**-0.5)
    mask = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                              attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skewed", [False, True])  # padded grouped matmuls, or the per-expert loop
def test_moe_experts_match_a_per_token_loop(skewed):
    T, E, k, I, Din = 13, 6, 2, 8, 12
    x, up, down = rand(T, Din, seed=7), rand(E, I, Din, seed=8), rand(E, Din, I, seed=9)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:k] for t in range(T)])
    if skewed:  # every token picks experts 4 and 1
        ids = torch.tensor([[4, 1]] * T)
    w = rand(T, k, seed=10).abs()
    expected = torch.stack([
        sum(w[t, j] * (torch.relu(up[ids[t, j]] @ x[t]).square() @ down[ids[t, j]].t()) for j in range(k))
        for t in range(T)
    ])
    torch.testing.assert_close(moe_experts_ref(x, up, down, ids, w), expected, atol=1e-4, rtol=1e-4)


def test_gated_rmsnorm_normalises_each_group():
    x, gate, weight = rand(4, 12, seed=11), rand(4, 12, seed=12), rand(12, seed=13)
    got = gated_rmsnorm_ref(x, gate, weight, group_size=4, eps=1e-6)
    h = (x * F.silu(gate)).view(4, 3, 4)
    expected = (h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).view(4, 12) * weight
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
