"""`agentrt bench kernels`: each NemotronH kernel against what the device can move and compute.

First the device's two ceilings are measured: copy bandwidth (a large device-to-device `copy_`,
read + write bytes per second) and matmul rate (a large `torch.matmul` in the model dtype, bf16 on
CUDA, fp32 on CPU). Then every kernel runs at the model's shapes and is reported as achieved GB/s
and TFLOP/s, each also as a share of those ceilings. Bytes follow one model throughout: every
input a kernel must read is counted once and every output it must write is counted once (no
intermediate traffic, no cache reuse across iterations); each case's function says what that is.

On CUDA the Triton kernels run (as `agentrt.kernels.use_triton` picks, so AGENTRT_KERNELS=ref
times the torch references instead); on CPU the torch paths the engine would use. Shapes: NANO
(Nemotron 3 Nano, the default on CUDA) or SMALL (the embedded tiny model's, the default on CPU).
Last, our Engine's decode throughput against transformers' batched `generate` on the same random
weights (a few NemotronH layers at the chosen shapes).

>>> report = run_benchmark(shapes="small", iters=3, skip_engine=True)   # doctest: +SKIP
>>> print(format_text(report))
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentrt.bench import tables


@dataclass(frozen=True, slots=True)
class Shapes:
    """The model dimensions the kernels run at."""

    name: str
    hidden: int
    mamba_heads: int
    mamba_head_dim: int
    ssm_state: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    q_heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int
    vocab_size: int

    @property
    def mamba_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_channels(self) -> int:  # x, B and C go through the conv together
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state


NANO = Shapes("nano", hidden=2688, mamba_heads=64, mamba_head_dim=64, ssm_state=128, n_groups=8, conv_kernel=4,
              chunk_size=128, q_heads=32, kv_heads=2, head_dim=128, experts=128, top_k=6, expert_intermediate=1856,
              shared_intermediate=3712, vocab_size=131072)
SMALL = Shapes("small", hidden=256, mamba_heads=8, mamba_head_dim=32, ssm_state=32, n_groups=2, conv_kernel=4,
               chunk_size=64, q_heads=8, kv_heads=2, head_dim=32, experts=16, top_k=4, expert_intermediate=256,
               shared_intermediate=512, vocab_size=2048)
SHAPES = {s.name: s for s in (NANO, SMALL)}

# The workload of each case (the same at both shapes)
DECODE_BATCH, DECODE_CONTEXT = 64, 4096
PREFILL_NEW, PREFILL_CACHED = 2048, 2048
SCAN_SEQS, SCAN_TOKENS = 8, 1024
MOE_BATCHES = (1, 8, 64)
DECODE_ROWS = 32  # the C kernels' rows on CPU: a decode step of 32 sequences
ENGINE_BATCH, ENGINE_PROMPT, ENGINE_GEN = 64, 128, 64
REPEATS = 2  # engine and transformers runs of each length; the fastest counts

# Targets: (case name, share of the copy bandwidth it must reach)
TARGETS = {"decode attention": 0.70, "selective state update": 0.70, "moe_experts batch 64": 0.60}


@dataclass(slots=True)
class Row:
    name: str
    shape: str      # the workload, in words
    impl: str       # which implementation ran
    ms: float       # median time per call
    bytes: float    # the byte model: inputs read once + outputs written once
    flops: float
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / (self.ms * 1e-3) / 1e9

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12


@dataclass(slots=True)
class EngineRow:
    batch: int
    prompt_tokens: int
    gen_tokens: int
    layers: str                  # the hybrid pattern
    agentrt_tokens_per_s: float  # decode tokens/s (prefill subtracted, see measure_engine)
    hf_tokens_per_s: float

    @property
    def ratio(self) -> float:
        return self.agentrt_tokens_per_s / self.hf_tokens_per_s


@dataclass(slots=True)
class Report:
    shapes: Shapes
    device: str
    dtype: str
    iters: int
    copy_gbps: float
    matmul_tflops: float
    copy_what: str
    matmul_what: str
    rows: list[Row]
    machine: dict
    engine: EngineRow | None = None
    notes: list[str] = field(default_factory=list)

    def target(self, row: Row) -> tuple[float, bool] | None:
        """(goal, met) for a row with a target."""
        goal = TARGETS.get(row.name)
        return None if goal is None else (goal, row.gbps >= goal * self.copy_gbps)


# --- timing ----------------------------------------------------------------------------------------

def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: Any, iters: int, warmup: int | None = None) -> float:
    """Median milliseconds of `fn()` over `iters` calls after `warmup` calls (default 2 on CUDA,
    where the first call compiles the Triton kernel, 1 on CPU). CUDA events on a GPU."""
    import torch

    for _ in range(warmup if warmup is not None else 2 if device.type == "cuda" else 1):
        fn()
    _sync(device)
    times = []
    if device.type == "cuda":
        # each sample is `reps` back-to-back calls lasting >= ~1 ms, so the GPU's queue stays full
        # and a short kernel is not timed as its host-side launch overhead
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        reps = max(1, min(100, math.ceil(1e-3 / max(time.perf_counter() - t0, 1e-6))))
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_copy(device: Any, iters: int) -> tuple[float, str]:
    """GB/s of a large device-to-device copy, counting the bytes read and the bytes written."""
    import torch

    n = (1 << 30) if device.type == "cuda" else (64 << 20)  # bytes of the source
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, max(iters, 3))
    return 2 * n / (ms * 1e-3) / 1e9, f"copy_ of {n >> 20} MiB"


def measure_matmul(device: Any, dtype: Any, iters: int) -> tuple[float, str]:
    """TFLOP/s of a large square `torch.matmul` in `dtype`."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: torch.matmul(a, b), device, max(iters, 3))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul"


