"""The Triton varlen SSD scan (`kernels.triton_ssd`) against the PyTorch references.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
whose bf16 arithmetic is wrong: fp32 and fp16 are checked here, bf16 only on a GPU. Shapes are
kept small (the interpreter's cost is programs x loop trips).
"""

from __future__ import annotations

import pytest
import torch

from agentrt.kernels.mamba import ssd_scan_ref
from agentrt.kernels.mamba_varlen import ssd_scan_varlen_ref
from agentrt.kernels.triton_ssd import build_chunks, ssd_scan_varlen

UNUSED = 123.0  # unused pool slots hold this; the kernel must leave them alone

# max |error| allowed, relative to the largest |value| of the reference (output or states)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _case(seed, dtype, H, G, P, N, lens, has_init, n_slots, device="cpu"):
    """Random inputs for sequences of `lens` packed end to end; slots a permutation with spares.

    Slots of sequences without an initial state are poisoned with NaN (must be ignored),
    unused slots hold UNUSED (must be untouched).
    """
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    x = torch.randn(T, H, P, generator=g)
    dt = torch.rand(T, H, generator=g) * 0.5 + 0.05                  # softplus'd step sizes
    A = -(torch.rand(H, generator=g) + 0.5)
    B = torch.randn(T, G, N, generator=g)
    C = torch.randn(T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    pool = torch.full((n_slots, H, P, N), UNUSED)
    state_idx = torch.randperm(n_slots, generator=g)[: len(lens)]
    has_init = torch.tensor(has_init, dtype=torch.bool)
    for b, slot in enumerate(state_idx.tolist()):
        pool[slot] = torch.randn(H, P, N, generator=g) if has_init[b] else float("nan")
    d = dict(device=device)
    return dict(
        x=x.to(dtype=dtype, **d), dt=dt.to(dtype=dtype, **d), A=A.to(**d), B=B.to(dtype=dtype, **d),
        C=C.to(dtype=dtype, **d), D=D.to(**d), cu_seqlens=cu.to(**d), ssm_pool=pool.to(**d),
        state_idx=state_idx.to(**d), has_initial_state=has_init.to(**d),
    )


def _run_both(case, chunk_size, **kw):
    """Runs the reference and the kernel (NaN-poisoned `out`) on copies of the pool."""
    pool_ref, pool_tri = case["ssm_pool"].clone(), case["ssm_pool"].clone()
    args = {k: v for k, v in case.items() if k != "ssm_pool"}
    y_ref = ssd_scan_varlen_ref(chunk_size=chunk_size, ssm_pool=pool_ref, **args)
    out = torch.full_like(case["x"], float("nan"))
    y = ssd_scan_varlen(chunk_size=chunk_size, ssm_pool=pool_tri, out=out, **args, **kw)
    assert y.data_ptr() == out.data_ptr() and y.dtype == case["x"].dtype
    return y, y_ref, pool_tri, pool_ref


def _assert_close(got, want, tol, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten?)"
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x scale {scale:.3g}"


def _check(case, chunk_size, **kw):
    y, y_ref, pool, pool_ref = _run_both(case, chunk_size, **kw)
    tol = TOL[case["x"].dtype]
    _assert_close(y, y_ref, tol, "y")
    used = case["state_idx"].long()
    _assert_close(pool[used], pool_ref[used], tol, "final states")
    unused = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    unused[used] = False
    assert (pool[unused] == UNUSED).all(), "unused pool slots were written"
    assert unused.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("H,G", [(2, 1), (4, 2)])
@pytest.mark.parametrize("chunk_size,N", [(16, 16), (32, 32)])
def test_varlen_matches_reference(dtype, H, G, chunk_size, N):
    # lengths: 1, an exact chunk multiple, a non-multiple spanning 3 chunks, a short one
    L = chunk_size
    lens = [1, 2 * L, 2 * L + 7, 5]
    case = _case(seed=H * 100 + G * 10 + L, dtype=dtype, H=H, G=G, P=16, N=N, lens=lens,
                 has_init=[True, False, True, False], n_slots=7)
    _check(case, chunk_size)


def test_varlen_small_tiles():
    """Several row and column tiles per chunk (block 16 in a chunk of 32): the causal tile loop."""
    case = _case(seed=7, dtype=torch.float32, H=2, G=1, P=16, N=32, lens=[45, 32, 3],
                 has_init=[False, True, True], n_slots=5)
    _check(case, 32, block_m=16, block_k=16)


def test_varlen_odd_chunk_size_and_empty_sequence():
    """A chunk size that is not a power of two; a zero-length sequence (its slot gets its initial
    state, or zeros); the sequences all fresh or all continued."""
    case = _case(seed=11, dtype=torch.float32, H=2, G=2, P=16, N=16, lens=[30, 0, 24, 0, 9],
                 has_init=[True, True, False, False, True], n_slots=6)
    _check(case, 24)
    y, _, pool, _ = _run_both(case, 24)
    slots = case["state_idx"].tolist()
    assert torch.equal(pool[slots[1]], case["ssm_pool"][slots[1]])   # empty, continued: unchanged
    assert (pool[slots[3]] == 0).all()                                  # empty, fresh: zeros


def test_matches_equal_length_reference():
    """Equal-length sequences: the same as `ssd_scan_ref` on the batch directly."""
    g = torch.Generator().manual_seed(3)
    Bt, T, H, G, P, N, L = 2, 40, 4, 2, 16, 16, 16
    x = torch.randn(Bt, T, H, P, generator=g)
    dt = torch.rand(Bt, T, H, generator=g) * 0.5 + 0.05
    A = -(torch.rand(H, generator=g) + 0.5)
    B, C = torch.randn(Bt, T, G, N, generator=g), torch.randn(Bt, T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    init = torch.randn(Bt, H, P, N, generator=g)
    y_ref, final_ref = ssd_scan_ref(x, dt, A, B, C, D, L, init)

    pool = torch.full((3, H, P, N), UNUSED)
    pool[2], pool[0] = init[0], init[1]
    y = ssd_scan_varlen(
        x.reshape(Bt * T, H, P), dt.reshape(Bt * T, H), A, B.reshape(Bt * T, G, N),
        C.reshape(Bt * T, G, N), D, L, torch.tensor([0, T, 2 * T], dtype=torch.int32), pool,
        torch.tensor([2, 0]), torch.tensor([True, True]), out=torch.full((Bt * T, H, P), float("nan")),
    )
    _assert_close(y.view(Bt, T, H, P), y_ref, 1e-5, "y")
    _assert_close(pool[[2, 0]], final_ref, 1e-5, "final states")
    assert (pool[1] == UNUSED).all()


def test_continuation_equals_whole_sequence():
    """Scanning a prefix, then the rest from the pooled state, equals one scan of the whole
    (chunk boundaries differ between the two, the result must not)."""
    case = _case(seed=5, dtype=torch.float32, H=2, G=1, P=16, N=16, lens=[50], has_init=[True], n_slots=2)
    whole_pool = case["ssm_pool"].clone()
    args = {k: v for k, v in case.items() if k not in ("ssm_pool", "cu_seqlens", "x", "dt", "B", "C")}
    y_whole = ssd_scan_varlen(case["x"], case["dt"], B=case["B"], C=case["C"], chunk_size=16,
                              cu_seqlens=case["cu_seqlens"], ssm_pool=whole_pool, **args)
    pool = case["ssm_pool"].clone()
    ys = []
    for s, e in [(0, 21), (21, 50)]:
        ys.append(ssd_scan_varlen(case["x"][s:e], case["dt"][s:e], B=case["B"][s:e], C=case["C"][s:e],
                                  chunk_size=16, cu_seqlens=torch.tensor([0, e - s], dtype=torch.int32),
                                  ssm_pool=pool, **args))
    _assert_close(torch.cat(ys), y_whole, 1e-5, "y")
    slot = case["state_idx"]
    _assert_close(pool[slot], whole_pool[slot], 1e-5, "states")


def test_strided_inputs():
    """x, B, C as column slices of wider projections (as they come out of the in-projection)."""
    case = _case(seed=9, dtype=torch.float32, H=2, G=1, P=16, N=16, lens=[20, 13],
                 has_init=[False, True], n_slots=3)
    x, B, C = case["x"], case["B"], case["C"]
    T = x.shape[0]
    wide = torch.randn(T, 2 * 16 + 16 + 16)  # [x | B | C]
    wide[:, :32] = x.reshape(T, 32)
    wide[:, 32:48] = B.reshape(T, 16)
    wide[:, 48:64] = C.reshape(T, 16)
    strided = dict(case, x=wide[:, :32].view(T, 2, 16), B=wide[:, 32:48].view(T, 1, 16),
                   C=wide[:, 48:64].view(T, 1, 16))
    assert not strided["x"].is_contiguous()
    _check(strided, 16)


def test_build_chunks():
    cu = torch.tensor([0, 1, 33, 33, 40], dtype=torch.int32)         # lengths 1, 32, 0, 7
    start, length, off = build_chunks(cu, 16, 40)
    assert off.tolist() == [0, 1, 3, 3, 4]
    assert start[:4].tolist() == [0, 1, 17, 33] and length[:4].tolist() == [1, 16, 16, 7]
    assert len(start) == 40 // 16 + 4 and (length[4:] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter's bf16 is wrong)")
@pytest.mark.parametrize("chunk_size", [64, 128])
def test_varlen_bf16_gpu(chunk_size):
    L = chunk_size
    case = _case(seed=1, dtype=torch.bfloat16, H=8, G=2, P=64, N=128, lens=[1, L, 3 * L + 17, 200, 5],
                 has_init=[True, False, True, True, False], n_slots=9, device="cuda")
    _check(case, chunk_size)
