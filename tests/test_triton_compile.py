"""Ahead-of-time compile every Triton kernel for an H100 (sm_90) without a GPU.

The CPU tests run the kernels in Triton's interpreter, which cannot catch GPU code generation errors
(tl.dot shape rules, early returns, loop-carried types, register or shared-memory blow-ups). Here each
kernel goes through the real CUDA backend (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled
ptxas) for `GPUTarget("cuda", 90, 32)`, and its shared memory must fit an H100 SM (227 KiB).

The compile specializations are the ones the Python wrappers really launch: each kernel object in the
four modules is replaced by a recorder, the public wrappers are called with CPU tensors at Nemotron 3
Nano shapes, and every recorded launch is specialized exactly as Triton's launcher would (argument
types, constexprs, 16-divisibility, ints equal to 1 becoming constants) before `triton.compile`.
Distinct specializations compile once each.

conftest.py sets TRITON_INTERPRET=1 without CUDA, and `triton.jit` then yields interpreted functions,
so the compilation runs in a subprocess (this file run as a script, TRITON_INTERPRET removed) that
prints one JSON line per compiled kernel variant.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

FAMILIES = ("attention", "mamba", "ssd", "moe")
H100_SMEM_PER_BLOCK = 232448  # 227 KiB: the most shared memory one block may use on sm_90
_MARK = "@@KERNEL "


# ---------------------------------------------------------------------------------------------------------------------
# subprocess side: record the wrappers' launches, compile each distinct specialization
# ---------------------------------------------------------------------------------------------------------------------

# Nemotron 3 Nano shapes
HIDDEN = 2688
MAMBA_HEADS, MAMBA_HEAD_DIM, SSM_STATE, N_GROUPS, CONV_K, CHUNK = 64, 64, 128, 8, 4, 128
MAMBA_INNER = MAMBA_HEADS * MAMBA_HEAD_DIM
CONV_DIM = MAMBA_INNER + 2 * N_GROUPS * SSM_STATE
HQ, HKV, HEAD_DIM = 32, 2, 128
N_EXPERTS, TOP_K, MOE_INTER = 128, 6, 1856
STATE_SLOTS = 16


class _Recorder:
    """Stands in for a JITFunction in its module: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs))
        return launch


def _patched(module, sink):
    """Replace every @triton.jit kernel of `module` by a recorder; returns a function that restores them."""
    from triton.runtime.jit import JITFunction

    saved = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    for name, fn in saved.items():
        setattr(module, name, _Recorder(fn, sink))
    return lambda: [setattr(module, name, fn) for name, fn in saved.items()]


def _mamba_in_proj(T, dtype):
    """Views of an in_proj output as the Mamba layer splits it: gate [T, inner], xBC [T, conv], dt [T, H]."""
    import torch

    z = torch.empty(T, MAMBA_INNER + CONV_DIM + MAMBA_HEADS, dtype=dtype)
    return z.split([MAMBA_INNER, CONV_DIM, MAMBA_HEADS], dim=-1)


def _split_xbc(h):
    # h: [n, conv_dim] -> x [n, H, P], B [n, G, N], C [n, G, N] (views, as the model's `_split`)
    n = h.shape[0]
    gn = N_GROUPS * SSM_STATE
    x, B, C = h.split([MAMBA_INNER, gn, gn], dim=-1)
    return (x.view(n, MAMBA_HEADS, MAMBA_HEAD_DIM), B.view(n, N_GROUPS, SSM_STATE), C.view(n, N_GROUPS, SSM_STATE))


def _scenarios_attention(dtype):
    import torch

    from agentrt.kernels import triton_attention as ta

    def batch(label, lens, W):
        B, T = len(lens), sum(lens)
        S = 4096
        q = torch.empty(T, HQ, HEAD_DIM, dtype=dtype)
        k_pool = torch.empty(S, HKV, HEAD_DIM, dtype=dtype)
        v_pool = torch.empty_like(k_pool)
        k = torch.empty(T, HKV, HEAD_DIM, dtype=dtype)
        v = torch.empty_like(k)
        slots = torch.arange(T, dtype=torch.long)
        cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(B)], dtype=torch.int32)
        slot_table = torch.zeros(B, W, dtype=torch.int32)
        ctx = torch.full((B,), W, dtype=torch.int32)
        yield label, lambda: ta.write_kv(k_pool, v_pool, k, v, slots)
        yield label, lambda: ta.paged_attention(q, k_pool, v_pool, cu, slot_table, ctx, HEAD_DIM ** -0.5)

    yield from batch("decode B=256 ctx=2048", [1] * 256, 2048)     # one split
    yield from batch("decode B=64 ctx=4096", [1] * 64, 4096)        # split-K (3)
    yield from batch("decode B=1 ctx=32768", [1], 32768)            # split-K (32, the cap)
    yield from batch("prefill B=1 T=2048", [2048], 2048)            # one split
    yield from batch("prefill B=1 T=8 ctx=8192", [8], 8192)         # prefill with split-K (32)
    yield from batch("mixed B=4 T=64 ctx=1024", [1, 1, 1, 61], 1024)  # prefill blocks, split-K (4)


