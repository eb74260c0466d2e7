"""C kernels for the CPU path, built at first use with the system C compiler and called through ctypes.

On CPU, eager PyTorch spends most of a small model's decode step on operator overhead rather
than arithmetic; where one layer needs dozens of small operators, one C function does the same
work in a single pass over its data. The sources sit beside this module (`cpu_*.c`); each is
compiled once per source and machine (`-O3 -march=native`, OpenMP on the caller's thread team)
into `$AGENTRT_HOME/kernels/` and reused by later processes. Each kernel is checked against its
torch reference (tests/test_cpu_kernels.py).

Nothing depends on them: without a C compiler, or with `AGENTRT_CPU_KERNELS=0` (or
`AGENTRT_KERNELS=ref`), the engine keeps the torch paths and `available()` is false. A failed
build says why once, as a warning, and falls back the same way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from agentrt.kernels import KERNELS_ENV

CPU_KERNELS_ENV = "AGENTRT_CPU_KERNELS"
SOURCES = ("cpu_mamba.c", "cpu_moe.c", "cpu_attention.c", "cpu_norm.c", "cpu_linear.c")
# Compiled with -ffast-math but linked without it: linking with it would add crtfastmath.o, whose
# constructor turns on flush-to-zero for the whole process when the library loads.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC")

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "agentrt_mamba_mix_f32": [_i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr,
                              _ptr, _ptr, _ptr, _f32, _f32, _i64, _ptr, _ptr, _ptr, _ptr, ctypes.c_int],
    "agentrt_rms_norm_f32": [_i64, _i64, _ptr, _i64, _ptr, _f32, _ptr, ctypes.c_int],
    "agentrt_linear_f32": [_i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, ctypes.c_int, _ptr, _i64, ctypes.c_int],
    "agentrt_linear_vector_width": [],
    "agentrt_moe_packed_f32": [_i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_int],
    "agentrt_decode_attention_f32": [_i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _f32, _ptr,
                                     _ptr, ctypes.c_int],
}
_RESTYPES = {"agentrt_moe_packed_f32": ctypes.c_int, "agentrt_linear_vector_width": ctypes.c_int}


def enabled() -> bool:
    """Whether the environment allows the C kernels (`AGENTRT_CPU_KERNELS=0` or `AGENTRT_KERNELS=ref` forbid).

    Read on every call (a test or a user may change it at run time), decided once per pair of values.
    """
    return _enabled(_getenv(CPU_KERNELS_ENV), _getenv(KERNELS_ENV))


# os.environ.get costs ~0.7 us (it encodes the key on every call) and the switches are read on
# every kernel dispatch, dozens of times a decode step: on POSIX read the mapping os.environ keeps
# (and writes through on assignment) with the keys encoded once.
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS = {name: os.fsencode(name) for name in (CPU_KERNELS_ENV, KERNELS_ENV)}


def _getenv(name: str) -> str | None:
    if _ENVIRON is None:
        return os.environ.get(name)
    value = _ENVIRON.get(_ENV_KEYS[name])
    return None if value is None else os.fsdecode(value)


@functools.lru_cache(maxsize=16)
def _enabled(flag: str | None, mode: str | None) -> bool:
    from agentrt.kernels import kernel_mode

    flag = (flag or "1").strip().lower()
    if flag not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        raise ValueError(f"{CPU_KERNELS_ENV}={flag!r}: use 1 to allow the C kernels of the CPU path or 0 to keep "
                         "the torch paths")
    return flag not in ("0", "false", "no", "off") and kernel_mode() != "ref"


def available() -> bool:
    """Whether the C kernels can be used here (allowed, and built or buildable)."""
    return enabled() and library() is not None


def _cache_dir() -> Path:
    home = Path(os.environ.get("AGENTRT_HOME", Path.home() / ".cache" / "agentrt"))
    return home / "kernels"


def _machine_key() -> str:
    """What a `-march=native` build depends on besides the source: the CPU's flags and the compiler."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}|{os.environ.get('CC', '')}"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(target: Path, sources: list[Path], flags: tuple[str, ...] = COMPILE_FLAGS) -> str | None:
    """Compile the sources into `target` (atomically); return None on success, else the reason."""
    cc = _compiler()
    if cc is None:
        return "no C compiler found (set CC, or install gcc)"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        errors = ""
        for openmp in (["-fopenmp"], []):  # without OpenMP the kernels run on one thread
            objects = [str(Path(tmp) / f"{src.stem}.o") for src in sources]
            steps = [[cc, *flags, *openmp, "-c", str(src), "-o", obj] for src, obj in zip(sources, objects)]
            steps.append([cc, "-shared", *openmp, *objects, "-o", str(Path(tmp) / "lib.so"), "-lm"])
            for cmd in steps:
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    errors = done.stderr.strip()[-2000:]
                    break
            else:
                os.replace(Path(tmp) / "lib.so", target)
                return None
        return f"{cc} failed: {errors}"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels (building them if this source and machine have no build yet), or None."""
    if not enabled() or platform.system() == "Windows":
        return None
    here = Path(__file__).resolve().parent
    sources = [here / name for name in SOURCES]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    digest.update(" ".join(COMPILE_FLAGS).encode())
    digest.update(_machine_key().encode())
    target = _cache_dir() / f"cpu-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        reason = _build(target, sources)
        if reason is not None:
            warnings.warn(f"agentrt: the C kernels of the CPU path could not be built, using the torch paths: {reason}",
                          RuntimeWarning, stacklevel=2)
            return None
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name)
    return lib


def _built(check: str) -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the C kernels are not available here; check {check}() first")
    return lib


def _ptr_of(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def mamba_mix_fits(zxbcdt: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor) -> bool:
    """Whether `mamba_mix` takes these tensors: float32 on CPU, and the kernels available."""
    return (zxbcdt.is_cpu and zxbcdt.dtype == conv_pool.dtype == ssm_pool.dtype == torch.float32
            and available())


def mamba_mix(zxbcdt: torch.Tensor, cu_seqlens: list[int], slots: torch.Tensor, conv_pool: torch.Tensor,
              ssm_pool: torch.Tensor, *, heads: int, groups: int, dt_bias: torch.Tensor, A_log: torch.Tensor,
              D: torch.Tensor, conv_weight_t: torch.Tensor, conv_bias: torch.Tensor | None, norm_weight: torch.Tensor,
              dt_min: float, eps: float, group_size: int) -> torch.Tensor:
    """`mamba_mix_varlen_ref` in C: the Mamba-2 mixer between in- and out-projection, states in place.

    zxbcdt: [T, inner + conv_dim + heads], the in-projection of T tokens of len(cu_seqlens) - 1
    sequences end to end; slots: [B] int64, each sequence's (distinct) slot in conv_pool [S, conv_dim, K-1]
    and ssm_pool [S, heads, head_dim, N] (both float32, updated in place: every sequence continues
    from what its slot holds); conv_weight_t: [K, conv_dim] (the conv weight, tap-major). Returns
    [T, inner] float32.
    """
    lib = _built("mamba_mix_fits")
    T, width = zxbcdt.shape
    S, conv_dim, window = conv_pool.shape
    head_dim, state = ssm_pool.shape[2], ssm_pool.shape[3]
    inner = width - conv_dim - heads
    nseq = len(cu_seqlens) - 1
    if zxbcdt.stride(1) != 1 or cu_seqlens[-1] != T or slots.shape != (nseq,) or inner != heads * head_dim:
        raise ValueError(f"mamba_mix: zxbcdt {tuple(zxbcdt.shape)} (row stride {zxbcdt.stride(0)}), "
                         f"{nseq} sequences of {cu_seqlens[-1]} tokens, slots {tuple(slots.shape)}, "
                         f"heads {heads} x head_dim {head_dim}: shapes do not agree")
    if not (conv_pool.is_contiguous() and ssm_pool.is_contiguous() and slots.dtype == torch.int64
            and conv_weight_t.shape == (window + 1, conv_dim) and conv_weight_t.is_contiguous()):
        raise ValueError("mamba_mix: pools and conv_weight_t must be contiguous, slots int64")
    if nseq:  # the kernel indexes the pools with these: out of range would be out of bounds
        lo, hi = torch.aminmax(slots)
        if int(lo) < 0 or int(hi) >= min(S, ssm_pool.shape[0]):
            raise ValueError(f"mamba_mix: slots must lie in [0, {min(S, ssm_pool.shape[0])}), got {int(lo)}..{int(hi)}")
    if any(b < a for a, b in zip(cu_seqlens, cu_seqlens[1:])) or cu_seqlens[0] != 0:
        raise ValueError(f"mamba_mix: cu_seqlens must start at 0 and never decrease, got {cu_seqlens[:8]}...")
    params = [p.detach().float().contiguous() for p in (dt_bias, A_log, D, norm_weight)]
    bias = None if conv_bias is None else conv_bias.detach().float().contiguous()
    cu = torch.tensor(cu_seqlens, dtype=torch.int64)
    slots = slots.contiguous()
    work = torch.empty(T, conv_dim + inner, dtype=torch.float32)
    out = torch.empty(T, inner, dtype=torch.float32)
    lib.agentrt_mamba_mix_f32(
        nseq, cu.data_ptr(), slots.data_ptr(), heads, head_dim, state, groups, window + 1, inner,
        zxbcdt.data_ptr(), zxbcdt.stride(0), params[0].data_ptr(), params[1].data_ptr(), params[2].data_ptr(),
        conv_weight_t.data_ptr(), _ptr_of(bias), params[3].data_ptr(), dt_min, eps, group_size,
        conv_pool.data_ptr(), ssm_pool.data_ptr(), work.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def _no_grad_needed(*tensors: torch.Tensor) -> bool:
    """The kernels record nothing for autograd: they may run only where no gradient is wanted."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` takes these: float32 on CPU, rows of unit stride, no gradient wanted, and
    the kernels available."""
    return (x.is_cpu and x.dtype == weight.dtype == torch.float32 and x.dim() == 2
            and x.stride(1) == 1 and _no_grad_needed(x, weight) and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, weight.shape, weight, eps)` in C. x: [T, H] float32 with x.stride(1) == 1;
    weight: [H]. Returns a new [T, H] tensor."""
    lib = _built("rms_norm_fits")
    T, H = x.shape
    if weight.shape != (H,) or x.stride(1) != 1:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} (strides {x.stride()}) and weight {tuple(weight.shape)}: "
                         "rows of unit stride and one weight per column")
    weight = weight.detach().contiguous()
    y = torch.empty(T, H, dtype=torch.float32)
    lib.agentrt_rms_norm_f32(T, H, x.data_ptr(), x.stride(0), weight.data_ptr(), eps, y.data_ptr(),
                             torch.get_num_threads())
    return y


