"""The Triton Mamba-2 kernels (kernels/triton_mamba.py) against their `*_ref` oracles.

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), whose bf16
arithmetic is wrong: fp32 and fp16 are checked here on CPU, bf16 only on a GPU. Fresh random
inputs per case; outputs are poisoned with NaN first so an element the kernel fails to write
fails the comparison; pool slots not named by state_idx must come back bit-identical.

The references run in fp32 on the same (already rounded) inputs, so the fp16 tolerances cover
the rounding of the result to fp16 (about one ulp), not the reference's own fp16 arithmetic.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from agentrt.kernels.mamba import (  # noqa: E402
    causal_conv1d_update_slots_ref,
    causal_conv1d_varlen_ref,
    gated_rmsnorm_ref,
    selective_state_update_ref,
    selective_state_update_slots_ref,
)
from agentrt.kernels.triton_mamba import (  # noqa: E402
    causal_conv1d_update_slots,
    causal_conv1d_varlen,
    gated_rmsnorm,
    selective_state_update_slots,
)

TOL = {  # (atol, rtol) of results rounded to the dtype; fp32 states are compared at fp32 tolerance
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def slots(S: int, B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """B distinct slots out of S, in shuffled order (int32), and the S - B slots left unused."""
    perm = torch.randperm(S, generator=g)
    return perm[:B].to(torch.int32), perm[B:]


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# selective_state_update_slots
# ---------------------------------------------------------------------------------------------

def ssu_inputs(Bt, L, H, P, G, N, S, dtype, device, seed):
    g = gen(seed)
    idx, unused = slots(S, Bt, g)
    pool = torch.randn(S, H, P, N, generator=g)
    x = torch.randn(Bt, L, H, P, generator=g).to(dtype)
    dt = F.softplus(torch.randn(Bt, L, H, generator=g) - 1).to(dtype)
    A = -torch.rand(H, generator=g) * 4 - 0.1
    B = torch.randn(Bt, L, G, N, generator=g).to(dtype)
    C = torch.randn(Bt, L, G, N, generator=g).to(dtype)
    D = torch.randn(H, generator=g)
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return (*on(pool, idx, x, dt, A, B, C, D), unused)


def check_ssu(Bt, L, H, P, G, N, dtype, with_intermediate, device, seed):
    S = Bt + 3
    pool, idx, x, dt, A, B, C, D, unused = ssu_inputs(Bt, L, H, P, G, N, S, dtype, device, seed)
    pool_ref, before = pool.cpu().clone(), pool.cpu().clone()
    inter = poisoned((Bt, L, H, P, N), torch.float32, device) if with_intermediate else None
    inter_ref = torch.empty(Bt, L, H, P, N) if with_intermediate else None
    out = poisoned((Bt, L, H, P), dtype, device)

    y = selective_state_update_slots(pool, idx, x, dt, A, B, C, D, inter, out=out)
    f = lambda t: t.float().cpu()  # noqa: E731
    y_ref = selective_state_update_slots_ref(pool_ref, idx.cpu(), f(x), f(dt), f(A), f(B), f(C), f(D), inter_ref)

    assert y is out and y.dtype == dtype
    assert_close(y.cpu(), y_ref, dtype)
    assert_close(pool.cpu(), pool_ref, torch.float32)
    assert not torch.allclose(pool.cpu()[idx.long().cpu()], before[idx.long().cpu()])  # the used slots moved
    assert torch.equal(pool.cpu()[unused], before[unused])
    if with_intermediate:
        assert_close(inter.cpu(), inter_ref, torch.float32)
        assert_close(inter[:, -1].cpu(), pool_ref[idx.long().cpu()], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("with_intermediate", [False, True])
@pytest.mark.parametrize("shape", [
    (3, 4, 16, 2, 16),   # Bt, H, P, G, N: two heads per group
    (2, 2, 24, 1, 12),   # head_dim past one P block with a tail, N not a power of two
])
def test_selective_state_update_slots(dtype, L, with_intermediate, shape):
    Bt, H, P, G, N = shape
    check_ssu(Bt, L, H, P, G, N, dtype, with_intermediate, "cpu", seed=L * 10 + sum(shape) + with_intermediate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selective_state_update_slots_one_step_matches_the_batch_reference(dtype):
    Bt, H, P, G, N = 3, 4, 16, 2, 16
    pool, idx, x, dt, A, B, C, D, _ = ssu_inputs(Bt, 1, H, P, G, N, Bt + 2, dtype, "cpu", seed=7)
    state = pool[idx.long()]  # gathered copy, stepped by the equal-batch reference
    y_ref = selective_state_update_ref(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y = selective_state_update_slots(pool, idx, x, dt, A, B, C, D, out=poisoned((Bt, 1, H, P), dtype, "cpu"))
    assert_close(y[:, 0], y_ref, dtype)
    assert_close(pool[idx.long()], state, torch.float32)


def test_selective_state_update_slots_allocates_its_output_and_takes_int64_slots():
    pool, idx, x, dt, A, B, C, D, _ = ssu_inputs(2, 2, 2, 16, 1, 16, 4, torch.float32, "cpu", seed=3)
    pool_ref = pool.clone()
    y = selective_state_update_slots(pool, idx.long(), x, dt, A, B, C, D)
    y_ref = selective_state_update_slots_ref(pool_ref, idx, x, dt, A, B, C, D)
    assert y.shape == x.shape
    assert_close(y, y_ref, torch.float32)
    assert_close(pool, pool_ref, torch.float32)


# ---------------------------------------------------------------------------------------------
# causal_conv1d_varlen (prefill)
# ---------------------------------------------------------------------------------------------

def check_conv_varlen(seqlens, has_init, C, K, dtype, with_bias, device, seed):
    g = gen(seed)
    Bn, T = len(seqlens), sum(seqlens)
    S = Bn + 2
    idx, unused = slots(S, Bn, g)
    x = torch.randn(T, C, generator=g).to(dtype)
    weight = (torch.randn(C, K, generator=g) * 0.5).to(dtype)
    bias = torch.randn(C, generator=g).to(dtype) if with_bias else None
    pool = torch.randn(S, C, K - 1, generator=g).to(dtype)
    cu = torch.tensor([0] + seqlens).cumsum(0).to(torch.int32)
    init = torch.tensor(has_init, dtype=torch.bool)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    pool_ref = pool.float().clone()  # .float() of fp32 is the same tensor
    y_ref = causal_conv1d_varlen_ref(f(x), f(weight), f(bias), pool_ref, idx, init, cu)

    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    pool, before = on(pool), pool.clone()
    out = poisoned((T, C), dtype, device)
    y = causal_conv1d_varlen(on(x), on(weight), on(bias), pool, on(idx), on(init), on(cu), out=out)

    assert y is out
    assert_close(y.cpu(), y_ref, dtype)
    torch.testing.assert_close(pool.cpu(), pool_ref.to(dtype), atol=0, rtol=0)  # states are copies of inputs
    assert torch.equal(pool.cpu()[unused], before[unused])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("seqlens,has_init", [
    ([5, 1, 2, 40], [True, True, False, False]),  # shorter than K-1 with and without a state; 2 token blocks
    ([3, 0, 2], [False, True, True]),             # an empty sequence keeps its state
])
def test_causal_conv1d_varlen(dtype, with_bias, seqlens, has_init):
    check_conv_varlen(seqlens, has_init, C=100, K=4, dtype=dtype, with_bias=with_bias, device="cpu",
                      seed=sum(seqlens) + with_bias)


def test_causal_conv1d_varlen_matches_a_single_long_conv():
    """Two calls (a prompt split in half) give the same outputs as the whole prompt at once."""
    g = gen(11)
    C, K, T = 36, 4, 13
    x, weight, bias = torch.randn(T, C, generator=g), torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    pool = poisoned((3, C, K - 1), torch.float32, "cpu")
    idx, one = torch.tensor([2], dtype=torch.int32), lambda n: torch.tensor([0, n], dtype=torch.int32)
    y1 = causal_conv1d_varlen(x[:6], weight, bias, pool, idx, torch.tensor([False]), one(6))
    y2 = causal_conv1d_varlen(x[6:], weight, bias, pool, idx, torch.tensor([True]), one(T - 6), max_seqlen=T - 6)
    y_all = causal_conv1d_varlen_ref(x, weight, bias, torch.zeros(1, C, K - 1), torch.tensor([0]),
                                     torch.tensor([False]), one(T))
    assert_close(torch.cat([y1, y2]), y_all, torch.float32)
    torch.testing.assert_close(pool[2], x[-(K - 1):].T)


# ---------------------------------------------------------------------------------------------
# causal_conv1d_update_slots (decode)
# ---------------------------------------------------------------------------------------------

def check_conv_update(Bn, C, K, dtype, with_bias, device, seed):
    g = gen(seed)
    S = Bn + 3
    idx, unused = slots(S, Bn, g)
    x = torch.randn(Bn, C, generator=g).to(dtype)
    weight = (torch.randn(C, K, generator=g) * 0.5).to(dtype)
    bias = torch.randn(C, generator=g).to(dtype) if with_bias else None
    pool = torch.randn(S, C, K - 1, generator=g).to(dtype)
    pool_ref = pool.float().clone()  # .float() of fp32 is the same tensor
    y_ref = causal_conv1d_update_slots_ref(x.float(), pool_ref, idx.long(), weight.float(),
                                           None if bias is None else bias.float())

    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    pool, before = on(pool), pool.clone()
    out = poisoned((Bn, C), dtype, device)
    y = causal_conv1d_update_slots(on(x), pool, on(idx), on(weight), on(bias), out=out)

    assert y is out
    assert_close(y.cpu(), y_ref, dtype)
    torch.testing.assert_close(pool.cpu(), pool_ref.to(dtype), atol=0, rtol=0)
    assert torch.equal(pool.cpu()[unused], before[unused])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("K", [4, 2])
def test_causal_conv1d_update_slots(dtype, with_bias, K):
    check_conv_update(Bn=3, C=200, K=K, dtype=dtype, with_bias=with_bias, device="cpu", seed=K + with_bias)


# ---------------------------------------------------------------------------------------------
# gated_rmsnorm
# ---------------------------------------------------------------------------------------------

def check_gated_rmsnorm(T, D, group_size, dtype, x_dtype, device, seed):
    g = gen(seed)
    x = torch.randn(T, D, generator=g).to(x_dtype)
    gate = torch.randn(T, D, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    y_ref = gated_rmsnorm_ref(x.float(), gate.float(), weight.float(), group_size, 1e-5)
    out = poisoned((T, D), dtype, device)
    y = gated_rmsnorm(x.to(device), gate.to(device), weight.to(device), group_size, 1e-5, out=out)
    assert y is out
    assert_close(y.cpu(), y_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [48, 32])  # 48: a masked tail in each group's block
def test_gated_rmsnorm(dtype, group_size):
    check_gated_rmsnorm(5, 96, group_size, dtype, dtype, "cpu", seed=group_size)


def test_gated_rmsnorm_fp32_input_fp16_gate_and_default_output():
    g = gen(5)
    x, gate = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g).half()
    weight = torch.rand(64, generator=g).half()
    y = gated_rmsnorm(x, gate, weight, 16, 1e-6)
    assert y.dtype == torch.float16
    assert_close(y, gated_rmsnorm_ref(x, gate.float(), weight.float(), 16, 1e-6), torch.float16)


# ---------------------------------------------------------------------------------------------
# bf16, compiled on a GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,with_intermediate", [(1, False), (3, True)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter's bf16 is wrong)")
def test_selective_state_update_slots_bf16_gpu(L, with_intermediate):
    check_ssu(4, L, 8, 64, 2, 128, torch.bfloat16, with_intermediate, "cuda", seed=L)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter's bf16 is wrong)")
def test_causal_conv1d_bf16_gpu():
    check_conv_varlen([1, 2, 77, 300], [True, False, True, False], C=6144 + 96, K=4, dtype=torch.bfloat16,
                      with_bias=True, device="cuda", seed=1)
    check_conv_update(Bn=5, C=6144 + 96, K=4, dtype=torch.bfloat16, with_bias=True, device="cuda", seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter's bf16 is wrong)")
def test_gated_rmsnorm_bf16_gpu():
    check_gated_rmsnorm(7, 4096, 512, torch.bfloat16, torch.bfloat16, "cuda", seed=3)
