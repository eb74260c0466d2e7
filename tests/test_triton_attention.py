"""The Triton paged-attention kernels against their `*_ref` oracles, with fresh random inputs.

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET), whose bf16 math is
wrong, so the CPU tests use fp32 and fp16 with few heads and short sequences; bf16 at the real
Nemotron shapes runs only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from agentrt.kernels.attention import paged_attention_ref, write_kv_ref  # noqa: E402
from agentrt.kernels.triton_attention import choose_num_splits, paged_attention, write_kv  # noqa: E402

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# (new queries, cached prefix) per sequence.
MIXED = [(5, 12), (1, 37), (9, 0), (1, 0)]      # prefill over a prefix, decodes, prefills from scratch
DECODE = [(1, 40), (1, 3), (1, 70)]              # one query each, contexts not multiples of a block
WITH_EMPTY = [(3, 4), (0, 6), (2, 0), (17, 20)]  # a sequence with no new tokens this step


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(batch, Hq, Hkv, D, dtype, seed, device="cpu", width_extra=5):
    """Random queries and pools; each sequence's slots are a random, non-contiguous part of the pool.

    Pool slots no sequence uses hold NaN and slot-table entries past ctx_len are out-of-range garbage,
    so reading either shows up in the output.
    """
    g = gen(seed)
    q_lens = [n for n, _ in batch]
    ctx = [n + c for n, c in batch]
    S = sum(ctx) + 7
    W = max(ctx) + width_extra
    k_pool = torch.full((S, Hkv, D), float("nan"), dtype=dtype)
    v_pool = torch.full((S, Hkv, D), float("nan"), dtype=dtype)
    perm = 1 + torch.randperm(S - 1, generator=g)  # slot 0 stays NaN: masked-off keys must not reach the sums
    slot_table = torch.randint(-10**6, 10**6, (len(batch), W), generator=g, dtype=torch.int32)
    used = 0
    for b, n in enumerate(ctx):
        slots = perm[used:used + n]
        used += n
        slot_table[b, :n] = slots.int()
        k_pool[slots] = torch.randn(n, Hkv, D, generator=g).to(dtype)
        v_pool[slots] = torch.randn(n, Hkv, D, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    ctx_lens = torch.tensor(ctx, dtype=torch.int32)
    return [x.to(device) for x in (q, k_pool, v_pool, cu, slot_table, ctx_lens)]


def run_kernel(args, scale, **kw):
    q = args[0]
    out = torch.full_like(q, float("nan"))  # poison: any element the kernel misses stays NaN
    res = paged_attention(*args, scale, out=out, **kw)
    assert res is out
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 16), (2, 2, 32), (4, 1, 16)])
@pytest.mark.parametrize("batch", [MIXED, DECODE, WITH_EMPTY], ids=["mixed", "decode", "with_empty"])
def test_paged_attention_matches_the_reference(batch, Hq, Hkv, D, dtype):
    args = make_batch(batch, Hq, Hkv, D, dtype, seed=Hq * 100 + Hkv * 10 + D + len(batch))
    scale = D ** -0.5
    out = run_kernel(args, scale, num_splits=1, block_n=16)
    torch.testing.assert_close(out, paged_attention_ref(*args, scale), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [MIXED, DECODE], ids=["mixed", "decode"])
def test_split_k_equals_unsplit(batch, dtype):
    args = make_batch(batch, 4, 2, 16, dtype, seed=7 + len(batch))
    scale = 0.3
    ref = paged_attention_ref(*args, scale)
    whole = run_kernel(args, scale, num_splits=1, block_n=16)
    for splits in (2, 3, 5):  # 5 splits of a 1-block context (DECODE's 4 keys) leave empty splits
        part = run_kernel(args, scale, num_splits=splits, block_n=16)
        torch.testing.assert_close(part, whole, **TOL[dtype])
        torch.testing.assert_close(part, ref, **TOL[dtype])


def test_automatic_choices_match_the_reference():
    # A wide slot table (W stands in for the longest context) makes the automatic choice split.
    args = make_batch(DECODE, 4, 2, 32, torch.float32, seed=11, width_extra=700)
    assert choose_num_splits(len(DECODE) * 2, args[4].shape[1], 132) > 1
    out = run_kernel(args, 0.2)
    torch.testing.assert_close(out, paged_attention_ref(*args, 0.2), **TOL[torch.float32])


def test_choose_num_splits():
    assert choose_num_splits(num_programs=2000, max_ctx=100_000, num_sms=132) == 1  # grid already full
    assert choose_num_splits(num_programs=4, max_ctx=100, num_sms=132) == 1         # context too short
    assert choose_num_splits(num_programs=4, max_ctx=8192, num_sms=132) == 32
    assert choose_num_splits(num_programs=64, max_ctx=100_000, num_sms=132) == 4  # 5, down to a power of two
    assert {choose_num_splits(p, c, 132) for p in range(1, 300) for c in range(1, 10_000, 97)} == {1, 2, 4, 8, 16, 32}


def test_head_dim_must_be_a_power_of_two():
    args = make_batch(DECODE, 2, 1, 16, torch.float32, seed=1)
    q = torch.zeros(3, 2, 24)
    pool = torch.zeros(10, 1, 24)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(q, pool, pool, *args[3:], 1.0)
    with pytest.raises(ValueError, match="power of two"):
        write_kv(pool, pool.clone(), q[:, :1], q[:, :1], torch.arange(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hkv,D", [(2, 16), (3, 32)])
def test_write_kv_matches_the_reference(Hkv, D, dtype):
    g = gen(Hkv * 10 + D)
    S, T = 40, 13
    k_pool = torch.randn(S, Hkv, D, generator=g).to(dtype)
    v_pool = torch.randn(S, Hkv, D, generator=g).to(dtype)
    # k and v as slices of a fused projection: token stride larger than Hkv * D.
    kv = torch.randn(T, 2 * Hkv + 1, D, generator=g).to(dtype)
    k, v = kv[:, :Hkv], kv[:, Hkv + 1:]
    slots = torch.randperm(S, generator=g)[:T].int()
    k_exp, v_exp = k_pool.clone(), v_pool.clone()
    write_kv_ref(k_exp, v_exp, k, v, slots)
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots.long()] = False
    before = k_pool[untouched].clone()
    write_kv(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool, k_exp) and torch.equal(v_pool, v_exp)
    assert torch.equal(k_pool[untouched], before)
    assert torch.equal(k_pool[slots.long()], k)


def test_write_kv_then_attend_over_the_new_tokens():
    # The engine's order within one step: write the new tokens' K/V, then attend over the pool.
    batch, Hq, Hkv, D = [(4, 6), (1, 9)], 4, 2, 16
    args = make_batch(batch, Hq, Hkv, D, torch.float32, seed=3)
    q, k_pool, v_pool, cu, slot_table, ctx_lens = args
    g = gen(4)
    new_slots = torch.cat([slot_table[b, c - n:c] for b, (n, c) in enumerate(zip((4, 1), ctx_lens.tolist()))])
    k_new, v_new = torch.randn(5, Hkv, D, generator=g), torch.randn(5, Hkv, D, generator=g)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    write_kv_ref(k_ref, v_ref, k_new, v_new, new_slots)
    write_kv(k_pool, v_pool, k_new, v_new, new_slots)
    out = run_kernel(args, 0.25, num_splits=2, block_n=16)
    torch.testing.assert_close(out, paged_attention_ref(q, k_ref, v_ref, cu, slot_table, ctx_lens, 0.25),
                               **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need CUDA; the interpreter's bf16 is wrong")
@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("batch", [MIXED, DECODE, [(1, 3000)] * 4, [(300, 200), (1, 900)]],
                         ids=["mixed", "decode", "long_decode", "long_prefill"])
def test_bf16_on_gpu(batch, num_splits):
    args = make_batch(batch, 32, 2, 128, torch.bfloat16, seed=5, device="cuda")
    scale = 128 ** -0.5
    out = run_kernel(args, scale, num_splits=num_splits)
    torch.testing.assert_close(out, paged_attention_ref(*args, scale), **TOL[torch.bfloat16])
    q, k_pool, v_pool = args[:3]
    slots = args[4][0, :5].long()
    k_exp, v_exp = k_pool.clone(), v_pool.clone()
    k_new = torch.randn(5, 2, 128, device="cuda", dtype=torch.bfloat16)
    write_kv_ref(k_exp, v_exp, k_new, k_new, slots)
    write_kv(k_pool, v_pool, k_new, k_new, slots)
    assert torch.equal(k_pool.nan_to_num(), k_exp.nan_to_num()) and torch.equal(v_pool.nan_to_num(),
                                                                              v_exp.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_several_query_blocks_and_padded_head_groups(dtype):
    # 3 query heads per KV head (padded to 4 rows each), 16 tokens per query block: the prefills
    # span several blocks, the last ones partial.
    args = make_batch([(40, 5), (1, 20), (33, 0)], 6, 2, 16, dtype, seed=21)
    out = run_kernel(args, 0.25, num_splits=1, block_n=32)
    torch.testing.assert_close(out, paged_attention_ref(*args, 0.25), **TOL[dtype])
    out = run_kernel(args, 0.25, num_splits=2, block_n=16)
    torch.testing.assert_close(out, paged_attention_ref(*args, 0.25), **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("batch", [DECODE, [(1, 40), (0, 5), (2, 3)]], ids=["decode", "T_equals_B_with_empty"])
def test_one_token_per_query_block(batch, num_splits):
    # 16 query heads per KV head (as in Nemotron 3 Nano) and T == B: each block is one token's 16 heads.
    args = make_batch(batch, 16, 1, 16, torch.float16, seed=31)
    out = run_kernel(args, 0.25, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out, paged_attention_ref(*args, 0.25), **TOL[torch.float16])