LINEAR_PANEL = 16  # output columns per packed panel (PANEL in cpu_linear.c)


class PackedLinear:
    """One or more linear maps over the same input, repacked for `linear`: the weights [N_i, K]
    stacked along N and cut into panels of 16 output columns, k-major ([ceil(N / 16), K, 16], zero
    past N), the biases (absent ones zero) padded alike. A copy, made once; `stale` tells when a
    source changed since (an optimizer step or a load bumps its version; a move gives it new
    storage). Several maps packed together are one call whose output columns are theirs in order."""

    def __init__(self, weights: torch.Tensor | Sequence[torch.Tensor],
                 biases: torch.Tensor | None | Sequence[torch.Tensor | None] = None):
        weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
        if biases is None:
            biases = [None] * len(weights)
        elif isinstance(biases, torch.Tensor):
            biases = [biases]
        else:
            biases = list(biases)
        if not weights or any(w.dim() != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
            raise ValueError(f"PackedLinear: weights [out, in] are 2-D with one input size, got "
                             f"{[tuple(w.shape) for w in weights]}")
        if len(biases) != len(weights) or any(b is not None and b.shape != (w.shape[0],)
                                                  for w, b in zip(weights, biases)):
            raise ValueError(f"PackedLinear: one bias [out] (or None) per weight, got {len(biases)} for {len(weights)}")
        self.in_features = weights[0].shape[1]
        self.splits = [w.shape[0] for w in weights]
        self.out_features = sum(self.splits)
        pad = -self.out_features % LINEAR_PANEL
        w = torch.cat([t.detach() for t in weights] + [weights[0].new_zeros(pad, self.in_features)])
        self.panels = w.view(w.shape[0] // LINEAR_PANEL, LINEAR_PANEL, self.in_features).transpose(1, 2).contiguous()
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else w.new_zeros(n) for b, n in zip(biases, self.splits)]
                                  + [w.new_zeros(pad)]).contiguous()
        self._sources = [t for t in (*weights, *biases) if t is not None]
        self._identity = [_identity(t) for t in self._sources]

    def stale(self, *sources: torch.Tensor | None) -> bool:
        """Whether these (the weights then the biases given at packing, Nones skipped) changed since."""
        return [_identity(t) for t in sources if t is not None] != self._identity