# --- the cases: each builds its inputs, times one call, returns a Row ------------------------------

@dataclass(slots=True)
class Ctx:
    shapes: Shapes
    device: Any
    dtype: Any
    iters: int
    triton: bool

    @property
    def esize(self) -> int:  # bytes per element of the model dtype
        import torch

        return torch.empty(0, dtype=self.dtype).element_size()

    def randn(self, *shape: int, scale: float = 1.0):
        import torch

        return (torch.randn(*shape, device=self.device) * scale).to(self.dtype)

    def time(self, fn: Callable[[], Any]) -> float:
        return time_ms(fn, self.device, self.iters)

    def impl(self, fn: Callable) -> str:
        """What ran: the Triton kernel, a torch reference (`*_ref`) or a fast torch path."""
        if self.triton:
            return "triton"
        return "torch ref" if fn.__name__.endswith("_ref") else "torch fast"


def _attention_inputs(c: Ctx, new: list[int], ctx: list[int]):
    """q for the new tokens, K/V pools holding every context position, and per-sequence slot tables."""
    import torch

    s = c.shapes
    total = sum(ctx)
    W = max(ctx)
    q = c.randn(sum(new), s.q_heads, s.head_dim)
    k_pool, v_pool = c.randn(total, s.kv_heads, s.head_dim), c.randn(total, s.kv_heads, s.head_dim)
    perm = torch.randperm(total, device=c.device).to(torch.int32)  # scattered slots, as in a real pool
    slot_table = torch.zeros(len(ctx), W, dtype=torch.int32, device=c.device)
    start = 0
    for b, n in enumerate(ctx):
        slot_table[b, :n] = perm[start:start + n]
        start += n
    cu = torch.tensor([0] + list(_cumsum(new)), dtype=torch.int32, device=c.device)
    lens = torch.tensor(ctx, dtype=torch.int32, device=c.device)
    return q, k_pool, v_pool, cu, slot_table, lens


