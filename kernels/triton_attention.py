"""Triton kernels for attention over the paged KV pools (page size 1: one slot per token).

- `write_kv`: scatter the K/V of new tokens into their pool slots.
- `paged_attention`: varlen causal GQA flash attention (online softmax, fp32 accumulation) that
  gathers each key block's K/V rows from the pools through the sequence's slot table. The G query
  heads sharing a KV head are folded into the rows of one query block, so each K/V tile is read once
  per KV head. Long contexts can be split over several programs (split-K, for decode), whose partial
  results are merged by a small reduce kernel.

Same semantics as `write_kv_ref` / `paged_attention_ref` in kernels/attention.py. This module imports
triton and is only imported on the GPU path (and by tests, under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NUM_SMS_DEFAULT = 132     # H100; replaced by the real SM count on CUDA devices
_MIN_KEYS_PER_SPLIT = 256  # don't split a context into parts shorter than this
_MAX_SPLITS = 32


# ---------------------------------------------------------------------------------------------------------------------
# write_kv
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _write_kv_kernel(
    k_pool_ptr, v_pool_ptr,     # [S, Hkv, D]
    k_ptr, v_ptr,               # [T, Hkv, D]
    slots_ptr,                  # [T]
    stride_ps, stride_ph,       # pool strides (k and v pools alike); head_dim stride is 1
    stride_kt, stride_kh,       # k strides
    stride_vt, stride_vh,       # v strides
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, D)[None, :]        # [1, D]
    mask = h < HKV
    pool_off = slot * stride_ps + h * stride_ph + d
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_pool_ptr + pool_off, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(v_pool_ptr + pool_off, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store the K/V of T new tokens in the pools, in place: k_pool[slots[t]] = k[t], v likewise.

    k_pool, v_pool: [S, Hkv, D] with the same strides; k, v: [T, Hkv, D] (any token/head strides);
    slots: [T] int32/int64, distinct, in [0, S). Last dim of every tensor must be contiguous;
    D a power of two.
    """
    T, Hkv, D = k.shape
    assert v.shape == k.shape and k_pool.shape[1:] == (Hkv, D) and v_pool.shape == k_pool.shape
    assert k_pool.stride() == v_pool.stride(), "k_pool and v_pool must share strides"
    _check_head_dim(D)
    for x in (k_pool, v_pool, k, v):
        assert x.stride(-1) == 1, "the head_dim axis must be contiguous"
    assert slots.shape == (T,)
    if T == 0:
        return
    _write_kv_kernel[(T,)](
        k_pool, v_pool, k, v, slots,
        k_pool.stride(0), k_pool.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HKV=Hkv, D=D, BLOCK_H=triton.next_power_of_2(Hkv),
    )


# ---------------------------------------------------------------------------------------------------------------------
# paged_attention
# ---------------------------------------------------------------------------------------------------------------------

