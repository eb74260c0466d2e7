"""Variable-length Mamba-2 reference: the chunked SSD scan over sequences packed end to end.

Pure PyTorch and deliberately simple (one `ssd_scan_ref` call per sequence); the Triton kernel in
`kernels/triton_ssd.py` is checked against it. States live in a pool of slots, one per sequence.
"""

from __future__ import annotations

import torch

from agentrt.kernels.mamba import causal_conv1d_varlen_ref, gated_rmsnorm_ref, ssd_scan_ref


def ssd_scan_varlen_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    cu_seqlens: torch.Tensor,
    ssm_pool: torch.Tensor,
    state_idx: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Chunked SSD scan of Bq sequences packed along the token axis, with states kept in a pool.

    x: [T, H, P] (the tokens of all sequences end to end); dt: [T, H] (already softplus'd and
    clamped); A: [H] (negative); B, C: [T, G, N] with H a multiple of G; D: [H];
    cu_seqlens: [Bq+1] int (sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1]);
    ssm_pool: [S, H, P, N] fp32; state_idx: [Bq] int (the pool slot of each sequence, distinct);
    has_initial_state: [Bq] bool (False: start from zeros, ignoring the slot's content).

    Returns y [T, H, P] in x's dtype; each sequence's final state is written into
    ssm_pool[state_idx[b]] in place (a zero-length sequence gets its initial state, or zeros).
    Chunks start at each sequence's first token, as if every sequence were scanned alone.
    """
    T, H, P = x.shape
    N = B.shape[-1]
    y = torch.empty_like(x)
    cu = cu_seqlens.tolist()
    slots = state_idx.tolist()
    has_init = has_initial_state.tolist()
    for b in range(len(cu) - 1):
        s, e, slot = cu[b], cu[b + 1], slots[b]
        init = ssm_pool[slot].float().clone() if has_init[b] else torch.zeros(H, P, N, device=x.device)
        if e == s:
            ssm_pool[slot] = init
            continue
        yb, final = ssd_scan_ref(
            x[s:e].unsqueeze(0), dt[s:e].unsqueeze(0), A, B[s:e].unsqueeze(0), C[s:e].unsqueeze(0), D,
            chunk_size, init.unsqueeze(0),
        )
        y[s:e] = yb[0]
        ssm_pool[slot] = final[0]
    return y


def mamba_mix_varlen_ref(
    zxbcdt: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_idx: torch.Tensor,
    conv_pool: torch.Tensor,
    ssm_pool: torch.Tensor,
    *,
    heads: int,
    groups: int,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    dt_min: float,
    eps: float,
    group_size: int,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The whole Mamba-2 mixer between in- and out-projection, over sequences packed end to end,
    every sequence continuing from the conv window and SSM state in its pool slot (updated in place).

    zxbcdt: [T, inner + conv_dim + heads], the in-projection (gate | xBC | dt); conv_pool [S,
    conv_dim, K-1] and ssm_pool [S, heads, head_dim, N] fp32; conv_weight [conv_dim, K]. Returns
    the gated RMSNorm's output [T, inner] in zxbcdt's dtype. The composition of the references:
    `causal_conv1d_varlen_ref`, `ssd_scan_varlen_ref` and `gated_rmsnorm_ref`.
    """
    T = zxbcdt.shape[0]
    conv_dim, head_dim, N = conv_pool.shape[1], ssm_pool.shape[2], ssm_pool.shape[3]
    inner = heads * head_dim
    gate, xBC, dt = zxbcdt.split([inner, conv_dim, heads], dim=-1)
    dt = torch.nn.functional.softplus(dt.float() + dt_bias.float()).clamp(min=dt_min)
    A = -torch.exp(A_log.float())
    keep = torch.ones(len(state_idx), dtype=torch.bool, device=zxbcdt.device)
    h = causal_conv1d_varlen_ref(xBC, conv_weight, conv_bias, conv_pool, state_idx, keep, cu_seqlens)
    xs, B, C = h.split([inner, groups * N, groups * N], dim=-1)
    y = ssd_scan_varlen_ref(xs.reshape(T, heads, head_dim), dt, A, B.reshape(T, groups, N), C.reshape(T, groups, N),
                            D, chunk_size, cu_seqlens, ssm_pool, state_idx, keep)
    return gated_rmsnorm_ref(y.reshape(T, inner), gate, norm_weight, group_size, eps)