def _scenarios_mamba(dtype):
    import torch

    from agentrt.kernels import triton_mamba as tm

    conv_pool = torch.empty(STATE_SLOTS, CONV_DIM, CONV_K - 1, dtype=dtype)
    ssm_pool = torch.empty(STATE_SLOTS, MAMBA_HEADS, MAMBA_HEAD_DIM, SSM_STATE, dtype=torch.float32)
    conv_w = torch.empty(CONV_DIM, 1, CONV_K, dtype=dtype)[:, 0]  # conv1d.weight[:, 0]
    conv_b = torch.empty(CONV_DIM, dtype=dtype)
    A = torch.empty(MAMBA_HEADS, dtype=torch.float32)
    D = torch.empty(MAMBA_HEADS, dtype=dtype)
    norm_w = torch.empty(MAMBA_INNER, dtype=dtype)

    for bias in (conv_b, None):
        tag = "bias" if bias is not None else "no bias"
        # decode: one token per sequence
        Bn = 8
        _, xbc, _ = _mamba_in_proj(Bn, dtype)
        slots = torch.arange(Bn, dtype=torch.int32)
        yield f"decode B={Bn} {tag}", lambda b=bias, x=xbc[torch.arange(Bn)], s=slots: tm.causal_conv1d_update_slots(
            x, conv_pool, s, conv_w, b)
        # prefill: long sequences (BLOCK_T 32) and short ones (BLOCK_T 4)
        for lens in ([1000, 24], [3, 2]):
            T = sum(lens)
            _, xbc, _ = _mamba_in_proj(T, dtype)
            cu = torch.tensor([0, lens[0], T], dtype=torch.int32)
            yield f"prefill lens={lens} {tag}", lambda b=bias, x=xbc[torch.arange(T)], cu=cu, m=max(lens): (
                tm.causal_conv1d_varlen(x, conv_w, b, conv_pool, torch.arange(2, dtype=torch.int32),
                                        torch.ones(2, dtype=torch.bool), cu, max_seqlen=m))

    # selective state update: decode (L=1), and L=4 steps with intermediate states (speculative verification)
    Bn = 8
    for L, inter in ((1, False), (4, True)):
        h = torch.empty(Bn * L, CONV_DIM, dtype=dtype)
        xs, B, C = (t.view(Bn, L, *t.shape[1:]) for t in _split_xbc(h))
        dt = torch.empty(Bn, L, MAMBA_HEADS, dtype=dtype)
        im = torch.empty(Bn, L, MAMBA_HEADS, MAMBA_HEAD_DIM, SSM_STATE, dtype=torch.float32) if inter else None
        yield f"L={L} intermediate={inter}", lambda xs=xs, dt=dt, B=B, C=C, im=im: tm.selective_state_update_slots(
            ssm_pool, torch.arange(Bn, dtype=torch.int32), xs, dt, A, B, C, D, im)

    T = 64
    gate, _, _ = _mamba_in_proj(T, dtype)
    y = torch.empty(T, MAMBA_HEADS, MAMBA_HEAD_DIM, dtype=dtype)
    yield f"T={T} group={MAMBA_INNER // N_GROUPS}", lambda: tm.gated_rmsnorm(
        y.view(T, -1), gate, norm_w, MAMBA_INNER // N_GROUPS, 1e-5)


def _scenarios_ssd(dtype):
    import torch

    from agentrt.kernels import triton_ssd as ts

    lens = [1000, 300]
    T = sum(lens)
    _, _, dt = _mamba_in_proj(T, dtype)
    h = torch.empty(T, CONV_DIM, dtype=dtype)  # the conv output, split into views
    xs, B, C = _split_xbc(h)
    A = torch.empty(MAMBA_HEADS, dtype=torch.float32)
    D = torch.empty(MAMBA_HEADS, dtype=dtype)
    pool = torch.empty(STATE_SLOTS, MAMBA_HEADS, MAMBA_HEAD_DIM, SSM_STATE, dtype=torch.float32)
    cu = torch.tensor([0, lens[0], T], dtype=torch.int32)
    yield f"chunk={CHUNK} lens={lens}", lambda: ts.ssd_scan_varlen(
        xs, dt[torch.arange(T)], A, B, C, D, CHUNK, cu, pool, torch.arange(2, dtype=torch.int32),
        torch.ones(2, dtype=torch.bool))


def _scenarios_moe(dtype):
    import torch

    from agentrt.kernels import triton_moe as tmoe

    # never touched: the kernels are recorded, not run
    up = torch.empty(N_EXPERTS, MOE_INTER, HIDDEN, dtype=dtype)
    down = torch.empty(N_EXPERTS, HIDDEN, MOE_INTER, dtype=dtype)
    for T in (1, 10, 11, 512, 2048):  # gemv; gemv; aligned block_m 16, 32, 64
        x = torch.empty(T, HIDDEN, dtype=dtype)
        ids = torch.zeros(T, TOP_K, dtype=torch.long)
        w = torch.empty(T, TOP_K, dtype=torch.float32)
        path = "gemv" if T * TOP_K <= tmoe.SMALL_BATCH_PAIRS else "aligned"
        yield f"{path} T={T}", lambda x=x, ids=ids, w=w: tmoe.moe_experts(x, up, down, ids, w)


def _variant_label(fn, constexprs, signature):
    names = fn.arg_names
    parts = [f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items())
             if not names[k[0]].startswith(("s_", "stride_"))]
    ptr_types = sorted({t for t in signature.values() if t.startswith("*")})
    return " ".join(parts) + " | " + ",".join(ptr_types)


