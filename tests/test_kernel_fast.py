"""The fast torch paths in agentrt.kernels against their `*_ref` oracles, with fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentrt.kernels.attention import attention_lse, attention_lse_ref, attention_ref, merge_attention
from agentrt.kernels.mamba import selective_state_update, selective_state_update_ref, ssd_scan, ssd_scan_ref
from agentrt.kernels.moe import moe_experts, moe_experts_ref


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ssd_inputs(Bt, T, H, P, G, N, seed):
    g = gen(seed)
    x = torch.randn(Bt, T, H, P, generator=g)
    dt = F.softplus(torch.randn(Bt, T, H, generator=g) - 1)
    A = -torch.rand(H, generator=g) * 4 - 0.1
    B, C = torch.randn(Bt, T, G, N, generator=g), torch.randn(Bt, T, G, N, generator=g)
    return x, dt, A, B, C, torch.randn(H, generator=g), torch.randn(Bt, H, P, N, generator=g)


@pytest.mark.parametrize("shape,chunk", [
    ((2, 37, 4, 8, 2, 16), 8),    # padded last chunk, two groups
    ((3, 64, 8, 16, 1, 8), 32),   # one group shared by all heads, whole chunks
    ((1, 5, 4, 8, 4, 8), 16),     # shorter than a chunk, one head per group
])
@pytest.mark.parametrize("fresh", [False, True])
def test_ssd_scan_matches_the_reference(shape, chunk, fresh):
    x, dt, A, B, C, D, h0 = ssd_inputs(*shape, seed=sum(shape) + chunk)
    h0 = None if fresh else h0
    y, state = ssd_scan(x, dt, A, B, C, D, chunk, h0)
    y_ref, state_ref = ssd_scan_ref(x, dt, A, B, C, D, chunk, h0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_selective_state_update_matches_the_reference_in_place(groups):
    x, dt, A, B, C, D, h0 = ssd_inputs(5, 1, 4, 8, groups, 16, seed=groups)
    state, state_ref = h0.clone(), h0.clone()
    y = selective_state_update(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y_ref = selective_state_update_ref(state_ref, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,skew", [(3, 0.0), (40, 0.0), (40, 6.0), (700, 0.0), (700, 6.0)])
def test_moe_experts_match_the_reference(T, skew):
    # few rows take the padded batched path; many rows, balanced or skewed, the per-expert one
    E, k, I, Din = 8, 2, 16, 12
    g = gen(T + int(skew))
    x, up, down = torch.randn(T, Din, generator=g), torch.randn(E, I, Din, generator=g), torch.randn(E, Din, I, generator=g)
    logits = torch.randn(T, E, generator=g) + torch.linspace(0, skew, E)
    w, ids = logits.softmax(-1).topk(k)
    torch.testing.assert_close(moe_experts(x, up, down, ids, w), moe_experts_ref(x, up, down, ids, w),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_lse_matches_the_reference(dtype):
    g = gen(1)
    N, H, L, S, D = 3, 2, 6, 11, 16
    q, k, v = (torch.randn(N, H, n, D, generator=g).to(dtype) for n in (L, S, S))
    hidden = torch.rand(N, 1, L, S, generator=g) > 0.6
    hidden[..., 0] = False  # every query sees a key
    mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, -torch.inf)
    out, lse = attention_lse(q, k, v, mask, 0.3)
    out_ref, lse_ref = attention_lse_ref(q, k, v, mask, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, lse_ref, atol=tol, rtol=tol)
    assert lse.dtype == torch.float32


def test_merged_partial_attentions_equal_attention_over_all_keys():
    # a cached prefix split into two key sets, attended separately and merged = attention_ref
    g = gen(2)
    T, S, Hq, Hkv, D = 4, 23, 8, 2, 16
    q, k, v = torch.randn(T, Hq, D, generator=g), torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
    cut, G = 9, Hq // Hkv
    qs = q.view(T, Hkv, G, D).permute(1, 0, 2, 3).reshape(1, Hkv, T * G, D)
    heads = lambda t: t.transpose(0, 1)[None]  # noqa: E731
    o1, l1 = attention_lse(qs, heads(k[:cut]), heads(v[:cut]), None, D**-0.5)  # the prefix: visible to all
    own = torch.arange(S - cut)[None, :] > torch.arange(S - cut - T, S - cut)[:, None]  # causal over the rest
    mask = torch.zeros(own.shape).masked_fill_(own, -torch.inf).repeat_interleave(G, 0)[None, None]
    o2, l2 = attention_lse(qs, heads(k[cut:]), heads(v[cut:]), mask, D**-0.5)
    out = merge_attention(o1, l1, o2, l2).view(Hkv, T, G, D).permute(1, 0, 2, 3).reshape(T, Hq, D)
    torch.testing.assert_close(out, attention_ref(q, k, v, D**-0.5), atol=1e-5, rtol=1e-5)
