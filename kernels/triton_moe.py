"""Triton kernels for the routed experts of a (Latent)MoE block: align, grouped GEMM, small-batch GEMV.

The experts are non-gated squared-ReLU MLPs (see `kernels.moe.moe_experts_ref`):
    out[t] = sum_j w[t, j] * down[e_j] @ relu(up[e_j] @ x[t])^2
with up [E, I, Din], down [E, Din, I], topk_ids [T, k], topk_weights [T, k] (fp32).

Two paths, chosen by the number of (token, choice) pairs P = T*k:
  * aligned (prefill, P > SMALL_BATCH_PAIRS): `moe_align` sorts the pairs by expert into blocks of
    `block_m` rows (each expert's group padded to a multiple of block_m), then two launches of one
    grouped GEMM kernel: program (block m, tile n) multiplies the block's gathered activation rows by
    that block's expert weight tile. Up projection fuses relu^2; down projection fuses the routing
    weight.
  * small batch (decode, P <= SMALL_BATCH_PAIRS): a GEMV-style kernel, program (pair, tile n) reads
    the pair's expert weight rows directly: no alignment, no padded rows.
Both write the down projection pair-major ([P, Din], row t*k + j), then a torch sum over k.

Without CUDA these run in Triton's interpreter (TRITON_INTERPRET=1 must be set before this module is
imported), which is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SMALL_BATCH_PAIRS = 64  # at most this many (token, choice) pairs: the GEMV path


# ----------------------------------------------------------------------------------------------
# align: group the pairs by expert
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_pairs"])  # tokens x top-k: a new value every batch
def _moe_count_kernel(ids_ptr, counts_ptr, num_pairs, BLOCK: tl.constexpr):
    # grid (E,): counts[e] = number of flat pairs routed to expert e. ids: [num_pairs]
    expert = tl.program_id(0)
    count = 0
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        count += tl.sum((ids == expert).to(tl.int32), axis=0)
    tl.store(counts_ptr + expert, count)


@triton.jit(do_not_specialize=["num_pairs"])  # tokens x top-k: a new value every batch
def _moe_scatter_kernel(
    ids_ptr,            # [num_pairs] expert of each flat pair
    counts_ptr,         # [E] int32 pairs per expert
    sorted_ids_ptr,     # [capacity] int32, pre-filled with the sentinel num_pairs
    block_experts_ptr,  # [capacity // BLOCK_M] int32, pre-filled with -1
    num_padded_ptr,     # [1] int32
    num_pairs,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # grid (E,): expert e writes its pairs (ascending flat index) at its group's start and tags its blocks
    expert = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)  # [BLOCK_E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BLOCK_E]
    group_start = tl.sum(tl.where(offs_e < expert, padded, 0), axis=0)
    group_blocks = tl.sum(tl.where(offs_e == expert, padded, 0), axis=0) // BLOCK_M
    tl.store(num_padded_ptr, tl.sum(padded, axis=0), mask=expert == 0)

    seen = 0  # pairs of this expert already placed
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        hit = (ids == expert).to(tl.int32)  # [BLOCK]
        rank = seen + tl.cumsum(hit, axis=0) - 1  # position within the expert's group
        tl.store(sorted_ids_ptr + group_start + rank, offs.to(tl.int32), mask=hit != 0)
        seen += tl.sum(hit, axis=0)

    first_block = group_start // BLOCK_M
    for b in range(0, group_blocks, BLOCK):
        offs_b = b + tl.arange(0, BLOCK)
        tl.store(block_experts_ptr + first_block + offs_b, tl.full([BLOCK], 0, tl.int32) + expert,
                 mask=offs_b < group_blocks)


def align_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static length of `sorted_ids`: num_pairs + E*(block_m-1), rounded up to a multiple of block_m."""
    return triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of `kernels.moe.moe_align_ref`, with identical outputs.

    topk_ids: [T, k] (any int dtype). Returns sorted_ids [capacity] int32 (flat pair indices grouped
    by expert, ascending within an expert; padding = T*k), block_experts [capacity // block_m] int32
    (-1 for unused blocks) and num_padded [1] int32 (used length, left on the device: no host sync).
    """
    T, k = topk_ids.shape
    num_pairs, device = T * k, topk_ids.device
    capacity = align_capacity(num_pairs, num_experts, block_m)
    ids = topk_ids.reshape(-1).contiguous()  # [P]
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    block_experts = torch.full((capacity // block_m,), -1, dtype=torch.int32, device=device)
    num_padded = torch.zeros(1, dtype=torch.int32, device=device)
    if num_experts == 0:
        return sorted_ids, block_experts, num_padded
    block = min(1024, triton.next_power_of_2(max(num_pairs, 16)))
    _moe_count_kernel[(num_experts,)](ids, counts, num_pairs, BLOCK=block)
    _moe_scatter_kernel[(num_experts,)](
        ids, counts, sorted_ids, block_experts, num_padded, num_pairs, num_experts,
        BLOCK_M=block_m, BLOCK=block, BLOCK_E=triton.next_power_of_2(num_experts),
    )
    return sorted_ids, block_experts, num_padded


# ----------------------------------------------------------------------------------------------
# grouped GEMM over aligned blocks, and the small-batch GEMV
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_pairs"])  # tokens x top-k: a new value every batch
def _grouped_gemm_kernel(
    a_ptr,              # [rows, K] activations; row of pair p = p // A_ROW_DIV
    w_ptr,              # [E, N, K] expert weights
    c_ptr,              # [num_pairs, N] output, pair-major
    sorted_ids_ptr,     # [capacity] int32 pair of each aligned slot (num_pairs = padding)
    block_experts_ptr,  # [capacity // BLOCK_M] int32 expert of each block (-1 = unused)
    routed_w_ptr,       # [num_pairs] fp32 routing weights (read only if MUL_ROUTED_WEIGHT)
    num_pairs, N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    APPLY_RELU2: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, IEEE_FP32: tl.constexpr,
):
    # grid (capacity // BLOCK_M, cdiv(N, BLOCK_N)): c[pair, n-tile] for the block's BLOCK_M pairs
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:  # past the used length
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    row_ok = pairs < num_pairs
    rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk)  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if APPLY_RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if MUL_ROUTED_WEIGHT:
        rw = tl.load(routed_w_ptr + pairs, mask=row_ok, other=0.0)  # [BM]
        acc = acc * rw[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_gemv_kernel(
    a_ptr,          # [rows, K] activations; row of pair p = p // A_ROW_DIV
    w_ptr,          # [E, N, K] expert weights
    c_ptr,          # [num_pairs, N] output, pair-major
    ids_ptr,        # [num_pairs] expert of each pair
    routed_w_ptr,   # [num_pairs] fp32 routing weights (read only if MUL_ROUTED_WEIGHT)
    N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    APPLY_RELU2: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
):
    # grid (num_pairs, cdiv(N, BLOCK_N)): c[pair, n-tile] = w[expert(pair), n-tile, :] @ a[row(pair), :]
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    row = (pair // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = a_ptr + row * stride_am + offs_k * stride_ak  # [BK]
    w_ptrs = (w_ptr + expert * stride_we
              + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk)  # [BN, BK]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[None, :], axis=1)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if APPLY_RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(routed_w_ptr + pair)
    tl.store(c_ptr + pair * stride_cm + offs_n * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=n_ok)


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_experts: torch.Tensor,
    *,
    block_m: int,
    a_row_div: int = 1,
    apply_relu2: bool = False,
    routed_weights: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """out[p] = epilogue(w[expert(p)] @ a[p // a_row_div]) for every pair p placed by `moe_align`.

    a: [rows, K]; w: [E, N, K]; out: [P, N] pair-major (P = number of pairs; its rows for pairs
    never placed are not written); sorted_ids / block_experts from `moe_align(..., block_m)`.
    Epilogue: relu(.)^2 if apply_relu2, then times routed_weights[p] ([P] fp32) if given.
    block_m must be a power of two >= 16 (tl.dot). Accumulates in fp32; returns out.
    """
    P, N = out.shape
    K = a.shape[1]
    assert w.shape[1:] == (N, K) and block_m >= 16
    if block_n is None:
        block_n = 64
    if block_k is None:
        block_k = 64 if a.is_cuda else triton.next_power_of_2(max(min(K, 128), 16))  # interpreter: few trips
    rw = routed_weights if routed_weights is not None else out  # dummy pointer when unused
    grid = (block_experts.numel(), triton.cdiv(N, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, sorted_ids, block_experts, rw, P, N, K,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        A_ROW_DIV=a_row_div, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        APPLY_RELU2=apply_relu2, MUL_ROUTED_WEIGHT=routed_weights is not None,
        IEEE_FP32=a.dtype == torch.float32 and w.dtype == torch.float32,
    )
    return out


def moe_gemv(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    expert_ids: torch.Tensor,
    *,
    a_row_div: int = 1,
    apply_relu2: bool = False,
    routed_weights: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Small-batch path: out[p] = epilogue(w[expert_ids[p]] @ a[p // a_row_div]), no alignment.

    a: [rows, K]; w: [E, N, K]; out: [P, N]; expert_ids: [P] (contiguous, any int dtype);
    routed_weights: [P] fp32 or None. Same epilogue as `grouped_gemm`. Returns out.
    """
    P, N = out.shape
    K = a.shape[1]
    assert w.shape[1:] == (N, K) and expert_ids.numel() == P
    if block_n is None:
        block_n = 32 if a.is_cuda else 64
    if block_k is None:
        block_k = 128 if a.is_cuda else triton.next_power_of_2(max(min(K, 128), 16))
    rw = routed_weights if routed_weights is not None else out
    if P == 0:
        return out
    _moe_gemv_kernel[(P, triton.cdiv(N, block_n))](
        a, w, out, expert_ids, rw, N, K,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        A_ROW_DIV=a_row_div, BLOCK_N=block_n, BLOCK_K=block_k,
        APPLY_RELU2=apply_relu2, MUL_ROUTED_WEIGHT=routed_weights is not None,
    )
    return out


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per aligned block: the mean rows per expert, as a power of two clamped to [16, 64]."""
    mean = triton.cdiv(max(num_pairs, 1), max(num_experts, 1))
    return min(64, max(16, triton.next_power_of_2(mean)))


def moe_experts(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Triton `kernels.moe.moe_experts_ref`: sum over chosen experts of weight * down(relu(up(x))^2).

    x: [T, Din]; up: [E, I, Din]; down: [E, Din, I] (same dtype as x); topk_ids: [T, k] (int);
    topk_weights: [T, k] (cast to fp32); out: [T, Din] in x's dtype, or None to allocate.
    path: "gemv" (small batch, no alignment), "aligned" (moe_align + grouped GEMM) or None to pick
    "gemv" when T*k <= SMALL_BATCH_PAIRS. block_m: aligned block rows (default `default_block_m`).
    The intermediate relu^2 activation [T*k, I] and the weighted per-pair outputs [T*k, Din] are
    kept in x's dtype; products accumulate in fp32 and the sum over k is done in fp32.
    """
    T, k = topk_ids.shape
    E, I, d_in = up.shape
    assert x.shape == (T, d_in) and down.shape == (E, d_in, I)
    if out is None:
        out = torch.empty(T, d_in, dtype=x.dtype, device=x.device)
    P = T * k
    if P == 0:
        return out.zero_()
    if path is None:
        path = "gemv" if P <= SMALL_BATCH_PAIRS else "aligned"
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [P]
    h = torch.empty(P, I, dtype=x.dtype, device=x.device)  # relu(up @ x)^2 per pair
    y = torch.empty(P, d_in, dtype=x.dtype, device=x.device)  # weighted down projection per pair
    if path == "gemv":
        ids = topk_ids.reshape(-1).contiguous()  # [P]
        moe_gemv(x, up, h, ids, a_row_div=k, apply_relu2=True)
        moe_gemv(h, down, y, ids, routed_weights=weights)
    elif path == "aligned":
        bm = block_m or default_block_m(P, E)
        sorted_ids, block_experts, _ = moe_align(topk_ids, E, bm)
        grouped_gemm(x, up, h, sorted_ids, block_experts, block_m=bm, a_row_div=k, apply_relu2=True)
        grouped_gemm(h, down, y, sorted_ids, block_experts, block_m=bm, routed_weights=weights)
    else:
        raise ValueError(f"path must be 'gemv', 'aligned' or None, not {path!r}")
    out.copy_(y.view(T, k, d_in).sum(1, dtype=torch.float32))  # [T, Din]
    return out


def moe_forward(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_up: torch.Tensor,
    shared_down: torch.Tensor,
    latent_in_w: torch.Tensor | None = None,
    latent_in_b: torch.Tensor | None = None,
    latent_out_w: torch.Tensor | None = None,
    latent_out_b: torch.Tensor | None = None,
    *,
    shared_up_b: torch.Tensor | None = None,
    shared_down_b: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """Triton `kernels.moe.moe_forward_ref` (same arguments; `path` is passed to `moe_experts`).

    x: [T, hidden]; up: [E, I, L]; down: [E, L, I]; topk_ids/topk_weights: [T, k];
    shared_up: [S, hidden]; shared_down: [hidden, S]; latent_in_w: [L, hidden] (+ bias [L]);
    latent_out_w: [hidden, L] (+ bias [hidden]). Returns [T, hidden] in x's dtype.
    Routed experts run in the Triton kernels. The latent projections and the shared expert are
    dense matmuls over all tokens, left to torch (cuBLAS), which beats a one-expert grouped GEMM.
    """
    h = x if latent_in_w is None else F.linear(x, latent_in_w, latent_in_b)  # [T, L]
    h = moe_experts(h, up, down, topk_ids, topk_weights, path=path)  # [T, L]
    if latent_out_w is not None:
        h = F.linear(h, latent_out_w, latent_out_b)  # [T, hidden]
    shared = F.linear(torch.relu_(F.linear(x, shared_up, shared_up_b)).square_(), shared_down, shared_down_b)
    return h.add_(shared)