def _specialize(fn, args, kwargs, backend):
    """A recorded launch specialized as Triton's launcher would: (signature, constexprs, attrs), the
    key of its compile cache."""
    from triton.runtime.jit import create_function_from_signature

    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs


def _compile_family(family: str) -> None:
    import contextlib
    import io
    import re

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    # The MoE wrappers pick their CUDA tile sizes when `a.is_cuda`; make the CPU tensors answer True
    # (only the Python property: nothing here runs on a device).
    torch.Tensor.is_cuda = property(lambda self: True)

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills, printed per compile

    module_name = {"attention": "triton_attention", "mamba": "triton_mamba", "ssd": "triton_ssd",
                   "moe": "triton_moe"}[family]
    module = __import__(f"agentrt.kernels.{module_name}", fromlist=["_"])
    scenarios = globals()[f"_scenarios_{family}"]

    # The model runs bf16; fp16 is cheap to add. fp32 (exact "ieee" dots) roughly doubles the time: opt in.
    DTYPES = (torch.bfloat16, torch.float16) + ((torch.float32,) if os.environ.get("AGENTRT_COMPILE_FP32") else ())
    seen = set()
    for dtype in DTYPES:
        dname = str(dtype).removeprefix("torch.")
        for label, call in scenarios(dtype):
            launches = []
            restore = _patched(module, launches)
            try:
                call()
            finally:
                restore()
            for fn, args, kwargs in launches:
                signature, constexprs, attrs = _specialize(fn, args, kwargs, backend)
                key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())))
                if key in seen:
                    continue
                seen.add(key)
                rec = {"family": family, "kernel": fn.__name__, "dtype": dname, "scenario": label,
                       "variant": _variant_label(fn, constexprs, signature), "ok": False, "shared": None,
                       "regs": None, "spills": None, "seconds": None, "error": None}
                t0 = time.perf_counter()
                log = io.StringIO()
                try:
                    with contextlib.redirect_stdout(log):
                        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target)
                    rec["ok"] = True
                    rec["shared"] = int(compiled.metadata.shared)
                    m = re.search(r"Used (\d+) registers", log.getvalue())
                    rec["regs"] = int(m.group(1)) if m else None
                    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())]
                    rec["spills"] = max(spills) if spills else None
                except Exception as e:  # report, keep going with the other variants
                    rec["error"] = f"{type(e).__name__}: {e}"[-3000:]
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                print(_MARK + json.dumps(rec), flush=True)


