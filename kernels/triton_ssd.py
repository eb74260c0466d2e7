"""Triton kernels: the Mamba-2 chunked SSD scan over variable-length sequences packed end to end.

Same arguments and results as `kernels.mamba_varlen.ssd_scan_varlen_ref`. The work is split as in
the Mamba-2 paper (Dao & Gu, 2024), section 6, into four kernels over a list of chunks:

  (a) `_chunk_cumsum_kernel`   per chunk and head, the running sum of dt*A          -> dA_cum
  (b) `_chunk_state_kernel`    per chunk and head, its own contribution to the state at its end
  (c) `_state_passing_kernel`  per sequence and head, walk the chunks in order from the initial
                               state: the state entering every chunk, the final state to the pool
  (d) `_chunk_scan_kernel`     per chunk and head, the outputs: intra-chunk (C B^T masked by the
                               segment-sum decay) @ (x*dt) + C @ (entering state, decayed) + D*x

Chunks never cross a sequence boundary: a sequence of length n is cut into ceil(n / chunk_size)
chunks starting at its own first token, the last one possibly short. The chunk list is built with
torch ops on the device (no host synchronisation) and padded to an upper bound on its length;
padding chunks have length 0 and every load/store of theirs is masked off.

All accumulation is in fp32. Matrix products take their operands in x's dtype (fp32 inputs use
exact fp32 products, "ieee", so the interpreter and the GPU agree with the fp32 reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# (a) cumulative sum of dt*A within each chunk
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_cumsum_kernel(
    dt_ptr, A_ptr, dA_cum_ptr,
    chunk_start_ptr, chunk_len_ptr,
    H,
    stride_dt_t, stride_dt_h,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (num_chunks, cdiv(H, BLOCK_H)). dA_cum[c, h, l] = sum_{j<=l} dt[start+j, h] * A[h].

    dA_cum: [num_chunks, H, BLOCK_L] fp32; positions l >= chunk length repeat the last value
    (dt is taken as 0 there), so dA_cum[c, h, BLOCK_L-1] is the whole chunk's decay exponent.
    """
    c = tl.program_id(0)
    pid_h = tl.program_id(1)
    start = tl.load(chunk_start_ptr + c).to(tl.int64)
    length = tl.load(chunk_len_ptr + c)

    offs_l = tl.arange(0, BLOCK_L)                                  # [BLOCK_L]
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)                # [BLOCK_H]
    mask_h = offs_h < H
    mask = (offs_l[:, None] < length) & mask_h[None, :]             # [BLOCK_L, BLOCK_H]

    dt = tl.load(dt_ptr + (start + offs_l[:, None]) * stride_dt_t + offs_h[None, :] * stride_dt_h,
                 mask=mask, other=0.0).to(tl.float32)               # [BLOCK_L, BLOCK_H]
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)  # [BLOCK_H]
    cum = tl.cumsum(dt * A[None, :], axis=0)                        # [BLOCK_L, BLOCK_H]

    out_ptrs = dA_cum_ptr + (c.to(tl.int64) * H + offs_h[None, :]) * BLOCK_L + offs_l[:, None]
    tl.store(out_ptrs, cum, mask=mask_h[None, :])


