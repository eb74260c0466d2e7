"""Triton MoE kernels (agentrt.kernels.triton_moe) against the torch oracles in agentrt.kernels.moe.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), whose bf16
arithmetic is not trustworthy: fp32 and fp16 are checked here, bf16 only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from agentrt.kernels import triton_moe  # noqa: E402
from agentrt.kernels.moe import moe_align_ref, moe_experts_ref, moe_forward_ref  # noqa: E402
from agentrt.kernels.triton_moe import moe_align, moe_experts, moe_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the kernels and the oracle sum in different orders. fp16: the kernels round the relu^2
# activation and each weighted per-pair output to fp16 (the oracle, run on fp32 copies, does not).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def routing(T: int, k: int, E: int, skewed: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] int64 (distinct per token) and topk_weights [T, k] fp32.

    skewed: ~90% of tokens pick expert 0 first, the other choices come from the lower half of the
    experts only, so the upper half gets no tokens at all.
    """
    rows = []
    for _ in range(T):
        if skewed:
            first = 0 if torch.rand((), generator=g) < 0.9 else int(torch.randint(1, E // 2, (), generator=g))
            rest = [e for e in torch.randperm(E // 2, generator=g).tolist() if e != first][: k - 1]
            rows.append([first] + rest)
        else:
            rows.append(torch.randperm(E, generator=g)[:k].tolist())
    ids = torch.tensor(rows, dtype=torch.int64).view(T, k)
    return ids, torch.rand(T, k, generator=g) + 0.1


def expert_weights(E: int, d_in: int, inter: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.randn(E, inter, d_in, generator=g) / d_in ** 0.5  # [E, I, Din]
    down = torch.randn(E, d_in, inter, generator=g) / inter ** 0.5  # [E, Din, I]
    return up, down


# ----------------------------------------------------------------------------------------------
# align
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("E,block_m", [(4, 16), (8, 16), (8, 32)])
@pytest.mark.parametrize("skewed", [False, True])
def test_align_equals_the_reference(T, E, block_m, skewed):
    k = 2
    ids, _ = routing(T, k, E, skewed, gen(T * 100 + E * 10 + block_m + skewed))
    got = moe_align(ids.to(DEVICE), E, block_m)
    want = moe_align_ref(ids, E, block_m)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.int32
        assert torch.equal(g.cpu(), w)

    # and the reference itself satisfies the contract
    sorted_ids, block_experts, num_padded = want
    P, used = T * k, int(num_padded)
    capacity = -(-(P + E * (block_m - 1)) // block_m) * block_m
    assert sorted_ids.shape == (capacity,) and block_experts.shape == (capacity // block_m,)
    real = sorted_ids[sorted_ids != P]
    assert torch.equal(real.sort().values, torch.arange(P, dtype=torch.int32))  # every pair once
    assert used % block_m == 0 and (sorted_ids[used:] == P).all() and (block_experts[used // block_m:] == -1).all()
    slot_expert = block_experts.repeat_interleave(block_m)  # [capacity]
    placed = sorted_ids != P
    assert torch.equal(slot_expert[placed], ids.reshape(-1)[sorted_ids[placed].long()].to(torch.int32))
    for e in range(E):  # ascending flat index within an expert; padding only at its group's end
        group = sorted_ids[:used][slot_expert[:used] == e]
        n = int((ids == e).sum())
        assert group.numel() == -(-n // block_m) * block_m
        assert torch.equal(group[:n], group[:n].sort().values) and (group[n:] == P).all()
    assert torch.equal(block_experts[: used // block_m], block_experts[: used // block_m].sort().values)


# ----------------------------------------------------------------------------------------------
# routed experts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["gemv", "aligned"])
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("E,d_in,inter,skewed", [
    (4, 32, 64, False),   # powers of two
    (8, 48, 40, True),    # non-powers of two, skewed routing, experts with no tokens
])
def test_experts_match_the_reference(dtype, path, T, E, d_in, inter, skewed):
    k = 2
    g = gen(T * 1000 + E * 100 + d_in + inter)
    ids, weights = routing(T, k, E, skewed, g)
    up, down = expert_weights(E, d_in, inter, g)
    x = torch.randn(T, d_in, generator=g)
    want = moe_experts_ref(x.to(dtype).float(), up.to(dtype).float(), down.to(dtype).float(), ids, weights)

    out = torch.full((T, d_in), float("nan"), dtype=dtype, device=DEVICE)  # unwritten elements fail
    got = moe_experts(x.to(DEVICE, dtype), up.to(DEVICE, dtype), down.to(DEVICE, dtype), ids.to(DEVICE),
                      weights.to(DEVICE), out=out, path=path)
    assert got is out and got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("block_m", [16, 32])
def test_aligned_path_with_forced_block_and_int32_ids(block_m):
    T, k, E, d_in, inter = 37, 2, 6, 40, 24
    g = gen(block_m)
    ids, weights = routing(T, k, E, True, g)
    up, down = expert_weights(E, d_in, inter, g)
    x = torch.randn(T, d_in, generator=g)
    out = torch.full((T, d_in), float("nan"))
    got = moe_experts(x, up, down, ids.to(torch.int32), weights, out=out, path="aligned", block_m=block_m)
    torch.testing.assert_close(got, moe_experts_ref(x, up, down, ids, weights), **TOL[torch.float32])


@pytest.mark.parametrize("T,expected", [(1, "gemv"), (32, "gemv"), (33, "aligned")])
def test_path_is_chosen_by_batch_size(T, expected, monkeypatch):
    calls = []
    for name in ("moe_gemv", "grouped_gemm"):
        real = getattr(triton_moe, name)
        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)
        monkeypatch.setattr(triton_moe, name, spy)
    k, E, d_in, inter = 2, 4, 16, 16
    g = gen(T)
    ids, weights = routing(T, k, E, False, g)
    up, down = expert_weights(E, d_in, inter, g)
    x = torch.randn(T, d_in, generator=g)
    got = moe_experts(x, up, down, ids, weights)
    assert calls == [{"gemv": "moe_gemv", "aligned": "grouped_gemm"}[expected]] * 2
    torch.testing.assert_close(got, moe_experts_ref(x, up, down, ids, weights), **TOL[torch.float32])


def test_no_tokens():
    up, down = expert_weights(4, 16, 16, gen(0))
    got = moe_experts(torch.zeros(0, 16), up, down, torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert got.shape == (0, 16)


# ----------------------------------------------------------------------------------------------
# whole MoE block
# ----------------------------------------------------------------------------------------------


def block_weights(hidden, latent, E, inter, shared, bias, g):
    d_in = latent or hidden
    up, down = expert_weights(E, d_in, inter, g)
    w = dict(shared_up=torch.randn(shared, hidden, generator=g) / hidden ** 0.5,
             shared_down=torch.randn(hidden, shared, generator=g) / shared ** 0.5)
    if latent:
        w.update(latent_in_w=torch.randn(latent, hidden, generator=g) / hidden ** 0.5,
                 latent_out_w=torch.randn(hidden, latent, generator=g) / latent ** 0.5)
        if bias:
            w.update(latent_in_b=torch.randn(latent, generator=g), latent_out_b=torch.randn(hidden, generator=g))
    if bias:
        w.update(shared_up_b=torch.randn(shared, generator=g), shared_down_b=torch.randn(hidden, generator=g))
    return up, down, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("latent", [None, 24])
@pytest.mark.parametrize("T,path", [(3, None), (37, None), (37, "gemv")])
def test_forward_matches_the_reference(dtype, latent, T, path):
    hidden, E, k, inter, shared = 40, 8, 2, 48, 72
    g = gen(T + (latent or 0))
    up, down, w = block_weights(hidden, latent, E, inter, shared, latent is not None, g)
    ids, weights = routing(T, k, E, T > 10, g)
    x = torch.randn(T, hidden, generator=g)
    cast = {n: t.to(dtype) for n, t in w.items()}
    want = moe_forward_ref(x.to(dtype).float(), up.to(dtype).float(), down.to(dtype).float(), ids, weights,
                           **{n: t.float() for n, t in cast.items()})
    got = moe_forward(x.to(DEVICE, dtype), up.to(DEVICE, dtype), down.to(DEVICE, dtype), ids.to(DEVICE),
                      weights.to(DEVICE), **{n: t.to(DEVICE) for n, t in cast.items()}, path=path)
    assert got.dtype == dtype and got.shape == (T, hidden)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("latent", [None, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_reference_matches_the_model_layer(latent, bias):
    from agentrt.model.config import ModelConfig
    from agentrt.model.layers import MoE

    config = ModelConfig.from_dict({
        "model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "E",
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "moe_shared_expert_intermediate_size": 40, "moe_latent_size": latent, "mlp_bias": bias,
        "mlp_hidden_act": "relu2", "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    })
    layer = MoE(config)
    g = gen(7 + bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 4))
    x = torch.randn(9, 32, generator=g)
    with torch.no_grad():
        want = layer(x)
        ids, weights = layer.gate(x)
        lin = lambda m: (None, None) if m is None else (m.weight, m.bias)  # noqa: E731
        shared = layer.shared_experts
        args = (x, layer.experts.up_proj, layer.experts.down_proj, ids, weights,
                shared.up_proj.weight, shared.down_proj.weight,
                *lin(layer.fc1_latent_proj), *lin(layer.fc2_latent_proj))
        kw = dict(shared_up_b=shared.up_proj.bias, shared_down_b=shared.down_proj.bias)
        ref = moe_forward_ref(*args, **kw)
        got = moe_forward(*args, **kw)
    assert (layer.fc1_latent_proj is not None) == (latent is not None)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# bf16: GPU only (the interpreter's bf16 arithmetic is wrong)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("path", ["gemv", "aligned"])
@pytest.mark.parametrize("T", [1, 5, 300])
def test_experts_bf16_on_gpu(path, T):
    E, k, d_in, inter = 16, 6, 200, 136
    g = gen(T)
    ids, weights = routing(T, k, E, False, g)
    up, down = expert_weights(E, d_in, inter, g)
    x = torch.randn(T, d_in, generator=g)
    bf = torch.bfloat16
    want = moe_experts_ref(x.to(bf).float(), up.to(bf).float(), down.to(bf).float(), ids, weights)
    out = torch.full((T, d_in), float("nan"), dtype=bf, device="cuda")
    got = moe_experts(x.to("cuda", bf), up.to("cuda", bf), down.to("cuda", bf), ids.cuda(), weights.cuda(),
                      out=out, path=path)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[bf])
