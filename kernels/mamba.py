"""Mamba-2 references: causal depthwise conv, chunked SSD scan, one-token state update, gated RMSNorm.

Pure PyTorch, one sequence (or one token per sequence) at a time; the Triton kernels of the GPU
path are checked against these. Notation follows the Mamba-2 paper (Dao & Gu, 2024), section 6
("SSD algorithm"): x inputs, dt step sizes, A (negative) decay rates, B/C input/output projections
shared by the heads of a group, D the skip connection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over one sequence, continuing from `state`.

    x: [T, C]; weight: [C, K]; bias: [C] or None; state: [C, K-1] (the previous K-1 inputs) or None
    for a fresh sequence. Returns (y [T, C], new_state [C, K-1]).
    """
    T, C = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(C, K - 1)
    window = torch.cat([state.to(x.dtype), x.t()], dim=1)  # [C, K-1+T]
    y = F.conv1d(window.unsqueeze(0), weight.unsqueeze(1), bias, groups=C)[0]  # [C, T]
    return F.silu(y).t(), window[:, -(K - 1):]


def causal_conv1d_update_ref(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One new token per sequence: conv over [state, x] + SiLU; `state` is shifted in place.

    x: [B, C]; state: [B, C, K-1]; weight: [C, K]; bias: [C] or None. Returns y [B, C].
    """
    window = torch.cat([state, x.unsqueeze(-1).to(state.dtype)], dim=-1)  # [B, C, K]
    state.copy_(window[..., 1:])
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y).to(x.dtype)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a: [..., L] -> [..., L, L] with out[..., i, j] = sum(a[..., j+1:i+1]) for i >= j, -inf above.

    Summing a masked copy (instead of subtracting cumulative sums) avoids cancellation.
    """
    L = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, L)  # rep[..., i, j] = a[..., i]
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~strict, 0), dim=-2)
    keep = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return out.masked_fill(~keep, -torch.inf)


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan of one sequence in fp32 (Mamba-2 paper, Listing 1, with an initial state).

    x: [T, H, P]; dt: [T, H] (already softplus'd and clamped); A: [H] (negative); B, C: [T, G, N]
    with H a multiple of G; D: [H]; initial_state: [H, P, N] or None.
    Returns (y [T, H, P] in x's dtype, final_state [H, P, N] fp32).
    """
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    L = chunk_size
    xf, dtf = x.float(), dt.float()
    Bh = B.float().repeat_interleave(H // G, dim=1)  # [T, H, N]
    Ch = C.float().repeat_interleave(H // G, dim=1)
    pad = (-T) % L
    xdt = F.pad(xf * dtf[..., None], (0, 0, 0, 0, 0, pad)).view(-1, L, H, P)  # [c, L, H, P]
    a = F.pad(A.float() * dtf, (0, 0, 0, pad)).view(-1, L, H).permute(0, 2, 1)  # [c, H, L]
    Bc = F.pad(Bh, (0, 0, 0, 0, 0, pad)).view(-1, L, H, N)
    Cc = F.pad(Ch, (0, 0, 0, 0, 0, pad)).view(-1, L, H, N)
    a_cum = torch.cumsum(a, dim=-1)  # [c, H, L]

    # 1. within each chunk: a masked, decayed "attention" of C over B
    decay = torch.exp(_segsum(a))  # [c, H, L(l), L(s)]
    scores = torch.einsum("clhn,cshn->chls", Cc, Bc) * decay
    y = torch.einsum("chls,cshp->clhp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [c, H, L]
    chunk_states = torch.einsum("clhn,chl,clhp->chpn", Bc, to_end, xdt)

    # 3. recurrence over chunks; state_in[c] is the state entering chunk c
    state = x.new_zeros(H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cum[..., -1])  # [c, H]
    state_in = []
    for c in range(xdt.shape[0]):
        state_in.append(state)
        state = state * chunk_decay[c][:, None, None] + chunk_states[c]
    states = torch.stack(state_in)  # [c, H, P, N]

    # 4. the entering state, decayed to each position, read out through C
    y = y + torch.einsum("clhn,chpn,chl->clhp", Cc, states, torch.exp(a_cum))
    y = y.reshape(-1, H, P)[:T] + D.float()[:, None] * xf
    return y.to(x.dtype), state


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One recurrent SSM step per sequence; `state` is updated in place.

    state: [Bt, H, P, N] fp32; x: [Bt, H, P]; dt: [Bt, H] (softplus'd, clamped); A, D: [H];
    B, C: [Bt, G, N]. Returns y [Bt, H, P] in x's dtype.
    """
    H, G = x.shape[1], B.shape[1]
    dtf = dt.float()
    Bh = B.float().repeat_interleave(H // G, dim=1)  # [Bt, H, N]
    Ch = C.float().repeat_interleave(H // G, dim=1)
    decay = torch.exp(dtf * A.float())[..., None, None]  # [Bt, H, 1, 1]
    update = (dtf[..., None] * x.float())[..., None] * Bh[:, :, None, :]  # [Bt, H, P, N]
    new = state * decay + update
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch) + D.float()[:, None] * x.float()
    return y.to(x.dtype)


def gated_rmsnorm_ref(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """RMSNorm of x * silu(gate), normalised per group of `group_size` channels.

    x, gate: [T, D]; weight: [D]. Returns [T, D] in gate's dtype (the model's).
    """
    h = x.float() * F.silu(gate.float())
    g = h.view(*h.shape[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * g.view_as(h)).to(gate.dtype)