# Ints that change with every batch (the sequence count, the slot table's width, the split strides
# that scale with T) are not specialized on: each specialization is another compile mid-serving.
@triton.jit(do_not_specialize=["B", "stride_st", "stride_os", "stride_ls"])
def _paged_attention_kernel(
    q_ptr,                      # [T, Hq, D]
    k_pool_ptr, v_pool_ptr,     # [S, Hkv, D]
    cu_seqlens_ptr,             # [B+1] int32
    slot_table_ptr,             # [B, W] int32
    ctx_lens_ptr,               # [B] int32
    o_ptr,                      # [NUM_SPLITS, T, Hq, D] (split stride 0 when not split: the output itself)
    lse_ptr,                    # [NUM_SPLITS, T, Hq] fp32, log2-sum-exp2 of scaled scores (STORE_LSE only)
    qk_scale,                   # softmax scale * log2(e): scores are kept in base 2
    B,
    stride_qt, stride_qh,
    stride_ps, stride_ph,       # pool strides (k and v pools alike)
    stride_st,                  # slot_table row stride
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,       # lse strides; head stride is 1
    G: tl.constexpr,            # query heads per KV head, Hq // Hkv
    G_PAD: tl.constexpr,        # next power of two >= G
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,      # rows of a query block: BLOCK_Q tokens x G_PAD heads
    BLOCK_N: tl.constexpr,      # keys per inner-loop step
    BLOCK_B: tl.constexpr,      # a power of two >= B (at least 16: fewer compiles)
    NUM_SPLITS: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, None (the default) otherwise
):
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PAD  # query tokens per block
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence and which of its query blocks this program handles. Sequence b owns programs
    # [start_b, start_{b+1}) with start_b = cu[b] // BLOCK_Q + b, at least ceil(n_b / BLOCK_Q) of them
    # (exactly n_b when BLOCK_Q == 1, where the "+ b" slack is dropped); start_b is non-decreasing, so
    # b is the last sequence with start_b <= pid. Surplus programs exit.
    bs = tl.arange(0, BLOCK_B)
    cu = tl.load(cu_seqlens_ptr + bs, mask=bs < B, other=0)
    if BLOCK_Q == 1:
        starts = cu
    else:
        starts = cu // BLOCK_Q + bs
    b = tl.sum(((starts <= pid) & (bs < B)).to(tl.int32), axis=0) - 1
    q_begin = tl.load(cu_seqlens_ptr + b)
    n_q = tl.load(cu_seqlens_ptr + b + 1) - q_begin
    if BLOCK_Q == 1:
        q_block = pid - q_begin
    else:
        q_block = pid - (q_begin // BLOCK_Q + b)
    tok0 = q_block * BLOCK_Q
    if tok0 >= n_q:
        return
    ctx = tl.load(ctx_lens_ptr + b)

    # Rows: token r // G_PAD of the block, query head kvh * G + r % G_PAD; rows with g >= G are padding.
    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // G_PAD
    g = rows % G_PAD
    row_valid = (tok < n_q) & (g < G)
    head = kvh * G + g
    q_pos = ctx - n_q + tok  # [BLOCK_M] position of each row's query in its sequence
    d = tl.arange(0, D)
    q_rows = (q_begin + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]

    # Keys this block needs: positions [0, kv_end); this split takes whole BLOCK_N blocks of them.
    kv_end = ctx - n_q + tl.minimum(tok0 + BLOCK_Q, n_q)
    blocks_per_split = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), NUM_SPLITS)
    kv_lo = split * blocks_per_split * BLOCK_N
    kv_hi = tl.minimum(kv_lo + blocks_per_split * BLOCK_N, kv_end)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max (finite, so fully masked rows stay NaN-free)
    l_i = tl.zeros([BLOCK_M], tl.float32)           # running sum of exp2
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    slot_row = slot_table_ptr + b.to(tl.int64) * stride_st
    for start in range(kv_lo, kv_hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_valid = k_pos < kv_hi
        slot = tl.load(slot_row + k_pos, mask=k_valid, other=0).to(tl.int64)
        kv_off = slot[:, None] * stride_ps + kvh * stride_ph + d[None, :]  # [BLOCK_N, D]
        k = tl.load(k_pool_ptr + kv_off, mask=k_valid[:, None], other=0.0)
        v = tl.load(v_pool_ptr + kv_off, mask=k_valid[:, None], other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Rows that saw no key in this split (only possible when split) get out 0 and lse -inf.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = split.to(tl.int64) * stride_os + q_rows * stride_ot + head * stride_oh
    tl.store(o_ptr + o_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None])
    if STORE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + q_rows * stride_lt + head, lse, mask=row_valid)