def _cumsum(xs: list[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def _paged_attention(c: Ctx) -> Callable:
    if c.triton:
        from agentrt.kernels.triton_attention import paged_attention
        return paged_attention
    from agentrt.kernels.attention import paged_attention_ref
    return paged_attention_ref


def _attention_row(c: Ctx, name: str, shape: str, new: list[int], ctx: list[int]) -> Row:
    """Bytes: q and the output once; K and V of every context position of every sequence once;
    the slot-table entries read (int32). FLOPs: 2 matmuls (q.k, p.v) of 2*D per (query head, visible key)."""
    s = c.shapes
    q, k_pool, v_pool, cu, slot_table, lens = _attention_inputs(c, new, ctx)
    fn = _paged_attention(c)
    scale = s.head_dim ** -0.5
    ms = c.time(lambda: fn(q, k_pool, v_pool, cu, slot_table, lens, scale))
    e = c.esize
    nbytes = 2 * q.numel() * e + 2 * sum(ctx) * s.kv_heads * s.head_dim * e + 4 * sum(ctx)
    visible = sum(sum(range(L - n + 1, L + 1)) for n, L in zip(new, ctx))  # query j of n sees L-n+j+1 keys
    flops = 4 * s.q_heads * s.head_dim * visible
    return Row(name, shape, c.impl(fn), ms, nbytes, flops)


def case_decode_attention(c: Ctx) -> Row:
    split = ", split-K auto" if c.triton else ""
    return _attention_row(c, "decode attention", f"batch {DECODE_BATCH}, context {DECODE_CONTEXT}{split}",
                          [1] * DECODE_BATCH, [DECODE_CONTEXT] * DECODE_BATCH)


def case_prefill_attention(c: Ctx) -> Row:
    return _attention_row(c, "prefill attention", f"{PREFILL_NEW} new tokens over {PREFILL_CACHED} cached",
                          [PREFILL_NEW], [PREFILL_CACHED + PREFILL_NEW])


def case_write_kv(c: Ctx) -> Row:
    """Bytes: k and v of the new tokens read, the same bytes written to the pools, the slots (int64)."""
    import torch

    s = c.shapes
    T = PREFILL_NEW
    k, v = c.randn(T, s.kv_heads, s.head_dim), c.randn(T, s.kv_heads, s.head_dim)
    k_pool, v_pool = c.randn(4 * T, s.kv_heads, s.head_dim), c.randn(4 * T, s.kv_heads, s.head_dim)
    slots = torch.randperm(4 * T, device=c.device)[:T]
    if c.triton:
        from agentrt.kernels.triton_attention import write_kv as fn
    else:
        from agentrt.kernels.attention import write_kv_ref as fn
    ms = c.time(lambda: fn(k_pool, v_pool, k, v, slots))
    nbytes = 2 * 2 * k.numel() * c.esize + 8 * T
    return Row("write_kv", f"{T} tokens", c.impl(fn), ms, nbytes, 0.0)


def case_state_update(c: Ctx) -> Row:
    """Bytes: the fp32 state of each sequence read and written; x, dt, B, C read, y written;
    A, D and the slot indices. FLOPs: ~5 per state element (decay, dt*x*B add, C read-out)."""
    import torch

    s = c.shapes
    Bt, H, P, N, G = DECODE_BATCH, s.mamba_heads, s.mamba_head_dim, s.ssm_state, s.n_groups
    pool = torch.randn(2 * Bt, H, P, N, device=c.device) * 0.1
    idx = torch.randperm(2 * Bt, device=c.device)[:Bt].to(torch.int32)
    x, dt = c.randn(Bt, 1, H, P), (torch.rand(Bt, 1, H, device=c.device) * 0.1).to(c.dtype)
    A, D = -torch.rand(H, device=c.device), torch.ones(H, device=c.device)
    B, C = c.randn(Bt, 1, G, N), c.randn(Bt, 1, G, N)
    if c.triton:
        from agentrt.kernels.triton_mamba import selective_state_update_slots as fn
    else:
        from agentrt.kernels.mamba import selective_state_update_slots_ref as fn
    ms = c.time(lambda: fn(pool, idx, x, dt, A, B, C, D))
    e = c.esize
    nbytes = 2 * Bt * H * P * N * 4 + (2 * x.numel() + dt.numel() + B.numel() + C.numel()) * e + 2 * H * 4 + 4 * Bt
    return Row("selective state update", f"batch {Bt}, L=1", c.impl(fn), ms, nbytes, 5.0 * Bt * H * P * N)


def case_ssd_scan(c: Ctx) -> Row:
    """Bytes: x, dt, B, C read and y written once; each sequence's final fp32 state written (no
    initial state read). FLOPs: per chunk of L tokens, C.B^T (2*L*L*N per group) and its product
    with x (2*L*L*P per head) counted as dense tiles, the chunk state and the state read-out
    (2*L*P*N per head each)."""
    import torch

    s = c.shapes
    Bq, T, H, P, N, G, L = SCAN_SEQS, SCAN_SEQS * SCAN_TOKENS, s.mamba_heads, s.mamba_head_dim, s.ssm_state, \
        s.n_groups, s.chunk_size
    x, dt = c.randn(T, H, P), (torch.rand(T, H, device=c.device) * 0.1).to(c.dtype)
    A, D = -torch.rand(H, device=c.device), torch.ones(H, device=c.device)
    B, C = c.randn(T, G, N), c.randn(T, G, N)
    cu = torch.arange(0, T + 1, SCAN_TOKENS, device=c.device, dtype=torch.int32)
    pool = torch.zeros(Bq, H, P, N, device=c.device)
    idx = torch.arange(Bq, device=c.device, dtype=torch.int32)
    has_init = torch.zeros(Bq, dtype=torch.bool, device=c.device)
    if c.triton:
        from agentrt.kernels.triton_ssd import ssd_scan_varlen as fn
    else:
        fn = ssd_scan_varlen_torch
    ms = c.time(lambda: fn(x, dt, A, B, C, D, L, cu, pool, idx, has_init))
    nbytes = (2 * x.numel() + dt.numel() + 2 * B.numel()) * c.esize + Bq * H * P * N * 4 + 2 * H * 4
    chunks = Bq * math.ceil(SCAN_TOKENS / L)
    flops = chunks * (G * 2 * L * L * N + H * 2 * L * L * P + H * 4 * L * P * N)
    return Row("SSD scan varlen", f"{Bq} sequences x {SCAN_TOKENS} tokens, chunk {L}", c.impl(fn), ms, nbytes, flops)


def ssd_scan_varlen_torch(x, dt, A, B, C, D, chunk_size, cu_seqlens, ssm_pool, state_idx, has_initial_state):
    """The CPU path of `ssd_scan_varlen`: the fast torch `ssd_scan` once per sequence, with the
    arguments and results of `kernels.mamba_varlen.ssd_scan_varlen_ref`."""
    import torch

    from agentrt.kernels.mamba import ssd_scan

    y = torch.empty_like(x)
    cu, slots, has_init = cu_seqlens.tolist(), state_idx.tolist(), has_initial_state.tolist()
    for b in range(len(cu) - 1):
        s, e, slot = cu[b], cu[b + 1], slots[b]
        init = ssm_pool[slot].float().unsqueeze(0) if has_init[b] else None
        if e == s:
            ssm_pool[slot] = init[0] if init is not None else 0
            continue
        yb, final = ssd_scan(x[None, s:e], dt[None, s:e], A, B[None, s:e], C[None, s:e], D, chunk_size, init)
        y[s:e] = yb[0]
        ssm_pool[slot] = final[0]
    return y


def case_conv_varlen(c: Ctx) -> Row:
    """Bytes: x read and y written once, weight and bias, each sequence's K-1 state written.
    FLOPs: 2*K per channel and token."""
    import torch

    s = c.shapes
    Bq, T, Ch, K = SCAN_SEQS, SCAN_SEQS * SCAN_TOKENS, s.conv_channels, s.conv_kernel
    x, w, bias = c.randn(T, Ch), c.randn(Ch, K, scale=0.5), c.randn(Ch, scale=0.1)
    pool = c.randn(Bq, Ch, K - 1)
    idx = torch.arange(Bq, device=c.device, dtype=torch.int32)
    has_init = torch.zeros(Bq, dtype=torch.bool, device=c.device)
    cu = torch.arange(0, T + 1, SCAN_TOKENS, device=c.device, dtype=torch.int32)
    if c.triton:
        from agentrt.kernels.triton_mamba import causal_conv1d_varlen
        fn = causal_conv1d_varlen
        call = lambda: fn(x, w, bias, pool, idx, has_init, cu, max_seqlen=SCAN_TOKENS)  # noqa: E731
    else:
        from agentrt.kernels.mamba import causal_conv1d_varlen_ref as fn
        call = lambda: fn(x, w, bias, pool, idx, has_init, cu)  # noqa: E731
    ms = c.time(call)
    nbytes = (2 * x.numel() + w.numel() + bias.numel() + pool.numel()) * c.esize
    return Row("conv1d varlen", f"{Bq} sequences x {SCAN_TOKENS} tokens, {Ch} channels", c.impl(fn), ms, nbytes,
               2.0 * K * T * Ch)


def case_conv_update(c: Ctx) -> Row:
    """Bytes: x read, y written, each sequence's K-1 state read and written, weight and bias."""
    import torch

    s = c.shapes
    Bt, Ch, K = DECODE_BATCH, s.conv_channels, s.conv_kernel
    x, w, bias = c.randn(Bt, Ch), c.randn(Ch, K, scale=0.5), c.randn(Ch, scale=0.1)
    pool = c.randn(2 * Bt, Ch, K - 1)
    idx = torch.randperm(2 * Bt, device=c.device)[:Bt]
    if c.triton:
        from agentrt.kernels.triton_mamba import causal_conv1d_update_slots as fn
    else:
        from agentrt.kernels.mamba import causal_conv1d_update_slots_ref as fn
    ms = c.time(lambda: fn(x, pool, idx, w, bias))
    nbytes = (2 * x.numel() + 2 * Bt * Ch * (K - 1) + w.numel() + bias.numel()) * c.esize + 8 * Bt
    return Row("conv1d update", f"batch {Bt}, {Ch} channels", c.impl(fn), ms, nbytes, 2.0 * K * Bt * Ch)


def case_gated_rmsnorm(c: Ctx) -> Row:
    """Bytes: x and gate read, y written, the weight. FLOPs: ~8 per element (silu, square, scale)."""
    s = c.shapes
    T, Dm = SCAN_SEQS * SCAN_TOKENS, s.mamba_inner
    x, gate, w = c.randn(T, Dm), c.randn(T, Dm), c.randn(Dm)
    if c.triton:
        from agentrt.kernels.triton_mamba import gated_rmsnorm as fn
    else:
        from agentrt.kernels.mamba import gated_rmsnorm_ref as fn
    ms = c.time(lambda: fn(x, gate, w, Dm // s.n_groups, 1e-5))
    return Row("gated RMSNorm", f"{T} tokens x {Dm}", c.impl(fn), ms, (3 * x.numel() + Dm) * c.esize, 8.0 * T * Dm)


def _routing(c: Ctx, T: int):
    """Each token's top-k of distinct random experts, with softmax weights (fp32)."""
    import torch

    s = c.shapes
    scores = torch.rand(T, s.experts, device=c.device)
    weights, ids = scores.topk(s.top_k, dim=-1)
    return ids, weights.softmax(-1)


def _expert_weights(c: Ctx):
    s = c.shapes
    up = c.randn(s.experts, s.expert_intermediate, s.hidden, scale=s.hidden ** -0.5)
    down = c.randn(s.experts, s.hidden, s.expert_intermediate, scale=s.expert_intermediate ** -0.5)
    return up, down


def _moe_bytes(c: Ctx, T: int, ids) -> tuple[float, int]:
    """The bandwidth roofline's bytes: the up and down weights of every distinct expert the batch
    routes to, x read and the output written, the routing ids (int64) and weights (fp32)."""
    s = c.shapes
    touched = int(ids.unique().numel())
    weights = touched * 2 * s.expert_intermediate * s.hidden * c.esize
    return weights + 2 * T * s.hidden * c.esize + T * s.top_k * (8 + 4), touched


def case_moe_experts(c: Ctx, T: int, up=None, down=None) -> Row:
    """FLOPs: per (token, choice) pair the up and the down projection, 2*I*hidden each."""
    s = c.shapes
    if up is None:
        up, down = _expert_weights(c)
    x = c.randn(T, s.hidden)
    ids, weights = _routing(c, T)
    if c.triton:
        from agentrt.kernels.triton_moe import moe_experts as fn
    else:
        from agentrt.kernels.moe import moe_experts as fn
    ms = c.time(lambda: fn(x, up, down, ids, weights))
    nbytes, touched = _moe_bytes(c, T, ids)
    flops = 4.0 * T * s.top_k * s.expert_intermediate * s.hidden
    return Row(f"moe_experts batch {T}", f"{s.experts} experts top-{s.top_k}, {touched} touched", c.impl(fn), ms,
               nbytes, flops)


def case_moe_forward(c: Ctx, T: int = 64, up=None, down=None) -> Row:
    """Bytes: `case_moe_experts`' plus the shared expert's up and down weights. FLOPs: plus the
    shared expert, 2 * 2*S*hidden per token."""
    s = c.shapes
    if up is None:
        up, down = _expert_weights(c)
    shared_up = c.randn(s.shared_intermediate, s.hidden, scale=s.hidden ** -0.5)
    shared_down = c.randn(s.hidden, s.shared_intermediate, scale=s.shared_intermediate ** -0.5)
    x = c.randn(T, s.hidden)
    ids, weights = _routing(c, T)
    if c.triton:
        from agentrt.kernels.triton_moe import moe_forward as fn
    else:
        from agentrt.kernels.moe import moe_forward_ref as fn
    ms = c.time(lambda: fn(x, up, down, ids, weights, shared_up, shared_down))
    nbytes, touched = _moe_bytes(c, T, ids)
    nbytes += 2 * s.shared_intermediate * s.hidden * c.esize
    flops = 4.0 * T * (s.top_k * s.expert_intermediate + s.shared_intermediate) * s.hidden
    return Row(f"moe_forward batch {T}", f"experts + shared expert, {touched} touched", c.impl(fn), ms, nbytes, flops)


def cpu_rows(c: Ctx, up, down) -> list[Row]:
    """On CPU with the C kernels built: each C kernel beside the torch operator it replaces, on the
    same inputs (decode attention; decode and prefill sizes of the Mamba in-projection and of the
    routed experts)."""
    import torch.nn.functional as F

    from agentrt.kernels import cpu
    from agentrt.kernels.moe import moe_experts

    s = c.shapes
    rows = []
    n_out = 2 * s.mamba_inner + 2 * s.n_groups * s.ssm_state + s.mamba_heads
    w = c.randn(n_out, s.hidden, scale=s.hidden ** -0.5)
    packed = cpu.PackedLinear(w)
    for M, what in ((DECODE_ROWS, "decode"), (PREFILL_NEW, "prefill")):
        x = c.randn(M, s.hidden)
        nbytes = (M * s.hidden + n_out * s.hidden + M * n_out) * c.esize
        flops = 2.0 * M * s.hidden * n_out
        shape = f"{M} x {s.hidden} -> {n_out} (Mamba in-projection, {what})"
        rows.append(Row("linear", shape, "torch", c.time(lambda: F.linear(x, w)), nbytes, flops))
        rows.append(Row("linear", shape, "C packed", c.time(lambda: cpu.linear(x, packed)), nbytes, flops))
    ctx = [DECODE_CONTEXT] * DECODE_BATCH  # decode attention: `case_decode_attention`'s workload, in C
    q, k_pool, v_pool, _, slot_table, _ = _attention_inputs(c, [1] * DECODE_BATCH, ctx)
    table = cpu.DecodeTable(slot_table[:, :0].reshape(-1).long(), list(slot_table.long()), k_pool.shape[0])
    nbytes = 2 * q.numel() * c.esize + 2 * sum(ctx) * s.kv_heads * s.head_dim * c.esize + 8 * sum(ctx)
    rows.append(Row("decode attention", f"batch {DECODE_BATCH}, context {DECODE_CONTEXT}", "C",
                    c.time(lambda: cpu.decode_attention(q, k_pool, v_pool, table, s.head_dim ** -0.5)), nbytes,
                    4.0 * s.q_heads * s.head_dim * sum(ctx)))
    experts = cpu.PackedExperts(up, down)
    for T in (DECODE_ROWS, PREFILL_NEW):
        x = c.randn(T, s.hidden)
        ids, weights = _routing(c, T)
        nbytes, touched = _moe_bytes(c, T, ids)
        flops = 4.0 * T * s.top_k * s.expert_intermediate * s.hidden
        shape = f"{s.experts} experts top-{s.top_k}, {touched} touched"
        rows.append(Row(f"moe_experts batch {T}", shape, "torch fast",
                        c.time(lambda: moe_experts(x, up, down, ids, weights)), nbytes, flops))
        rows.append(Row(f"moe_experts batch {T}", shape, "C packed",
                        c.time(lambda: cpu.moe_experts_packed(x, experts, ids, weights)), nbytes, flops))
    return rows


CASES: list[Callable[[Ctx], Row]] = [case_decode_attention, case_prefill_attention, case_write_kv, case_state_update,
                                     case_ssd_scan, case_conv_varlen, case_conv_update, case_gated_rmsnorm]


# --- engine vs transformers ------------------------------------------------------------------------

def layer_pattern(layers: int) -> str:
    """A hybrid pattern of `layers` layers: Mamba, attention, Mamba, MoE, repeated ("M*ME" for 4)."""
    return ("M*ME" * (layers // 4 + 1))[:layers]


def write_checkpoint(directory: Any, shapes: Shapes, layers: int, dtype: Any, seed: int = 0) -> None:
    """A random NemotronH with `shapes`' layer dimensions, as a Hugging Face checkpoint (with the
    embedded model's tokenizer, whose ids all lie below the vocabulary size)."""
    import json

    import torch
    from safetensors.torch import save_file

    from agentrt.model import ModelConfig, NemotronH
    from agentrt.model.tiny import TINY_CONFIG, _init_weights, checkpoint_tensors
    from agentrt.model.tiny_tokenizer import TINY_EOS_TOKENS, write_tiny_tokenizer

    write_tiny_tokenizer(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    cfg = {k: v for k, v in TINY_CONFIG.items() if k not in ("num_nextn_predict_layers", "mtp_hybrid_override_pattern",
                                                            "moe_latent_size")}
    s = shapes
    cfg.update(vocab_size=s.vocab_size, hidden_size=s.hidden, hybrid_override_pattern=layer_pattern(layers),
               num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
               intermediate_size=s.shared_intermediate, mamba_num_heads=s.mamba_heads, mamba_head_dim=s.mamba_head_dim,
               ssm_state_size=s.ssm_state, n_groups=s.n_groups, conv_kernel=s.conv_kernel, chunk_size=s.chunk_size,
               n_routed_experts=s.experts, num_experts_per_tok=s.top_k, moe_intermediate_size=s.expert_intermediate,
               moe_shared_expert_intermediate_size=s.shared_intermediate,
               torch_dtype=str(dtype).removeprefix("torch."), bos_token_id=ids["<s>"], pad_token_id=ids["<pad>"],
               eos_token_id=ids[TINY_EOS_TOKENS[0]])
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": ids["<s>"], "eos_token_id": [ids[t] for t in TINY_EOS_TOKENS],
                  "pad_token_id": ids["<pad>"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    with torch.device("cpu"):
        model = NemotronH(ModelConfig.from_dict(cfg))
    _init_weights(model, seed)
    save_file({k: v.to(dtype) for k, v in checkpoint_tensors(model).items()}, directory / "model.safetensors",
              metadata={"format": "pt"})


def _prompts(seed: int, batch: int, n: int, first_id: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(f"agentrt-bench-kernels/{seed}")
    return [[rng.randrange(first_id, vocab) for _ in range(n)] for _ in range(batch)]


def measure_engine(shapes: Shapes, layers: int, device: Any, dtype: Any,
                   log: Callable[[str], None]) -> EngineRow:
    """Decode tokens/s of our Engine and of transformers' batched generate, same weights and prompts.

    Each side generates, always on fresh prompts (so the prefix cache never helps), 1 token
    (prefill + first token) and ENGINE_GEN tokens, each REPEATS times, the fastest kept; decode
    tokens/s = batch * (ENGINE_GEN - 1) / (the difference of the two wall times), so prefill is
    left out of both.
    """
    import asyncio
    import gc
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from agentrt.bench.engine import hf_greedy, release_memory
    from agentrt.model import Engine, EngineConfig, Request, SamplingParams, load
    from agentrt.model.compute import compute

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    B, n, G = ENGINE_BATCH, ENGINE_PROMPT, ENGINE_GEN
    with tempfile.TemporaryDirectory(prefix="agentrt-bench-kernels-") as tmp:
        path = Path(tmp)
        log(f"writing a random {layers}-layer NemotronH ({layer_pattern(layers)}) at {shapes.name} shapes")
        compute.call(write_checkpoint, path, shapes, layers, dtype)
        lm = load(path, device=device, dtype=dtype)
        first_id = max(lm.tokenizer.special_token_ids, default=-1) + 1
        vocab = min(lm.tokenizer.vocab_size, lm.config.vocab_size)

        def prompts(seed: int) -> list[list[int]]:
            return _prompts(seed, B, n, first_id, vocab)

        async def engine_runs() -> list[float]:
            async with Engine(lm, EngineConfig(max_running=B)) as engine:
                async def batch(ps: list[list[int]], gen: int) -> float:
                    t0 = time.perf_counter()
                    sampling = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
                    results = await asyncio.gather(*(engine.submit(Request(p, sampling)).result() for p in ps))
                    if any(len(r.token_ids) != gen for r in results):
                        raise RuntimeError(f"the engine did not generate {gen} tokens per request")
                    return time.perf_counter() - t0

                await batch(prompts(-1), G)  # warm-up at the timed shapes: CUDA compiles Triton kernels per shape
                return [min([await batch(prompts(10 * r + 1), 1) for r in range(REPEATS)]),
                        min([await batch(prompts(10 * r + 2), G) for r in range(REPEATS)])]

        log(f"agentrt Engine: batch {B}, prompt {n}, {G} tokens greedy")
        t1, tg = asyncio.run(engine_runs())
        ours = B * (G - 1) / _decode_seconds("agentrt", t1, tg)
        del lm
        release_memory()  # the engine's pools took most of the GPU; transformers needs it now

        log("transformers generate on the same weights")
        hf = compute.call(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval())

        def hf_time(ps: list[list[int]], gen: int) -> float:
            t0 = time.perf_counter()
            hf_greedy(hf, ps, gen)
            _sync(device)
            return time.perf_counter() - t0

        compute.call(hf_time, prompts(-1), 2)  # warm-up
        h1 = min(compute.call(hf_time, prompts(10 * r + 1), 1) for r in range(REPEATS))
        hg = min(compute.call(hf_time, prompts(10 * r + 2), G) for r in range(REPEATS))
        theirs = B * (G - 1) / _decode_seconds("transformers", h1, hg)
        del hf
        gc.collect()
    return EngineRow(B, n, G, layer_pattern(layers), ours, theirs)


def _decode_seconds(who: str, one: float, many: float) -> float:
    """The decode part of a run: the G-token run's time less the 1-token run's (prefill)."""
    if many <= one:
        raise RuntimeError(f"{who}: the {ENGINE_GEN}-token runs ({many:.3f} s) were no slower than the 1-token runs "
                           f"({one:.3f} s), so no decode time can be read off them; something other than decoding "
                           "(a compile, a first allocation) dominates the runs")
    return many - one


# --- the run ---------------------------------------------------------------------------------------

def default_shapes(device: Any) -> str:
    return "nano" if device.type == "cuda" else "small"


def run_benchmark(shapes: str | None = None, layers: int = 4, iters: int = 20, skip_engine: bool = False,
                  device: Any = None, log: Callable[[str], None] = lambda _: None) -> Report:
    """Measure the ceilings, every kernel case, then (unless skipped) the engine against transformers."""
    import torch

    from agentrt import __version__
    from agentrt.kernels import cpu as cpu_kernels
    from agentrt.kernels import use_triton

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = shapes or default_shapes(device)
    if shapes not in SHAPES:
        raise ValueError(f"shapes {shapes!r}: choose one of {', '.join(SHAPES)}")
    if iters < 1 or layers < 1:
        raise ValueError(f"iters={iters} and layers={layers} must be >= 1")
    s = SHAPES[shapes]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    machine = tables.machine_info("agentrt", __version__)
    torch.manual_seed(0)
    with torch.inference_mode():
        log("measuring copy bandwidth and matmul rate")
        copy_gbps, copy_what = measure_copy(device, iters)
        matmul_tflops, matmul_what = measure_matmul(device, dtype, iters)
        c = Ctx(s, device, dtype, iters, use_triton(device))
        rows = []
        for case in CASES:
            log(f"  {case.__name__.removeprefix('case_')}")
            rows.append(case(c))
        up, down = _expert_weights(c)  # shared by the MoE rows
        for T in MOE_BATCHES:
            log(f"  moe_experts batch {T}")
            rows.append(case_moe_experts(c, T, up, down))
        log("  moe_forward batch 64")
        rows.append(case_moe_forward(c, 64, up, down))
        if device.type == "cpu" and dtype == torch.float32 and cpu_kernels.available():
            log("  the C kernels of the CPU path")
            rows.extend(cpu_rows(c, up, down))
        del up, down
    report = Report(s, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    str(dtype).removeprefix("torch."), iters, copy_gbps, matmul_tflops, copy_what, matmul_what,
                    rows, machine)
    if not c.triton:
        report.notes.append("torch paths (no Triton on this device): the targets are the GPU kernels'")
    if not skip_engine:
        report.engine = measure_engine(s, layers, device, dtype, log)
    return report


# --- formatting ------------------------------------------------------------------------------------

HEADER = ["kernel", "shape", "impl", "ms", "GB/s", "% copy BW", "TFLOP/s", "% matmul", "target"]


def _num(v: float) -> str:
    """Three significant digits at least, so a slow CPU case never prints as 0.0."""
    return f"{v:,.1f}" if v >= 100 else f"{v:.3g}"


def _rows(r: Report) -> list[list[str]]:
    out = []
    for row in r.rows:
        t = r.target(row)
        target = "" if t is None else f">= {t[0]:.0%} BW: {'met' if t[1] else 'not met'}"
        out.append([row.name, row.shape, row.impl, _num(row.ms), _num(row.gbps),
                    f"{row.gbps / r.copy_gbps:.1%}", _num(row.tflops), f"{row.tflops / r.matmul_tflops:.1%}",
                    target or "-"])
    return out


def _header_lines(r: Report) -> list[str]:
    return [f"shapes: {r.shapes.name} on {r.device} in {r.dtype}, median of {r.iters} calls",
            f"copy bandwidth: {r.copy_gbps:,.1f} GB/s ({r.copy_what}, read + write)",
            f"matmul rate: {r.matmul_tflops:.3f} TFLOP/s ({r.matmul_what})"]


def _engine_lines(r: Report) -> list[str]:
    e = r.engine
    if e is None:
        return []
    return [f"engine decode ({e.layers}, batch {e.batch}, prompt {e.prompt_tokens}, {e.gen_tokens} tokens greedy): "
            f"agentrt {e.agentrt_tokens_per_s:,.1f} tokens/s, transformers {e.hf_tokens_per_s:,.1f} tokens/s, "
            f"ratio {e.ratio:.2f}x"]


def format_text(r: Report) -> str:
    return "\n".join([*_header_lines(r), "", *tables.text_table(HEADER, _rows(r)), "", *_engine_lines(r),
                      *(f"note: {n}" for n in r.notes), tables.machine_line(r.machine)])


def format_markdown(r: Report, command: str) -> str:
    return "\n".join([tables.markdown_table(command, HEADER, _rows(r)), "",
                      *(f"- {line}" for line in _header_lines(r) + _engine_lines(r)),
                      *(f"- note: {n}" for n in r.notes), "", tables.machine_line(r.machine)])