# --------------------------------------------------------------------------------------------
# (b) each chunk's own contribution to the state at its end
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_state_kernel(
    x_ptr, dt_ptr, B_ptr, dA_cum_ptr, states_ptr,
    chunk_start_ptr, chunk_len_ptr,
    H, P, N, heads_per_group,
    stride_x_t, stride_x_h, stride_x_p,
    stride_dt_t, stride_dt_h,
    stride_B_t, stride_B_g, stride_B_n,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (num_chunks, H).

    states[c, h, p, n] = sum_l x[l, h, p] * dt[l, h] * exp(dA_cum[L-1] - dA_cum[l]) * B[l, g, n]
    over the chunk's tokens l, with g = h // heads_per_group. states: [num_chunks, H, P, N] fp32.
    """
    c = tl.program_id(0)
    h = tl.program_id(1)
    g = h // heads_per_group
    start = tl.load(chunk_start_ptr + c).to(tl.int64)
    length = tl.load(chunk_len_ptr + c)

    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    cum_base = dA_cum_ptr + (c.to(tl.int64) * H + h) * BLOCK_L
    cum_last = tl.load(cum_base + BLOCK_L - 1)                      # scalar: the chunk's total exponent

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)            # [P, N]
    for k0 in range(0, BLOCK_L, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)                         # [BLOCK_K] token in chunk
        mask_k = offs_k < length
        tok = start + offs_k
        x = tl.load(x_ptr + tok[:, None] * stride_x_t + h * stride_x_h + offs_p[None, :] * stride_x_p,
                    mask=mask_k[:, None] & mask_p[None, :], other=0.0)          # [BLOCK_K, P]
        dt = tl.load(dt_ptr + tok * stride_dt_t + h * stride_dt_h, mask=mask_k, other=0.0).to(tl.float32)
        cum = tl.load(cum_base + offs_k)                            # [BLOCK_K]
        w = tl.where(mask_k, dt * tl.exp(cum_last - cum), 0.0)      # [BLOCK_K] decay to chunk end * dt
        xw = (x.to(tl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)          # [BLOCK_K, P]
        Bm = tl.load(B_ptr + tok[:, None] * stride_B_t + g * stride_B_g + offs_n[None, :] * stride_B_n,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)         # [BLOCK_K, N]
        acc = tl.dot(tl.trans(xw), Bm.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PREC)

    out_ptrs = states_ptr + ((c.to(tl.int64) * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=mask_p[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# (c) state passing along each sequence's chunks
# --------------------------------------------------------------------------------------------

@triton.jit
def _state_passing_kernel(
    states_ptr, dA_cum_ptr, pool_ptr,
    seq_chunk_off_ptr, state_idx_ptr, has_init_ptr,
    H, PN, N,
    stride_pool_s, stride_pool_h, stride_pool_p, stride_pool_n,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (Bq, H, cdiv(P*N, BLOCK_S)).

    In place over states [num_chunks, H, P*N] fp32: on entry chunk c's own end-state contribution,
    on exit the state entering chunk c. Sequence b's chunks are seq_chunk_off[b]:seq_chunk_off[b+1];
    it starts from pool[state_idx[b]] (or zeros when not has_init[b]) and its final state is
    written back to pool[state_idx[b]].
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)       # [BLOCK_S] flat (p, n)
    mask = offs < PN
    slot = tl.load(state_idx_ptr + b).to(tl.int64)
    has_init = tl.load(has_init_ptr + b)
    pool_ptrs = (pool_ptr + slot * stride_pool_s + h * stride_pool_h
                 + (offs // N) * stride_pool_p + (offs % N) * stride_pool_n)

    state = tl.load(pool_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_S]
    state = tl.where(has_init != 0, state, 0.0)                     # fresh sequence: zeros (even over NaN)
    c0 = tl.load(seq_chunk_off_ptr + b).to(tl.int64)               # int64 bounds: an int64 loop index
    c1 = tl.load(seq_chunk_off_ptr + b + 1).to(tl.int64)
    for c in range(c0, c1):
        st_ptrs = states_ptr + (c * H + h) * PN + offs
        own = tl.load(st_ptrs, mask=mask, other=0.0)                # chunk c's own contribution
        tl.store(st_ptrs, state, mask=mask)                         # the state entering chunk c
        decay = tl.exp(tl.load(dA_cum_ptr + (c * H + h) * BLOCK_L + BLOCK_L - 1))
        state = state * decay + own
    tl.store(pool_ptrs, state, mask=mask)


# --------------------------------------------------------------------------------------------
# (d) outputs
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_scan_kernel(
    x_ptr, dt_ptr, C_ptr, B_ptr, D_ptr, dA_cum_ptr, states_ptr, out_ptr,
    chunk_start_ptr, chunk_len_ptr,
    H, P, N, heads_per_group,
    stride_x_t, stride_x_h, stride_x_p,
    stride_dt_t, stride_dt_h,
    stride_B_t, stride_B_g, stride_B_n,
    stride_C_t, stride_C_g, stride_C_n,
    stride_o_t, stride_o_h, stride_o_p,
    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (num_chunks, H, BLOCK_L // BLOCK_M): rows m0:m0+BLOCK_M of chunk c, head h.

    y[m] = sum_{k<=m} (C[m] . B[k]) exp(cum[m] - cum[k]) dt[k] x[k]      (intra-chunk)
         + exp(cum[m]) C[m] . S_in                                         (entering state [P, N])
         + D[h] x[m]
    """
    c = tl.program_id(0)
    h = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    g = h // heads_per_group
    start = tl.load(chunk_start_ptr + c).to(tl.int64)
    length = tl.load(chunk_len_ptr + c)
    dot_ty = x_ptr.dtype.element_ty

    offs_m = m0 + tl.arange(0, BLOCK_M)                             # [BLOCK_M] row in chunk
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < length
    mask_p = offs_p < P
    mask_n = offs_n < N
    tok_m = start + offs_m
    cum_base = dA_cum_ptr + (c.to(tl.int64) * H + h) * BLOCK_L
    cum_m = tl.load(cum_base + offs_m)                              # [BLOCK_M]

    Cm = tl.load(C_ptr + tok_m[:, None] * stride_C_t + g * stride_C_g + offs_n[None, :] * stride_C_n,
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0)             # [BLOCK_M, N]

    # the entering state read out through C, decayed to each row: fp32 operands
    s_ptrs = states_ptr + ((c.to(tl.int64) * H + h) * P + offs_p[None, :]) * N + offs_n[:, None]
    S_t = tl.load(s_ptrs, mask=mask_n[:, None] & mask_p[None, :], other=0.0)    # [N, P] = S_in^T
    acc = tl.dot(Cm.to(tl.float32), S_t, input_precision=DOT_PREC)             # [BLOCK_M, P]
    acc = acc * tl.exp(cum_m)[:, None]

    # intra-chunk: only columns k <= m contribute (causal), so stop after the diagonal block
    Cm = Cm.to(dot_ty)
    for k0 in range(0, m0 + BLOCK_M, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)                         # [BLOCK_K] column in chunk
        mask_k = offs_k < length
        tok_k = start + offs_k
        Bk = tl.load(B_ptr + tok_k[:, None] * stride_B_t + g * stride_B_g + offs_n[None, :] * stride_B_n,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)         # [BLOCK_K, N]
        cb = tl.dot(Cm, tl.trans(Bk.to(dot_ty)), input_precision=DOT_PREC)      # [BLOCK_M, BLOCK_K]
        cum_k = tl.load(cum_base + offs_k)                          # [BLOCK_K]
        causal = (offs_m[:, None] >= offs_k[None, :]) & mask_k[None, :]
        decay = tl.exp(tl.where(causal, cum_m[:, None] - cum_k[None, :], float("-inf")))
        dt_k = tl.load(dt_ptr + tok_k * stride_dt_t + h * stride_dt_h, mask=mask_k, other=0.0).to(tl.float32)
        scores = cb * decay * dt_k[None, :]                         # [BLOCK_M, BLOCK_K]
        xk = tl.load(x_ptr + tok_k[:, None] * stride_x_t + h * stride_x_h + offs_p[None, :] * stride_x_p,
                     mask=mask_k[:, None] & mask_p[None, :], other=0.0)         # [BLOCK_K, P]
        acc = tl.dot(scores.to(dot_ty), xk.to(dot_ty), acc, input_precision=DOT_PREC)

    # skip connection
    xm = tl.load(x_ptr + tok_m[:, None] * stride_x_t + h * stride_x_h + offs_p[None, :] * stride_x_p,
                 mask=mask_m[:, None] & mask_p[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, P]
    acc += tl.load(D_ptr + h).to(tl.float32) * xm

    o_ptrs = out_ptr + tok_m[:, None] * stride_o_t + h * stride_o_h + offs_p[None, :] * stride_o_p
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

def build_chunks(cu_seqlens: torch.Tensor, chunk_size: int, total_tokens: int):
    """The chunk list of a packed batch, with torch ops only (no host sync).

    cu_seqlens: [Bq+1] int. Returns (chunk_start [NC] int32, chunk_len [NC] int32,
    seq_chunk_off [Bq+1] int32) where NC = total_tokens // chunk_size + Bq bounds the real chunk
    count: sequence b owns chunks seq_chunk_off[b]:seq_chunk_off[b+1], chunk j of it starting at
    token cu_seqlens[b] + j*chunk_size; entries past seq_chunk_off[-1] are padding of length 0.
    """
    cu = cu_seqlens.to(torch.int64)
    Bq = cu.numel() - 1
    lens = cu[1:] - cu[:-1]                                         # [Bq]
    n_chunks = (lens + chunk_size - 1) // chunk_size                # [Bq]
    seq_chunk_off = torch.zeros(Bq + 1, dtype=torch.int64, device=cu.device)
    seq_chunk_off[1:] = torch.cumsum(n_chunks, 0)
    NC = total_tokens // chunk_size + Bq                            # sum ceil(len/L) <= T//L + Bq
    idx = torch.arange(NC, device=cu.device)                        # [NC]
    seq = torch.searchsorted(seq_chunk_off[1:], idx, right=True).clamp_(max=max(Bq - 1, 0))  # [NC]
    start = cu[seq] + (idx - seq_chunk_off[seq]) * chunk_size
    length = (cu[seq + 1] - start).clamp(0, chunk_size)
    length = torch.where(idx < seq_chunk_off[-1], length, torch.zeros_like(length))
    start = torch.where(length > 0, start, torch.zeros_like(start))
    return start.to(torch.int32), length.to(torch.int32), seq_chunk_off.to(torch.int32)


def ssd_scan_varlen(
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
    out: torch.Tensor | None = None,
    *,
    block_m: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Chunked SSD scan of Bq sequences packed along the token axis (Triton), states in a pool.

    x: [T, H, P]; dt: [T, H] (softplus'd, clamped); A: [H] (negative); B, C: [T, G, N], H a
    multiple of G; D: [H]; cu_seqlens: [Bq+1] int; ssm_pool: [S, H, P, N] fp32;
    state_idx: [Bq] int (distinct slots); has_initial_state: [Bq] bool; out: [T, H, P] or None.
    Returns y [T, H, P] (in `out` if given, else a new tensor of x's dtype); each sequence's final
    state is written into ssm_pool[state_idx[b]]. Any strides for x/dt/B/C/out/ssm_pool; x, B and C
    feed the matrix products in x's dtype (B, C are cast). block_m/block_k tile the chunk (rows,
    columns) in the output and chunk-state kernels; they are clipped to the chunk's block.
    """
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    Bq = cu_seqlens.numel() - 1
    assert H % G == 0 and dt.shape == (T, H) and C.shape == B.shape and B.shape[0] == T
    assert ssm_pool.dtype == torch.float32 and ssm_pool.shape[1:] == (H, P, N)
    assert state_idx.numel() == Bq and has_initial_state.numel() == Bq
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape
    if Bq == 0:
        return out

    dev = x.device
    BLOCK_L = max(16, triton.next_power_of_2(chunk_size))           # chunk block (>= 16 for tl.dot)
    BLOCK_P = max(16, triton.next_power_of_2(P))
    BLOCK_N = max(16, triton.next_power_of_2(N))
    BLOCK_M = min(BLOCK_L, max(16, triton.next_power_of_2(block_m)))
    BLOCK_K = min(BLOCK_L, max(16, triton.next_power_of_2(block_k)))
    DOT_PREC = "ieee" if x.dtype == torch.float32 else "tf32"

    chunk_start, chunk_len, seq_chunk_off = build_chunks(cu_seqlens, chunk_size, T)
    NC = chunk_start.numel()
    A = A.contiguous()
    D = D.contiguous()
    state_idx = state_idx.to(device=dev, dtype=torch.int64).contiguous()
    has_init = has_initial_state.to(device=dev, dtype=torch.int32).contiguous()

    # (a) dA_cum: [NC, H, BLOCK_L] fp32
    dA_cum = torch.empty(NC, H, BLOCK_L, device=dev, dtype=torch.float32)
    BLOCK_H = min(16, triton.next_power_of_2(H))
    _chunk_cumsum_kernel[(NC, triton.cdiv(H, BLOCK_H))](
        dt, A, dA_cum, chunk_start, chunk_len, H, dt.stride(0), dt.stride(1),
        BLOCK_L=BLOCK_L, BLOCK_H=BLOCK_H,
    )

    # (b) states: [NC, H, P, N] fp32, each chunk's own end-state contribution
    states = torch.empty(NC, H, P, N, device=dev, dtype=torch.float32)
    _chunk_state_kernel[(NC, H)](
        x, dt, B, dA_cum, states, chunk_start, chunk_len,
        H, P, N, H // G,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        BLOCK_L=BLOCK_L, BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT_PREC=DOT_PREC,
    )

    # (c) states (in place): the state entering each chunk; final states into the pool
    PN = P * N
    BLOCK_S = min(1024, triton.next_power_of_2(PN))
    _state_passing_kernel[(Bq, H, triton.cdiv(PN, BLOCK_S))](
        states, dA_cum, ssm_pool, seq_chunk_off, state_idx, has_init,
        H, PN, N,
        ssm_pool.stride(0), ssm_pool.stride(1), ssm_pool.stride(2), ssm_pool.stride(3),
        BLOCK_L=BLOCK_L, BLOCK_S=BLOCK_S,
    )

    # (d) y
    _chunk_scan_kernel[(NC, H, BLOCK_L // BLOCK_M)](
        x, dt, C, B, D, dA_cum, states, out, chunk_start, chunk_len,
        H, P, N, H // G,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_L=BLOCK_L, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        DOT_PREC=DOT_PREC,
    )
    return out
