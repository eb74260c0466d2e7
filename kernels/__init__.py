"""Compute kernels for the NemotronH forward: Triton kernels, each beside its pure-PyTorch ``*_ref`` oracle.

| module | references (torch) | Triton |
| --- | --- | --- |
| attention | `attention_ref`, `paged_attention_ref`, `write_kv_ref` | `triton_attention` |
| mamba | conv1d (prefill, varlen, one-token), SSD scan, state update, gated RMSNorm | `triton_mamba`, `triton_ssd` |
| moe | `moe_experts_ref`, `moe_align_ref`, `moe_forward_ref` | `triton_moe` |

The engine uses the Triton kernels on CUDA and the torch paths on CPU, where `cpu` adds C kernels
(`cpu_*.c`: linear layers, routed experts, the Mamba mixer, decode attention, RMSNorm) built at
first use with the system C compiler, each checked against its torch reference; without a compiler
the torch paths stay. `AGENTRT_KERNELS`
overrides that: `ref` forces the torch references everywhere (C kernels off too; on CUDA, to debug
a kernel), `triton` forces the Triton kernels on CPU (run by Triton's interpreter when
`TRITON_INTERPRET=1`; that is how the tests check the kernel forward without a GPU). The
`triton_*` modules import triton, so nothing here imports them.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

KERNELS_ENV = "AGENTRT_KERNELS"
MODES = ("auto", "ref", "triton")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_mode() -> str:
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r} is not one of {', '.join(MODES)}: 'auto' uses Triton on CUDA, "
                         "'ref' the torch references everywhere, 'triton' the Triton kernels everywhere")
    return mode


def use_triton(device: torch.device) -> bool:
    """Whether the forward on `device` runs the Triton kernels (see the module docstring)."""
    mode = kernel_mode()
    if mode == "ref":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{KERNELS_ENV}=triton but triton is not installed; pip install 'agentrt[gpu]'")
        return True
    return device.type == "cuda" and triton_available()
