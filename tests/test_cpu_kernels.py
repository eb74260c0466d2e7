"""The C kernels of the CPU path (`agentrt.kernels.cpu`) against their torch references."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentrt.kernels import cpu
from agentrt.kernels.mamba_varlen import mamba_mix_varlen_ref

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler: the CPU path keeps its torch kernels")


def _mixer_inputs(lengths: list[int], *, heads=4, head_dim=8, groups=2, state=16, kernel=4, slots=11, bias=True,
                  seed=0):
    g = torch.Generator().manual_seed(seed)
    inner = heads * head_dim
    conv_dim = inner + 2 * groups * state
    T = sum(lengths)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        zxbcdt=rand(T, inner + conv_dim + heads),
        cu=[0, *itertools.accumulate(lengths)],
        slots=torch.randperm(slots, generator=g)[:len(lengths)],
        conv_pool=rand(slots, conv_dim, kernel - 1),
        ssm_pool=rand(slots, heads, head_dim, state),
        params=dict(heads=heads, groups=groups, dt_bias=rand(heads), A_log=rand(heads) * 0.5, D=rand(heads),
                    conv_bias=rand(conv_dim) if bias else None, norm_weight=1 + 0.1 * rand(inner),
                    dt_min=1e-3, eps=1e-5, group_size=inner // groups),
        conv_weight=rand(conv_dim, kernel) / 2,
    )


@pytest.mark.parametrize("lengths", [[1] * 7, [3], [1, 5, 2, 1, 70], [2, 1], [130, 1, 64]])
@pytest.mark.parametrize("bias", [True, False])
def test_mamba_mix_matches_reference(lengths, bias):
    a = _mixer_inputs(lengths, bias=bias, seed=len(lengths) + sum(lengths))
    conv_ref, ssm_ref = a["conv_pool"].clone(), a["ssm_pool"].clone()
    expected = mamba_mix_varlen_ref(a["zxbcdt"], torch.tensor(a["cu"]), a["slots"], conv_ref, ssm_ref,
                                    conv_weight=a["conv_weight"], chunk_size=16, **a["params"])
    conv, ssm = a["conv_pool"].clone(), a["ssm_pool"].clone()
    got = cpu.mamba_mix(a["zxbcdt"], a["cu"], a["slots"], conv, ssm,
                        conv_weight_t=a["conv_weight"].t().contiguous(), **a["params"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssm, ssm_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(conv, conv_ref)  # the window shift moves inputs, no arithmetic
    untouched = [s for s in range(conv.shape[0]) if s not in a["slots"].tolist()]
    assert torch.equal(ssm[untouched], a["ssm_pool"][untouched])


def test_mamba_mix_continues_across_calls():
    """A sequence fed in two calls ends where one call over all its tokens ends (the decode loop)."""
    a = _mixer_inputs([9], seed=3)
    conv1, ssm1 = a["conv_pool"].clone(), a["ssm_pool"].clone()
    kw = dict(conv_weight_t=a["conv_weight"].t().contiguous(), **a["params"])
    whole = cpu.mamba_mix(a["zxbcdt"], a["cu"], a["slots"], conv1, ssm1, **kw)
    conv2, ssm2 = a["conv_pool"].clone(), a["ssm_pool"].clone()
    parts = [cpu.mamba_mix(a["zxbcdt"][s:e], [0, e - s], a["slots"], conv2, ssm2, **kw) for s, e in
             [(0, 1), (1, 2), (2, 6), (6, 7), (7, 9)]]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm2, ssm1, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv2, conv1)


def test_mamba_mix_rejects_what_it_cannot_index():
    a = _mixer_inputs([2, 3])
    kw = dict(conv_weight_t=a["conv_weight"].t().contiguous(), **a["params"])
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.mamba_mix(a["zxbcdt"], [0, 2, 4], a["slots"], a["conv_pool"], a["ssm_pool"], **kw)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 11\), got 3..11"):
        cpu.mamba_mix(a["zxbcdt"], [0, 2, 5], torch.tensor([3, 11]), a["conv_pool"], a["ssm_pool"], **kw)
    with pytest.raises(ValueError, match="never decrease"):
        cpu.mamba_mix(a["zxbcdt"][:5], [0, 3, 2, 5], torch.tensor([1, 2, 3]), a["conv_pool"], a["ssm_pool"], **kw)


@pytest.mark.parametrize("value", ["0", "off"])
def test_switched_off_by_environment(value, monkeypatch):
    code = "from agentrt.kernels import cpu; print(cpu.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, cpu.CPU_KERNELS_ENV: value})
    assert out.stdout.strip() == "False"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, cpu.CPU_KERNELS_ENV: "maybe"})
    assert bad.returncode != 0 and "AGENTRT_CPU_KERNELS='maybe'" in bad.stderr


def test_build_failure_falls_back_with_a_warning(tmp_path, monkeypatch):
    """A compiler that fails leaves the torch paths in place and says why, once."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from agentrt.kernels import cpu; print(cpu.available(), cpu.available())")
    env = {**__import__("os").environ, "CC": str(fake), "AGENTRT_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False False"
    assert out.stderr.count("could not be built") == 1 and "fake compiler: no" in out.stderr


@pytest.mark.parametrize("T,E,k", [(1, 16, 4), (7, 16, 4), (32, 16, 4), (5, 8, 1), (3, 4, 4), (13, 2, 2)])
def test_moe_experts_matches_reference(T, E, k):
    from agentrt.kernels.moe import moe_experts_ref

    g = torch.Generator().manual_seed(T * 100 + E + k)
    d_in, inter = 24, 40
    x = torch.randn(T, d_in, generator=g)
    up = torch.randn(E, inter, d_in, generator=g) / d_in**0.5
    down = torch.randn(E, d_in, inter, generator=g) / inter**0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    got = cpu.moe_experts_packed(x, cpu.PackedExperts(up, down), ids, weights)
    torch.testing.assert_close(got, moe_experts_ref(x, up, down, ids, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,E,k,skew", [(300, 16, 4, False), (200, 8, 2, True), (9, 4, 4, False)])
def test_moe_experts_packed_matches_reference(T, E, k, skew):
    from agentrt.kernels.moe import moe_experts_ref

    g = torch.Generator().manual_seed(T + E + k)
    d_in, inter = 40, 72
    x = torch.randn(T, d_in, generator=g)
    up = torch.randn(E, inter, d_in, generator=g) / d_in**0.5
    down = torch.randn(E, d_in, inter, generator=g) / inter**0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if skew:  # most rows choose experts 0 and 1
        for t in range(int(0.8 * T)):
            ids[t] = torch.cat([torch.tensor([0, 1]), 2 + torch.randperm(E - 2, generator=g)[:k - 2]])
    weights = torch.rand(T, k, generator=g)
    experts = cpu.PackedExperts(up, down)
    got = cpu.moe_experts_packed(x, experts, ids, weights)
    torch.testing.assert_close(got, moe_experts_ref(x, up, down, ids, weights), rtol=1e-5, atol=1e-5)
    assert not experts.stale(up, down)
    up.mul_(2)
    assert experts.stale(up, down)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, %d\)" % E):
        cpu.moe_experts_packed(x[:1], experts, torch.full((1, k), E), weights[:1])


def test_moe_experts_rejects_bad_ids():
    x, up, down = torch.randn(2, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 6)
    experts = cpu.PackedExperts(up, down)
    empty = cpu.moe_experts_packed(x[:0], experts, torch.zeros(0, 2, dtype=torch.long), torch.ones(0, 2))
    assert empty.shape == (0, 8)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\), got 0..4"):
        cpu.moe_experts_packed(x, experts, torch.tensor([[0, 4], [1, 2]]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.moe_experts_packed(torch.randn(2, 7), experts, torch.tensor([[0, 3], [1, 2]]), torch.ones(2, 2))
    assert cpu.moe_experts_packed_fits(x, up)
    assert not cpu.moe_experts_packed_fits(x.half(), up.half())
    assert not cpu.moe_experts_packed_fits(torch.randn(2, 6), up)  # Din is up's last size


def test_loading_the_kernels_leaves_floating_point_state_alone():
    """Subnormal numbers survive once the library is loaded (a -ffast-math link would flush them
    to zero process-wide)."""
    code = "\n".join([
        "import sys, torch",
        "from agentrt.kernels import cpu",
        "assert cpu.library() is not None",
        "tiny = sys.float_info.min",
        "print(tiny / 4 > 0, (torch.tensor(tiny, dtype=torch.float64) / 4).item() > 0)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    """The kernels' OpenMP regions use the runtime torch loaded, not a second thread pool."""
    assert cpu.library() is not None
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


def _decode_inputs(B, Hkv, G, D, shared_len, own_max, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = max(300, shared_len + B * own_max)
    k_pool, v_pool = torch.randn(slots, Hkv, D, generator=g), torch.randn(slots, Hkv, D, generator=g)
    order = torch.randperm(slots, generator=g)  # scattered slots, as a long-running pool hands them out
    shared = order[:shared_len]
    lengths = torch.randint(0 if shared_len else 1, own_max + 1, (B,), generator=g).tolist()
    own = list(order[shared_len:shared_len + sum(lengths)].split(lengths))
    q = torch.randn(B, Hkv * G, D, generator=g)
    return q, k_pool, v_pool, shared, own


@pytest.mark.parametrize("B,Hkv,G,D,shared_len,own_max", [
    (5, 2, 4, 32, 70, 40),     # the embedded model's heads (a specialized path), keys across blocks
    (3, 1, 16, 128, 9, 3),     # Nemotron 3 Nano's (the other specialized path)
    (4, 3, 2, 24, 0, 130),     # the generic path, no shared prefix
    (1, 2, 1, 8, 1, 0),        # one key in all
    (6, 2, 3, 16, 64, 64),     # block-sized
])
def test_decode_attention_matches_reference(B, Hkv, G, D, shared_len, own_max):
    from agentrt.kernels.attention import decode_attention_ref

    q, k_pool, v_pool, shared, own = _decode_inputs(B, Hkv, G, D, shared_len, own_max, seed=B * 1000 + D + shared_len)
    table = cpu.DecodeTable(shared, own, k_pool.shape[0])
    scale = D**-0.5
    out, lse = cpu.decode_attention(q, k_pool, v_pool, table, scale)
    ref_out, ref_lse = decode_attention_ref(q, k_pool, v_pool, shared, own, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_decode_table_rejects_what_the_kernel_cannot_index():
    q, k_pool, v_pool, shared, own = _decode_inputs(3, 2, 4, 32, 5, 6, seed=1)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 300\), got .*300"):
        cpu.DecodeTable(torch.cat([shared, torch.tensor([300])]), own, 300)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 300\), got -1"):
        cpu.DecodeTable(shared, [torch.tensor([1]), torch.tensor([-1, 4]), torch.tensor([2])], 300)
    with pytest.raises(ValueError, match="sequence 1 has no key"):
        cpu.DecodeTable(shared[:0], [torch.tensor([1]), torch.tensor([], dtype=torch.long), torch.tensor([2])], 300)
    table = cpu.DecodeTable(shared, own, 300)
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.decode_attention(q[:2], k_pool, v_pool, table, 0.2)
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.decode_attention(q, k_pool[:299], v_pool[:299], table, 0.2)


@pytest.mark.parametrize("rows,dim,ld", [(1, 256, 256), (32, 256, 256), (2048, 256, 300), (5, 24, 40), (0, 8, 8)])
def test_rms_norm_matches_torch(rows, dim, ld):
    g = torch.Generator().manual_seed(rows + dim)
    x = (torch.randn(rows, ld, generator=g) * 3)[:, :dim]  # rows of a wider tensor: strided
    weight = torch.rand(dim, generator=g) + 0.5
    got = cpu.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x, (dim,), weight, 1e-5), rtol=1e-6, atol=1e-6)
    assert got.is_contiguous()
    with pytest.raises(ValueError, match="one weight per column"):
        cpu.rms_norm(x, weight[:-1], 1e-5)


def test_the_kernels_step_aside_where_gradients_are_wanted():
    """Training through the model (RL on CPU) must get gradients: the C kernels record none, so the
    layers take torch's operators whenever autograd is on and something needs a gradient."""
    from agentrt.model.config import ModelConfig
    from agentrt.model.layers import MoE, RMSNorm
    from agentrt.model.tiny import TINY_CONFIG

    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-5)
    x = torch.randn(4, 16, requires_grad=True)
    assert cpu.rms_norm_fits(x.detach(), norm.weight.detach())
    assert not cpu.rms_norm_fits(x, norm.weight)
    norm(x).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and x.grad.abs().sum() > 0

    moe = MoE(ModelConfig.from_dict(TINY_CONFIG))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    h = torch.randn(3, TINY_CONFIG["hidden_size"])
    with torch.no_grad():
        fast = moe(h)  # no gradient wanted: the C kernel
        assert moe.experts._packed is not None
    slow = moe(h)
    slow.sum().backward()
    assert moe.experts.up_proj.grad is not None and moe.experts.up_proj.grad.abs().sum() > 0
    torch.testing.assert_close(slow.detach(), fast, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M,N,K,bias", [
    (32, 648, 256, False),   # the embedded model's Mamba in_proj at decode: 8-row tiles, a half panel pair
    (1, 2048, 256, False),   # one row against the LM head
    (130, 100, 64, True),    # past one 64-row work item, a ragged last panel, a bias
    (9, 16, 3, True),        # one panel, a tail row tile
    (7, 33, 1, False),       # a panel with one column
    (5, 24, 0, True),        # no inputs: the bias alone
])
def test_linear_matches_torch(M, N, K, bias):
    g = torch.Generator().manual_seed(M * 7 + N + K)
    x = torch.randn(M, K + 5, generator=g)[:, 2:K + 2]  # rows of a wider tensor: strided
    weight = torch.randn(N, K, generator=g) / max(K, 1) ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    packed = cpu.PackedLinear(weight, b)
    expected = torch.nn.functional.linear(x, weight, b)
    torch.testing.assert_close(cpu.linear(x, packed), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.linear(x, packed, relu2=True), torch.relu(expected).square(), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, K, generator=g)
    torch.testing.assert_close(cpu.linear(x3, packed), torch.nn.functional.linear(x3, weight, b), rtol=1e-5, atol=1e-5)


def test_linear_rows_do_not_depend_on_their_batch():
    """Each output is one in-order sum, whatever tile or thread computed its row: a request's
    projections are the same bits alone or batched (the engine's batch invariance rests on it)."""
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(70, 256, generator=g), torch.randn(300, 256, generator=g)
    packed = cpu.PackedLinear(weight)
    whole = cpu.linear(x, packed)
    for rows in ([0], [5, 6, 7], list(range(61, 70))):
        assert torch.equal(cpu.linear(x[rows], packed), whole[rows])


def test_linear_layer_repacks_when_its_weight_changes():
    from agentrt.model.layers import Linear

    layer = Linear(64, 40, bias=True)
    x = torch.randn(6, 64)
    with torch.no_grad():
        first = layer(x)
        packed = layer._packed
        assert packed is not None and not packed.stale(layer.weight, layer.bias)
        torch.testing.assert_close(first, torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(-2)  # an in-place update, as an optimizer step makes
        assert packed.stale(layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert layer._packed is not packed
        layer.load_state_dict({"weight": torch.randn(40, 64), "bias": torch.zeros(40)})
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    y = layer(x)  # gradients wanted: torch's matmul, which records them
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_linear_packs_several_maps_side_by_side():
    """q, k and v projections packed together: one call, their outputs in order, each map's bias
    (or none) with it; a change to any source makes the pack stale."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 48, generator=g)
    ws = [torch.randn(n, 48, generator=g) for n in (32, 8, 8)]
    bs = [torch.randn(32, generator=g), None, torch.randn(8, generator=g)]
    packed = cpu.PackedLinear(ws, bs)
    got = cpu.linear(x, packed)
    expected = torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert packed.splits == [32, 8, 8] and not packed.stale(*ws, *bs)
    bs[2].add_(1)
    assert packed.stale(*ws, *bs)


def test_weights_written_through_data_are_picked_up_after_weights_changed():
    """`.data` writes bypass the version counter, so the packed copies cannot see them; the model's
    `weights_changed()` drops every copy (q/k/v, linear layers, experts) and the next step repacks."""
    from agentrt.model.config import ModelConfig
    from agentrt.model.network import NemotronH
    from agentrt.model.tiny import TINY_CONFIG, _init_weights

    model = NemotronH(ModelConfig.from_dict(TINY_CONFIG))
    _init_weights(model, seed=0)
    ids = torch.arange(12, 30)
    with torch.no_grad():
        model.logits(model(ids))  # packs every layer's weights
        for p in model.parameters():  # an RL trainer's weight sync, the old-fashioned way
            p.data.mul_(0.5)
        stale = model.logits(model(ids))  # the packed copies still hold the old weights
        assert model.weights_changed() > 10
        fresh = model.logits(model(ids))
        with torch.enable_grad():
            expected = model.logits(model(ids)).detach()  # gradients on: torch's operators, no copies
    torch.testing.assert_close(fresh, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stale, expected, rtol=1e-4, atol=1e-4)


def test_linear_rejects_mismatched_shapes():
    packed = cpu.PackedLinear(torch.randn(8, 4))
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.linear(torch.randn(3, 5), packed)
    with pytest.raises(ValueError, match="one bias"):
        cpu.PackedLinear(torch.randn(8, 4), torch.randn(7))
    with pytest.raises(ValueError, match="2-D with one input size"):
        cpu.PackedLinear(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="2-D with one input size"):
        cpu.PackedLinear([torch.randn(8, 4), torch.randn(8, 5)])


@pytest.mark.parametrize("march,width", [("x86-64-v3", 8), ("x86-64", 4)])
def test_linear_on_narrower_vectors(march, width, tmp_path):
    """The same source built for AVX2 and for SSE (what machines without AVX-512 run) gives the
    same products; the engine takes the C path only from 8-float vectors up."""
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction sets")
    lib_path = tmp_path / f"linear-{march}.so"
    flags = tuple(f"-march={march}" if f == "-march=native" else f for f in cpu.COMPILE_FLAGS)
    assert cpu._build(lib_path, [Path(cpu.__file__).with_name("cpu_linear.c")], flags) is None
    lib = ctypes.CDLL(str(lib_path))
    assert sys.float_info.min / 2 > 0  # built as the engine builds: loading it left subnormals on
    lib.agentrt_linear_f32.argtypes = cpu._SIGNATURES["agentrt_linear_f32"]
    assert lib.agentrt_linear_vector_width() == width
    g = torch.Generator().manual_seed(5)
    for M, N, K in ((32, 100, 256), (3, 16, 7), (65, 33, 40)):
        x, weight, bias = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        packed = cpu.PackedLinear(weight, bias)
        expected = torch.nn.functional.linear(x, weight, bias)
        for relu2 in (0, 1):
            y = torch.empty(M, N)
            lib.agentrt_linear_f32(M, N, K, x.data_ptr(), K, packed.panels.data_ptr(), packed.bias.data_ptr(), relu2,
                                   y.data_ptr(), N, 2)
            torch.testing.assert_close(y, torch.relu(expected).square() if relu2 else expected, rtol=1e-5, atol=1e-4)
