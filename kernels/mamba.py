"""Mamba-2 references: causal depthwise conv, chunked SSD scan, one-token state update, gated RMSNorm.

Pure PyTorch, over batches of equal-length sequences (or one token per sequence); the Triton
kernels of the GPU path are checked against these. Notation follows the Mamba-2 paper (Dao & Gu, 2024), section 6
("SSD algorithm"): x inputs, dt step sizes, A (negative) decay rates, B/C input/output projections
shared by the heads of a group, D the skip connection.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over a batch of equal-length sequences, continuing from `state`.

    x: [B, T, C]; weight: [C, K]; bias: [C] or None; state: [B, C, K-1] (each sequence's previous
    K-1 inputs) or None for fresh sequences. Returns (y [B, T, C], new_state [B, C, K-1]).
    """
    Bt, T, C = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(Bt, C, K - 1)
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, K-1+T]
    y = window[..., :T] * weight[:, :1]  # depthwise: a sum of K shifted products (faster than conv1d on CPU)
    for j in range(1, K):
        y = y + window[..., j:j + T] * weight[:, j:j + 1]
    if bias is not None:
        y = y + bias[:, None]
    return F.silu(y).transpose(1, 2), window[..., T:]


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


@functools.lru_cache(maxsize=16)
def _tril_masks(L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode too
        ones = torch.ones(L, L, dtype=torch.bool, device=device)
        return ~torch.tril(ones, diagonal=-1), ~torch.tril(ones)  # (not strictly lower, not lower)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a: [..., L] -> [..., L, L] with out[..., i, j] = sum(a[..., j+1:i+1]) for i >= j, -inf above.

    Summing a masked copy (instead of subtracting cumulative sums) avoids cancellation.
    """
    L = a.shape[-1]
    not_strict, not_lower = _tril_masks(L, a.device)
    rep = a.unsqueeze(-1).expand(*a.shape, L)  # rep[..., i, j] = a[..., i]
    out = torch.cumsum(rep.masked_fill(not_strict, 0), dim=-2)
    return out.masked_fill(not_lower, -torch.inf)


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
    """Chunked SSD scan in fp32 of equal-length sequences (Mamba-2 paper, Listing 1, with initial states).

    x: [Bt, T, H, P]; dt: [Bt, T, H] (already softplus'd and clamped); A: [H] (negative);
    B, C: [Bt, T, G, N] with H a multiple of G; D: [H]; initial_state: [Bt, H, P, N] or None.
    Returns (y [Bt, T, H, P] in x's dtype, final_state [Bt, H, P, N] fp32).
    """
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    L = chunk_size
    xf, dtf = x.float(), dt.float()
    Bh = B.float().repeat_interleave(H // G, dim=2)  # [Bt, T, H, N]
    Ch = C.float().repeat_interleave(H // G, dim=2)
    pad = (-T) % L
    xdt = F.pad(xf * dtf[..., None], (0, 0, 0, 0, 0, pad)).view(Bt, -1, L, H, P)  # [Bt, c, L, H, P]
    a = F.pad(A.float() * dtf, (0, 0, 0, pad)).view(Bt, -1, L, H).transpose(2, 3)  # [Bt, c, H, L]
    Bc = F.pad(Bh, (0, 0, 0, 0, 0, pad)).view(Bt, -1, L, H, N)
    Cc = F.pad(Ch, (0, 0, 0, 0, 0, pad)).view(Bt, -1, L, H, N)
    a_cum = torch.cumsum(a, dim=-1)  # [Bt, c, H, L]

    # 1. within each chunk: a masked, decayed "attention" of C over B
    decay = torch.exp(_segsum(a))  # [Bt, c, H, L(l), L(s)]
    scores = torch.einsum("bclhn,bcshn->bchls", Cc, Bc) * decay
    y = torch.einsum("bchls,bcshp->bclhp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [Bt, c, H, L]
    chunk_states = torch.einsum("bclhn,bchl,bclhp->bchpn", Bc, to_end, xdt)

    # 3. recurrence over chunks; state_in[:, c] is the state entering chunk c
    state = x.new_zeros(Bt, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cum[..., -1])  # [Bt, c, H]
    state_in = []
    for c in range(xdt.shape[1]):
        state_in.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    states = torch.stack(state_in, dim=1)  # [Bt, c, H, P, N]

    # 4. the entering state, decayed to each position, read out through C
    y = y + torch.einsum("bclhn,bchpn,bchl->bclhp", Cc, states, torch.exp(a_cum))
    y = y.reshape(Bt, -1, H, P)[:, :T] + D.float()[:, None] * xf
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


# --- fast torch paths (CPU): the same results as the references, with fewer and larger operators ---

def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssd_scan_ref` in a head-major layout, so every contraction is one batched matmul.

    B and C stay per group: the heads of a group are folded into the matmul's rows
    ([G, R*P, L] @ [G, L, N]) instead of repeating B and C per head. Same arguments and results.
    """
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R, L = H // G, chunk_size
    pad = (-T) % L
    nc = (T + pad) // L
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    xdt = xf * dtf[..., None]
    if pad:
        xdt, dtf = F.pad(xdt, (0, 0, 0, 0, 0, pad)), F.pad(dtf, (0, 0, 0, pad))
        Bf, Cf = F.pad(Bf, (0, 0, 0, 0, 0, pad)), F.pad(Cf, (0, 0, 0, 0, 0, pad))
    xdt = xdt.view(Bt, nc, L, H, P).permute(0, 1, 3, 2, 4).contiguous()  # [Bt, c, H, L, P]
    Bc = Bf.view(Bt, nc, L, G, N).permute(0, 1, 3, 2, 4).contiguous()   # [Bt, c, G, L, N]
    Cc = Cf.view(Bt, nc, L, G, N).permute(0, 1, 3, 2, 4).contiguous()
    a = (dtf * A.float()).view(Bt, nc, L, H).transpose(2, 3)             # [Bt, c, H, L]
    a_cum = a.cumsum(-1)

    # 1. within each chunk
    scores = torch.exp(_segsum(a)).view(Bt, nc, G, R, L, L)
    scores.mul_((Cc @ Bc.transpose(-1, -2)).unsqueeze(3))              # C_l . B_s, shared by a group's heads
    y = scores.view(Bt, nc, H, L, L) @ xdt                               # [Bt, c, H, L, P]

    # 2. each chunk's contribution to the state at its end: [G, R*P, L] @ [G, L, N]
    xw = xdt * torch.exp(a_cum[..., -1:] - a_cum).unsqueeze(-1)
    xw = xw.view(Bt, nc, G, R, L, P).transpose(-1, -2).reshape(Bt, nc, G, R * P, L)
    chunk_states = (xw @ Bc).view(Bt, nc, H, P, N)

    # 3. recurrence over chunks
    state = x.new_zeros(Bt, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # [Bt, c, H, 1, 1]
    states = torch.empty(Bt, nc, H, P, N, dtype=torch.float32, device=x.device)
    for c in range(nc):
        states[:, c] = state
        state = torch.addcmul(chunk_states[:, c], state, chunk_decay[:, c])

    # 4. the entering state read out through C, decayed to each position
    y_in = Cc @ states.view(Bt, nc, G, R * P, N).transpose(-1, -2)      # [Bt, c, G, L, R*P]
    y_in = y_in.view(Bt, nc, G, L, R, P).permute(0, 1, 2, 4, 3, 5)      # [Bt, c, G, R, L, P]
    y = y.view(Bt, nc, G, R, L, P).addcmul_(y_in, torch.exp(a_cum).view(Bt, nc, G, R, L, 1))
    y = y.view(Bt, nc, H, L, P).transpose(2, 3).reshape(Bt, nc * L, H, P)[:, :T]
    return torch.addcmul(y, D.float()[:, None], xf).to(x.dtype), state


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """`selective_state_update_ref` with the state updated in place in two passes (decay, then
    the rank-one input), B and C applied per group. Same arguments and results."""
    Bt, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    dtf, xf = dt.float(), x.float()
    state.mul_(torch.exp(dtf * A.float())[..., None, None])
    grouped = state.view(Bt, G, R * P, N)
    grouped.addcmul_((xf * dtf[..., None]).view(Bt, G, R * P, 1), B.float().view(Bt, G, 1, N))
    # a product and a sum read the state faster than a batched matrix-vector product does on CPU
    y = (grouped * C.float().view(Bt, G, 1, N)).sum(-1).view(Bt, H, P)
    return y.addcmul_(D.float()[:, None], xf).to(x.dtype)


# --- slot-addressed references: states live in pools indexed by slot (the engine's layout) ---

def causal_conv1d_varlen_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_pool: torch.Tensor,
    state_idx: torch.Tensor,
    has_initial_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """Causal conv + SiLU over B sequences packed end to end (prefill); states updated in the pool.

    x: [T, C] (sequence b is x[cu_seqlens[b]:cu_seqlens[b+1]]); weight: [C, K]; bias: [C] or None;
    conv_pool: [S, C, K-1]; state_idx: [B] distinct slots; has_initial_state: [B] bool (continue
    from conv_pool[state_idx[b]], else from zeros); cu_seqlens: [B+1]. Writes each sequence's last
    K-1 inputs (older state included when it is shorter than K-1) to conv_pool[state_idx[b]].
    Returns y [T, C] in x's dtype.
    """
    y = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    for b, slot in enumerate(state_idx.tolist()):
        s, e = bounds[b], bounds[b + 1]
        state = conv_pool[slot:slot + 1] if bool(has_initial_state[b]) else None
        y_b, new_state = causal_conv1d_ref(x[None, s:e], weight, bias, state)
        y[s:e] = y_b[0]
        conv_pool[slot] = new_state[0]
    return y


def causal_conv1d_update_slots_ref(
    x: torch.Tensor, conv_pool: torch.Tensor, state_idx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`causal_conv1d_update_ref` (one token per sequence, decode) on states kept in a pool.

    x: [B, C]; conv_pool: [S, C, K-1], conv_pool[state_idx[b]] shifted in place; state_idx: [B]
    distinct slots; weight: [C, K]; bias: [C] or None. Returns y [B, C] in x's dtype.
    """
    state = conv_pool[state_idx]  # a gathered copy [B, C, K-1]
    y = causal_conv1d_update_ref(x, state, weight, bias)
    conv_pool[state_idx] = state
    return y


def selective_state_update_slots_ref(
    ssm_pool: torch.Tensor,
    state_idx: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    intermediate: torch.Tensor | None = None,
) -> torch.Tensor:
    """L consecutive recurrent SSM steps per sequence (L > 1: speculative tokens) on pooled states.

    ssm_pool: [S, H, P, N] fp32, ssm_pool[state_idx[b]] advanced L steps in place; state_idx: [Bt]
    distinct slots; x: [Bt, L, H, P]; dt: [Bt, L, H] (softplus'd, clamped); A, D: [H];
    B, C: [Bt, L, G, N]; intermediate: [Bt, L, H, P, N] fp32 or None, receives the state after each
    step (intermediate[:, l] = state after token l). Returns y [Bt, L, H, P] in x's dtype.
    """
    state = ssm_pool[state_idx]  # a gathered copy [Bt, H, P, N]
    ys = []
    for l in range(x.shape[1]):
        ys.append(selective_state_update_ref(state, x[:, l], dt[:, l], A, B[:, l], C[:, l], D))
        if intermediate is not None:
            intermediate[:, l] = state
    ssm_pool[state_idx] = state
    return torch.stack(ys, dim=1)