def _count_serving_variants() -> None:
    """Distinct specializations of paged_attention's kernels over what a server meets: decode
    batches of 1 to 64 sequences at contexts to 32k (every 127th length), and prefills of 2 to
    4096 tokens over 0 to 5000 cached ones.
    Each is a compile (about a second) the first time a server meets it, mid-serving."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from agentrt.kernels import triton_attention as ta

    torch.Tensor.is_cuda = property(lambda self: True)
    ta._num_sms = lambda device: 132  # an H100's
    backend = make_backend(GPUTarget("cuda", 90, 32))
    dtype = torch.bfloat16
    k_pool = torch.empty(4096, HKV, HEAD_DIM, dtype=dtype)
    keys: dict[str, set] = {}

    def launch(lens: list[int], W: int) -> None:
        B, T = len(lens), sum(lens)
        q = torch.empty(T, HQ, HEAD_DIM, dtype=dtype)
        cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(B)], dtype=torch.int32)
        launches = []
        restore = _patched(ta, launches)
        try:
            ta.paged_attention(q, k_pool, k_pool, cu, torch.zeros(B, W, dtype=torch.int32),
                               torch.full((B,), W, dtype=torch.int32), HEAD_DIM ** -0.5)
        finally:
            restore()
        for fn, args, kwargs in launches:
            signature, constexprs, attrs = _specialize(fn, args, kwargs, backend)
            keys.setdefault(fn.__name__, set()).add(repr((sorted(signature.items()), sorted(constexprs.items()),
                                                          sorted(attrs.items()))))

    for B in [1, 2, 3, 5, 8, 13, 16, 21, 32, 47, 64]:
        for W in range(1, 32768, 127):
            launch([1] * B, W)
    decode = {k: len(v) for k, v in keys.items()}
    keys.clear()
    for n in [2, 7, 64, 100, 511, 2048, 4096]:
        for cached in [0, 300, 5000]:
            launch([n], n + cached)
            launch([1, 1, n], n + cached)
    print(_MARK + json.dumps({"decode": decode, "prefill": {k: len(v) for k, v in keys.items()}}), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compile_results():
    """Run the four families' compilations in parallel subprocesses; -> {family: (records, returncode, stderr)}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = tempfile.mkdtemp(prefix="triton-aot-")  # a fresh cache: every variant really goes through ptxas
    env["TRITON_CACHE_DIR"] = cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, without its warning
    procs = {}
    for family in FAMILIES:
        procs[family] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), family], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for family, p in procs.items():
            try:
                out, err = p.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                err += "\n(timed out after 600 s)"
            records = [json.loads(line[len(_MARK):]) for line in out.splitlines() if line.startswith(_MARK)]
            results[family] = (records, p.returncode, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        shutil.rmtree(cache, ignore_errors=True)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_compile_for_h100(compile_results, family):
    records, rc, err = compile_results[family]
    assert rc == 0 and records, (
        f"the sm_90 compile subprocess for {family} failed (rc={rc}); the CUDA backend or its bundled ptxas "
        f"may be unusable here:\n{err[-4000:]}")
    for r in records:
        print(f"{r['kernel']:40s} {r['dtype']:9s} shared={r['shared']!s:>6} regs={r['regs']!s:>4} "
              f"spills={r['spills']!s:>4} {r['seconds']:5.2f}s  [{r['scenario']}] {r['variant']}")
    failed = [r for r in records if not r["ok"]]
    assert len(failed) < len(records), (
        f"no {family} kernel compiled for sm_90 at all: the CUDA backend or its bundled ptxas looks unusable "
        f"on this machine. First error ({failed[0]['kernel']}):\n{failed[0]['error']}")
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n\n".join(
        f"{r['kernel']} ({r['dtype']}, {r['scenario']}; {r['variant']}):\n{r['error']}" for r in failed)
    too_big = [r for r in records if r["shared"] > H100_SMEM_PER_BLOCK]
    assert not too_big, "shared memory over the H100 limit of %d bytes:\n" % H100_SMEM_PER_BLOCK + "\n".join(
        f"{r['kernel']} ({r['dtype']}, {r['scenario']}; {r['variant']}): {r['shared']} bytes" for r in too_big)
    # every kernel of the module was exercised by some scenario
    import ast
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels",
                       f"triton_{family}.py")
    tree = ast.parse(open(src).read())
    jitted = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
              and any("jit" in ast.unparse(d) for d in n.decorator_list)}
    assert jitted and jitted <= {r["kernel"] for r in records}, (
        f"kernels never launched by the scenarios: {sorted(jitted - {r['kernel'] for r in records})}")


def test_serving_meets_few_attention_variants():
    """Serving must not compile a new attention kernel every few hundred tokens of context: on an
    H100, compiles were a third of the engine's time in bench engine when the split count and the
    batch-size block took any integer and every batch-dependent int was specialized on (204
    decode variants of the attention kernel over this sweep, 31 of the merge kernel)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variants"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    counts = json.loads(next(line[len(_MARK):] for line in out.stdout.splitlines() if line.startswith(_MARK)))
    assert counts["decode"]["_paged_attention_kernel"] <= 16, counts
    assert counts["decode"]["_merge_splits_kernel"] <= 6, counts  # one per power-of-two split count
    assert counts["prefill"]["_paged_attention_kernel"] <= 16, counts


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if sys.argv[1:] == ["--variants"]:
        _count_serving_variants()
    else:
        for fam in sys.argv[1:] or FAMILIES:
            _compile_family(fam)