@triton.jit(do_not_specialize=["stride_ps", "stride_ls"])
def _merge_splits_kernel(
    part_ptr,                   # [NUM_SPLITS, T, Hq, D] fp32, each split's normalized output
    lse_ptr,                    # [NUM_SPLITS, T, Hq] fp32, base-2 log-sum-exp of each split
    o_ptr,                      # [T, Hq, D]
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    stride_ot, stride_oh,
    D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    lse = tl.load(lse_ptr + sp * stride_ls + t * stride_lt + h, mask=sp < NUM_SPLITS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # [BLOCK_S]; split 0 always holds key 0, so the max is finite
    part = tl.load(part_ptr + sp[:, None] * stride_ps + t * stride_pt + h * stride_ph + d[None, :],
                   mask=(w > 0)[:, None], other=0.0)  # [BLOCK_S, D]
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def _check_head_dim(D: int) -> None:
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS_DEFAULT


def choose_num_splits(num_programs: int, max_ctx: int, num_sms: int) -> int:
    """Splits per query block so that num_programs * splits roughly fills the GPU twice over, without
    cutting a context of max_ctx keys into parts shorter than _MIN_KEYS_PER_SPLIT; a power of two.

    NUM_SPLITS is a compile-time constant and max_ctx grows with every decoded token: any integer
    here meant a fresh compile every few hundred tokens (on an H100 Triton's compiles were a third
    of an agent workload's engine time), powers of two mean six kernels in all."""
    want = triton.cdiv(2 * num_sms, max(num_programs, 1))
    by_len = triton.cdiv(max_ctx, _MIN_KEYS_PER_SPLIT)
    n = max(1, min(want, by_len, _MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    slot_table: torch.Tensor, ctx_lens: torch.Tensor, scale: float, *,
                    out: torch.Tensor | None = None, num_splits: int | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """Causal GQA of a varlen batch of B sequences over K/V gathered from the paged pools.

    q: [T, Hq, D], the new tokens of all sequences end to end; k_pool, v_pool: [S, Hkv, D], same
    strides; cu_seqlens_q: [B+1] int32, sequence b's queries are q[cu[b]:cu[b+1]] (n_b of them);
    slot_table: [B, W] int32, the pool slot of each position (entries at positions >= ctx_lens[b]
    are never read); ctx_lens: [B] int32, keys of sequence b (cached prefix + its n_b new tokens,
    already in the pools), with n_b <= ctx_lens[b] <= W. Query j of sequence b sits at position
    ctx_lens[b] - n_b + j and sees keys 0..that position. Softmax in fp32 (online, base 2).

    out: optional [T, Hq, D] to write into (any dtype; head_dim axis contiguous).
    num_splits: key-range splits per query block (split-K); None picks one from B * Hkv and W
        (W stands in for the longest context, so the choice needs no device-to-host sync).
    block_n: keys per inner step (power of two >= 16); None picks 64.
    Returns out, [T, Hq, D] in q's dtype unless `out` was given. D must be a power of two >= 16.
    """
    T, Hq, D = q.shape
    S, Hkv, Dk = k_pool.shape
    B = ctx_lens.shape[0]
    _check_head_dim(D)
    assert Dk == D and v_pool.shape == k_pool.shape and k_pool.stride() == v_pool.stride()
    assert Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})"
    assert cu_seqlens_q.shape == (B + 1,) and slot_table.shape[0] == B and slot_table.stride(1) == 1
    for x in (q, k_pool, v_pool):
        assert x.stride(-1) == 1, "the head_dim axis must be contiguous"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if T == 0 or B == 0:
        return out

    G = Hq // Hkv
    G_PAD = triton.next_power_of_2(G)
    # Decode batches (one query per sequence: T == B) get one token per block; prefill packs more.
    block_m = max(16, G_PAD) if T == B else max(64, G_PAD)
    block_q = block_m // G_PAD
    block_n = block_n or 64
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n must be a power of two >= 16"
    num_q_programs = T if block_q == 1 else T // block_q + B
    if num_splits is None:
        num_splits = choose_num_splits(num_q_programs * Hkv, slot_table.shape[1], _num_sms(q.device))
    assert num_splits >= 1

    if num_splits == 1:
        dest, lse = out, out.new_empty(0, dtype=torch.float32)  # lse unused
        dest_strides, lse_strides = (0, out.stride(0), out.stride(1)), (0, 0)
    else:
        dest = torch.empty(num_splits, T, Hq, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_splits, T, Hq, device=q.device, dtype=torch.float32)
        dest_strides, lse_strides = dest.stride()[:3], lse.stride()[:2]

    LOG2E = 1.4426950408889634
    grid = (num_q_programs, Hkv, num_splits)
    _paged_attention_kernel[grid](
        q, k_pool, v_pool, cu_seqlens_q, slot_table, ctx_lens, dest, lse,
        scale * LOG2E, B,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), slot_table.stride(0),
        *dest_strides, *lse_strides,
        G=G, G_PAD=G_PAD, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=max(16, triton.next_power_of_2(B)),
        NUM_SPLITS=num_splits, STORE_LSE=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # no TF32 for fp32 inputs
    )
    if num_splits > 1:
        _merge_splits_kernel[(T, Hq)](
            dest, lse, out, *dest.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1),
            D=D, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        )
    return out
