"""Triton kernels of the Mamba-2 layer on the engine's slot-addressed state pools.

Each public function has the signature of its `*_ref` oracle in `kernels/mamba.py` plus an
optional `out=` (the result is written there and returned). All arithmetic is fp32; results are
cast to the output's dtype. States live in pools indexed by slot: `conv_pool` [S, C, K-1] (model
dtype) and `ssm_pool` [S, H, P, N] fp32; `state_idx` gives each sequence's slot, and the slots of
one call must be distinct (two sequences sharing a slot would race). Slots not named are untouched.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1 must be set before this
module is imported), which is how the tests check them on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# selective state update: L recurrent steps per sequence, state read and written once
# ---------------------------------------------------------------------------------------------

@triton.jit
def _selective_state_update_slots_kernel(
    pool_ptr, idx_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, inter_ptr,
    L, P, N, heads_per_group,
    s_pool_s, s_pool_h, s_pool_p, s_pool_n,          # ssm_pool [S, H, P, N]
    s_x_b, s_x_l, s_x_h, s_x_p,                      # x [Bt, L, H, P]
    s_dt_b, s_dt_l, s_dt_h,                          # dt [Bt, L, H]
    s_B_b, s_B_l, s_B_g, s_B_n,                      # B [Bt, L, G, N]
    s_C_b, s_C_l, s_C_g, s_C_n,                      # C [Bt, L, G, N]
    s_y_b, s_y_l, s_y_h, s_y_p,                      # y [Bt, L, H, P]
    s_i_b, s_i_l, s_i_h, s_i_p, s_i_n,               # intermediate [Bt, L, H, P, N]
    HAS_INTER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)   # sequence
    h = tl.program_id(1)   # head
    pb = tl.program_id(2)  # block of head_dim rows
    g = h // heads_per_group

    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_n = tl.arange(0, BLOCK_N)                 # [BLOCK_N]
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]    # [BLOCK_P, BLOCK_N]

    # the state tile [BLOCK_P, BLOCK_N] of this (slot, head), kept in registers across the L steps
    slot = tl.load(idx_ptr + b).to(tl.int64)
    state_ptrs = (pool_ptr + slot * s_pool_s + h * s_pool_h
                  + offs_p[:, None] * s_pool_p + offs_n[None, :] * s_pool_n)
    state = tl.load(state_ptrs, mask=mask_pn, other=0.0).to(tl.float32)

    A = tl.load(A_ptr + h).to(tl.float32)
    D = tl.load(D_ptr + h).to(tl.float32)
    b64 = b.to(tl.int64)
    for l in range(L):
        dt = tl.load(dt_ptr + b64 * s_dt_b + l * s_dt_l + h * s_dt_h).to(tl.float32)
        x = tl.load(x_ptr + b64 * s_x_b + l * s_x_l + h * s_x_h + offs_p * s_x_p,
                    mask=mask_p, other=0.0).to(tl.float32)                        # [BLOCK_P]
        Bv = tl.load(B_ptr + b64 * s_B_b + l * s_B_l + g * s_B_g + offs_n * s_B_n,
                     mask=mask_n, other=0.0).to(tl.float32)                       # [BLOCK_N]
        Cv = tl.load(C_ptr + b64 * s_C_b + l * s_C_l + g * s_C_g + offs_n * s_C_n,
                     mask=mask_n, other=0.0).to(tl.float32)                       # [BLOCK_N]

        # h_t = exp(dt * A) * h_{t-1} + (dt * x) B^T ;  y_t = h_t C + D x
        decay = tl.exp(dt * A)
        state = state * decay + (dt * x)[:, None] * Bv[None, :]
        y = tl.sum(state * Cv[None, :], axis=1) + D * x                           # [BLOCK_P]
        tl.store(y_ptr + b64 * s_y_b + l * s_y_l + h * s_y_h + offs_p * s_y_p,
                 y.to(y_ptr.dtype.element_ty), mask=mask_p)
        if HAS_INTER:
            inter_ptrs = (inter_ptr + b64 * s_i_b + l * s_i_l + h * s_i_h
                          + offs_p[:, None] * s_i_p + offs_n[None, :] * s_i_n)
            tl.store(inter_ptrs, state.to(inter_ptr.dtype.element_ty), mask=mask_pn)

    tl.store(state_ptrs, state.to(pool_ptr.dtype.element_ty), mask=mask_pn)


def selective_state_update_slots(
    ssm_pool: torch.Tensor,
    state_idx: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    intermediate: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """L consecutive SSM steps per sequence on pooled states (decode, or speculative verification).

    ssm_pool: [S, H, P, N] fp32, ssm_pool[state_idx[b]] advanced L steps in place; state_idx: [Bt]
    distinct slots (int32/int64); x: [Bt, L, H, P]; dt: [Bt, L, H] (softplus'd, clamped);
    A, D: [H]; B, C: [Bt, L, G, N]; intermediate: [Bt, L, H, P, N] fp32 or None (receives the
    state after each step). out: [Bt, L, H, P] or None. Returns y [Bt, L, H, P] in x's dtype
    (out's when given). Each state tile is read once and written once per call.
    """
    Bt, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    assert H % G == 0 and ssm_pool.shape[1:] == (H, P, N)
    A, D = A.contiguous(), D.contiguous()
    if out is None:
        out = torch.empty_like(x)
    if Bt == 0 or L == 0:
        return out
    has_inter = intermediate is not None
    inter = intermediate if has_inter else out  # a placeholder pointer, never touched
    inter_strides = intermediate.stride() if has_inter else (0, 0, 0, 0, 0)
    BLOCK_P = min(16, triton.next_power_of_2(P))
    BLOCK_N = triton.next_power_of_2(N)
    grid = (Bt, H, triton.cdiv(P, BLOCK_P))
    _selective_state_update_slots_kernel[grid](
        ssm_pool, state_idx, x, dt, A, B, C, D, out, inter,
        L, P, N, H // G,
        *ssm_pool.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *out.stride(),
        *inter_strides,
        HAS_INTER=has_inter, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )
    return out


# ---------------------------------------------------------------------------------------------
# causal depthwise conv + SiLU: varlen prefill, and one-token decode
# ---------------------------------------------------------------------------------------------

@triton.jit
def _causal_conv1d_varlen_kernel(
    x_ptr, w_ptr, bias_ptr, pool_ptr, idx_ptr, init_ptr, cu_ptr, y_ptr,
    C,
    s_x_t, s_x_c,                  # x [T, C]
    s_w_c, s_w_k,                  # weight [C, K]
    s_pool_s, s_pool_c, s_pool_k,  # conv_pool [S, C, K-1]
    s_y_t, s_y_c,                  # y [T, C]
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y[t] = silu(bias + sum_j w[:, j] * in[t - (K-1) + j]), where in[u] for u < 0 is the
    sequence's initial state (or zero). Reads the pool only: the new states are written by
    `_conv_state_varlen_kernel`, launched after this one."""
    b = tl.program_id(0)   # sequence
    cb = tl.program_id(1)  # channel block
    tb = tl.program_id(2)  # token block within the sequence
    start = tl.load(cu_ptr + b).to(tl.int64)
    seqlen = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    if tb * BLOCK_T >= seqlen:
        return

    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] positions within the sequence
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_t = offs_t < seqlen
    mask_c = offs_c < C
    slot = tl.load(idx_ptr + b).to(tl.int64)
    # the earliest readable input position: -(K-1) with an initial state, else 0 (zeros before)
    u_min = -(K - 1) * (tl.load(init_ptr + b) != 0).to(tl.int32)

    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        u = offs_t - (K - 1) + j  # [BLOCK_T] input position; u < 0 lies in the initial state
        in_x = (u >= 0) & mask_t
        xv = tl.load(x_ptr + (start + u)[:, None] * s_x_t + offs_c[None, :] * s_x_c,
                     mask=in_x[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        in_state = (u < 0) & (u >= u_min) & mask_t
        sv = tl.load(pool_ptr + slot * s_pool_s + offs_c[None, :] * s_pool_c + (u + K - 1)[:, None] * s_pool_k,
                     mask=in_state[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_c * s_w_c + j * s_w_k, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_C]
        acc += (xv + sv) * w[None, :]
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + (start + offs_t)[:, None] * s_y_t + offs_c[None, :] * s_y_c,
             y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _conv_state_varlen_kernel(
    x_ptr, pool_ptr, idx_ptr, init_ptr, cu_ptr,
    C,
    s_x_t, s_x_c,                  # x [T, C]
    s_pool_s, s_pool_c, s_pool_k,  # conv_pool [S, C, K-1]
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """new_state[:, i] = in[seqlen - (K-1) + i] for i < K-1: the sequence's last K-1 inputs, the
    older state (or zeros) filling in when the sequence is shorter than K-1."""
    b = tl.program_id(0)
    cb = tl.program_id(1)
    start = tl.load(cu_ptr + b).to(tl.int64)
    seqlen = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    slot = tl.load(idx_ptr + b).to(tl.int64)
    u_min = -(K - 1) * (tl.load(init_ptr + b) != 0).to(tl.int32)  # earliest readable input position

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_k = tl.arange(0, BLOCK_K)                 # [BLOCK_K] position in the state
    mask_c = offs_c < C
    mask_k = offs_k < K - 1
    u = seqlen - (K - 1) + offs_k                  # [BLOCK_K] input position
    in_x = (u >= 0) & mask_k
    xv = tl.load(x_ptr + (start + u)[None, :] * s_x_t + offs_c[:, None] * s_x_c,
                 mask=mask_c[:, None] & in_x[None, :], other=0.0)                      # [BLOCK_C, BLOCK_K]
    in_state = (u < 0) & (u >= u_min) & mask_k
    base = pool_ptr + slot * s_pool_s + offs_c[:, None] * s_pool_c
    sv = tl.load(base + (u + K - 1)[None, :] * s_pool_k,
                 mask=mask_c[:, None] & in_state[None, :], other=0.0)                   # [BLOCK_C, BLOCK_K]
    new = tl.where(in_x[None, :], xv.to(pool_ptr.dtype.element_ty), sv)
    tl.debug_barrier()  # every thread has read the old state before any writes the new one
    tl.store(base + offs_k[None, :] * s_pool_k, new, mask=mask_c[:, None] & mask_k[None, :])


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_pool: torch.Tensor,
    state_idx: torch.Tensor,
    has_initial_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Causal depthwise conv + SiLU over B sequences packed end to end (prefill), pooled states.

    x: [T, C]; weight: [C, K]; bias: [C] or None; conv_pool: [S, C, K-1]; state_idx: [B] distinct
    slots; has_initial_state: [B] bool; cu_seqlens: [B+1] (int32/int64). Sequence b continues from
    conv_pool[state_idx[b]] if has_initial_state[b], else from zeros; its last K-1 inputs are
    written back there afterwards. out: [T, C] or None. max_seqlen: the longest sequence, or None
    to read it from cu_seqlens (a device sync). Returns y [T, C] in x's dtype (out's when given).

    Two launches: the conv (reads the pool), then the state write-back (one program per sequence
    and channel block), so no program overwrites a state another is still reading.
    """
    T, C = x.shape
    K = weight.shape[1]
    Bn = state_idx.shape[0]
    assert conv_pool.shape[1:] == (C, K - 1) and cu_seqlens.shape[0] == Bn + 1
    if out is None:
        out = torch.empty_like(x)
    if Bn == 0:
        return out
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if has_initial_state.dtype == torch.bool:
        has_initial_state = has_initial_state.view(torch.uint8)  # same bytes, a plain integer pointer
    bias_arg = bias.contiguous() if bias is not None else weight  # weight: a placeholder pointer
    BLOCK_C = min(64, triton.next_power_of_2(C))
    if max_seqlen > 0:
        BLOCK_T = min(32, triton.next_power_of_2(max_seqlen))
        grid = (Bn, triton.cdiv(C, BLOCK_C), triton.cdiv(max_seqlen, BLOCK_T))
        _causal_conv1d_varlen_kernel[grid](
            x, weight, bias_arg, conv_pool, state_idx, has_initial_state, cu_seqlens, out,
            C, *x.stride(), *weight.stride(), *conv_pool.stride(), *out.stride(),
            K=K, HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        )
    if K > 1:
        _conv_state_varlen_kernel[(Bn, triton.cdiv(C, BLOCK_C))](
            x, conv_pool, state_idx, has_initial_state, cu_seqlens,
            C, *x.stride(), *conv_pool.stride(),
            K=K, BLOCK_K=triton.next_power_of_2(K - 1), BLOCK_C=BLOCK_C,
        )
    return out


@triton.jit
def _causal_conv1d_update_slots_kernel(
    x_ptr, pool_ptr, idx_ptr, w_ptr, bias_ptr, y_ptr,
    C,
    s_x_b, s_x_c,                  # x [B, C]
    s_pool_s, s_pool_c, s_pool_k,  # conv_pool [S, C, K-1]
    s_w_c, s_w_k,                  # weight [C, K]
    s_y_b, s_y_c,                  # y [B, C]
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)   # sequence
    cb = tl.program_id(1)  # channel block
    slot = tl.load(idx_ptr + b).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    offs_k = tl.arange(0, BLOCK_K)                 # [BLOCK_K] position in the state
    mask_c = offs_c < C
    mask_ck = mask_c[:, None] & (offs_k < K - 1)[None, :]

    base = pool_ptr + slot * s_pool_s + offs_c[:, None] * s_pool_c  # [BLOCK_C, 1]
    state = tl.load(base + offs_k[None, :] * s_pool_k, mask=mask_ck, other=0.0)          # [BLOCK_C, BLOCK_K]
    x = tl.load(x_ptr + b.to(tl.int64) * s_x_b + offs_c * s_x_c, mask=mask_c, other=0.0)  # [BLOCK_C]

    # y = silu(bias + sum_{i<K-1} w[:, i] * state[:, i] + w[:, K-1] * x)
    w_state = tl.load(w_ptr + offs_c[:, None] * s_w_c + offs_k[None, :] * s_w_k, mask=mask_ck, other=0.0)
    w_last = tl.load(w_ptr + offs_c * s_w_c + (K - 1) * s_w_k, mask=mask_c, other=0.0)
    acc = tl.sum(state.to(tl.float32) * w_state.to(tl.float32), axis=1) + x.to(tl.float32) * w_last.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b.to(tl.int64) * s_y_b + offs_c * s_y_c, y.to(y_ptr.dtype.element_ty), mask=mask_c)

    # shift: new_state[:, i] = state[:, i+1] for i < K-2, new_state[:, K-2] = x
    shifted = tl.load(base + (offs_k + 1)[None, :] * s_pool_k,
                      mask=mask_c[:, None] & (offs_k < K - 2)[None, :], other=0.0)
    new = tl.where((offs_k == K - 2)[None, :], x.to(pool_ptr.dtype.element_ty)[:, None], shifted)
    tl.debug_barrier()  # every thread has read the old state before any writes the new one
    tl.store(base + offs_k[None, :] * s_pool_k, new, mask=mask_ck)


def causal_conv1d_update_slots(
    x: torch.Tensor,
    conv_pool: torch.Tensor,
    state_idx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence (decode): conv over [state, x] + SiLU; the pooled state shifts.

    x: [B, C]; conv_pool: [S, C, K-1], conv_pool[state_idx[b]] shifted in place; state_idx: [B]
    distinct slots; weight: [C, K] (K >= 2); bias: [C] or None; out: [B, C] or None.
    Returns y [B, C] in x's dtype (out's when given).
    """
    Bn, C = x.shape
    K = weight.shape[1]
    assert K >= 2 and conv_pool.shape[1:] == (C, K - 1)
    if out is None:
        out = torch.empty_like(x)
    if Bn == 0:
        return out
    BLOCK_C = min(128, triton.next_power_of_2(C))
    bias_arg = bias.contiguous() if bias is not None else weight  # weight: a placeholder pointer
    _causal_conv1d_update_slots_kernel[(Bn, triton.cdiv(C, BLOCK_C))](
        x, conv_pool, state_idx, weight, bias_arg, out,
        C, *x.stride(), *conv_pool.stride(), *weight.stride(), *out.stride(),
        K=K, HAS_BIAS=bias is not None, BLOCK_K=triton.next_power_of_2(K - 1), BLOCK_C=BLOCK_C,
    )
    return out


# ---------------------------------------------------------------------------------------------
# gated RMSNorm
# ---------------------------------------------------------------------------------------------

@triton.jit
def _gated_rmsnorm_kernel(
    x_ptr, gate_ptr, w_ptr, y_ptr,
    group_size, eps,
    s_x_t, s_x_d, s_g_t, s_g_d, s_y_t, s_y_d,  # x, gate, y [T, D]
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # row
    grp = tl.program_id(1)             # group of `group_size` channels
    offs = grp * group_size + tl.arange(0, BLOCK)  # [BLOCK] channels
    mask = tl.arange(0, BLOCK) < group_size
    x = tl.load(x_ptr + t * s_x_t + offs * s_x_d, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + t * s_g_t + offs * s_g_d, mask=mask, other=0.0).to(tl.float32)
    h = x * (g * tl.sigmoid(g))  # masked lanes are 0
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * s_y_t + offs * s_y_d, (w * (h * rstd)).to(y_ptr.dtype.element_ty), mask=mask)


def gated_rmsnorm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm of x * silu(gate), normalised per group of `group_size` channels (fp32 math).

    x, gate: [T, D] with D a multiple of group_size; weight: [D]; out: [T, D] or None.
    Returns [T, D] in gate's dtype (out's when given). One program per (row, group).
    """
    T, D = gate.shape
    assert x.shape == (T, D) and D % group_size == 0
    if out is None:
        out = torch.empty_like(gate)
    if T == 0:
        return out
    _gated_rmsnorm_kernel[(T, D // group_size)](
        x, gate, weight.contiguous(), out, group_size, eps,
        *x.stride(), *gate.stride(), *out.stride(),
        BLOCK=triton.next_power_of_2(group_size),
    )
    return out