def _identity(t: torch.Tensor) -> tuple[int, int, int]:
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter (and cannot change outside inference)
        version = -1
    return t.data_ptr(), version, t.numel()


def linear_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` is the faster path: float32 on CPU, no gradient wanted, and the kernels built
    for a machine with vectors of at least 8 floats (AVX and up; with narrower ones the platform's
    BLAS wins at prefill sizes)."""
    return (x.is_cpu and x.dtype == weight.dtype == torch.float32 and x.shape[-1] == weight.shape[1]
            and _no_grad_needed(x, weight) and available() and _linear_vector_width() >= 8)


@functools.cache
def _linear_vector_width() -> int:
    return library().agentrt_linear_vector_width()


def linear(x: torch.Tensor, packed: PackedLinear, relu2: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in C from the packed maps (their outputs side by side), then
    relu(.)^2 if asked. x: [..., K] float32. Every output is one in-order sum over K, so a row's
    result does not depend on its batch."""
    lib = _built("linear_fits")
    N, K = packed.out_features, packed.in_features
    if x.shape[-1] != K:
        raise ValueError(f"linear: x {tuple(x.shape)} and a packed weight [{N}, {K}]: shapes do not agree")
    flat = x.dim() == 2 and x.stride(1) == 1
    x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        lib.agentrt_linear_f32(M, N, K, x2.data_ptr(), x2.stride(0), packed.panels.data_ptr(), _ptr_of(packed.bias),
                               int(relu2), y.data_ptr(), N, torch.get_num_threads())
    return y if flat else y.view(*x.shape[:-1], N)


class PackedExperts:
    """Routed experts' weights (up [E, I, Din], down [E, Din, I]) packed expert by expert as `linear`
    packs a weight: up [E, ceil(I / 16), Din, 16], down [E, ceil(Din / 16), I, 16]."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        if up.dim() != 3 or down.dim() != 3 or down.shape != (up.shape[0], up.shape[2], up.shape[1]):
            raise ValueError(f"PackedExperts: up {tuple(up.shape)} and down {tuple(down.shape)} must be "
                             "[E, I, Din] and [E, Din, I]")
        self.experts, self.inter, self.d_in = up.shape
        self.up = torch.stack([PackedLinear(w).panels for w in up])
        self.down = torch.stack([PackedLinear(w).panels for w in down])
        self._source = (_identity(up), _identity(down))

    def stale(self, up: torch.Tensor, down: torch.Tensor) -> bool:
        return (_identity(up), _identity(down)) != self._source


def moe_experts_packed_fits(x: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `moe_experts_packed` is the faster path (at every batch size): `linear`'s conditions."""
    return up.dim() == 3 and linear_fits(x, up[0])


def moe_experts_packed(x: torch.Tensor, experts: PackedExperts, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> torch.Tensor:
    """`moe_experts_ref` in C on packed weights, any batch size: pairs sorted by expert, each
    expert's two products by `linear`'s micro-kernel, each token's results summed in choice order.
    x: [T, Din]; topk_ids, topk_weights: [T, k]. Returns [T, Din] float32."""
    lib = _built("moe_experts_packed_fits")
    T, d_in = x.shape
    E, inter = experts.experts, experts.inter
    k = topk_ids.shape[1]
    if d_in != experts.d_in or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != T:
        raise ValueError(f"moe_experts_packed: x {tuple(x.shape)}, experts [{E}, {inter}, {experts.d_in}], ids "
                         f"{tuple(topk_ids.shape)}, weights {tuple(topk_weights.shape)}: shapes do not agree")
    ids = topk_ids.to(torch.int64).contiguous()
    if ids.numel():  # the kernel indexes the weights with these
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= E:
            raise ValueError(f"moe_experts_packed: expert ids must lie in [0, {E}), got {int(lo)}..{int(hi)}")
    x = x.contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    work = torch.empty(T * k, 2 * d_in + inter, dtype=torch.float32)
    out = torch.empty(T, d_in, dtype=torch.float32)
    if lib.agentrt_moe_packed_f32(T, k, E, inter, d_in, x.data_ptr(), experts.up.data_ptr(), experts.down.data_ptr(),
                                  ids.data_ptr(), weights.data_ptr(), work.data_ptr(), out.data_ptr(),
                                  torch.get_num_threads()) != 0:
        raise MemoryError("moe_experts_packed: the C kernel could not allocate its index arrays")
    return out


class DecodeTable:
    """The keys of a decode step's sequences, checked once and used by every attention layer.

    shared: [L] int, slots every sequence attends first (a common prefix; may be empty); own: one
    int tensor per sequence, the slots it attends after them. Every slot must lie in [0, pool_size)
    and every sequence must have a key.
    """

    def __init__(self, shared: torch.Tensor, own: list[torch.Tensor], pool_size: int):
        self.shared = shared.to(torch.int64).contiguous()
        lengths = [len(o) for o in own]
        self.own = torch.cat(own).to(torch.int64) if own else torch.empty(0, dtype=torch.int64)
        self.own_start = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
        if self.shared.dim() != 1 or any(o.dim() != 1 for o in own):
            raise ValueError(f"DecodeTable: shared {tuple(self.shared.shape)} and every own table must be 1-D")
        if not self.shared.numel() and 0 in lengths:
            raise ValueError(f"DecodeTable: sequence {lengths.index(0)} has no key (no shared slots, no own ones)")
        for slots in (self.shared, self.own):
            if slots.numel():
                lo, hi = torch.aminmax(slots)
                if int(lo) < 0 or int(hi) >= pool_size:
                    raise ValueError(f"DecodeTable: slots must lie in [0, {pool_size}), got {int(lo)}..{int(hi)}")
        self.pool_size = pool_size
        self.batch = len(own)


def decode_attention_fits(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these: float32 on CPU, and the kernels available."""
    return q.is_cpu and q.dtype == k_pool.dtype == torch.float32 and available()


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: DecodeTable,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_attention_ref` in C, reading K/V in place. q: [B, Hq, D] float32; k_pool, v_pool:
    [S, Hkv, D] float32, contiguous, S == table.pool_size. Returns out [B, Hq, D], lse [B, Hq]."""
    lib = _built("decode_attention_fits")
    B, Hq, D = q.shape
    S, Hkv = k_pool.shape[0], k_pool.shape[1]
    if (k_pool.shape != v_pool.shape or k_pool.shape[2] != D or Hq % Hkv or B != table.batch
            or S != table.pool_size):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, pools {tuple(k_pool.shape)} and "
                         f"{tuple(v_pool.shape)}, a table of {table.batch} sequences over {table.pool_size} slots: "
                         "shapes do not agree")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("decode_attention: the pools must be contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, dtype=torch.float32)
    lib.agentrt_decode_attention_f32(
        B, Hkv, Hq // Hkv, D, q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), table.shared.data_ptr(),
        len(table.shared), table.own.data_ptr(), table.own_start.data_ptr(), scale,
        out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    return out, lse
