"""Memory pools shared by every running sequence and the prefix cache.

- `KVPool`: per attention layer, K and V of shape [num_slots + 1, kv_heads, head_dim]. A slot
  holds one token's K/V (page size 1), so prefixes can be shared and split at any token, which
  the hybrid cache needs: a Mamba snapshot can sit at any position. The extra last row is a
  scratch slot that padded reads point at.
- `StatePool`: Mamba state slots; per Mamba layer a conv window [S, conv_dim, K-1] (model dtype)
  and an SSM state [S, heads, head_dim, state] (fp32). Running sequences own one working slot
  each; the prefix cache owns snapshot slots.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class OutOfSlots(RuntimeError):
    """A pool has fewer free slots than asked for; the scheduler evicts or preempts and retries."""


class SlotAllocator:
    """A free list of integer slot ids.

    Slots never handed out are a range, not a list: a GPU's KV pool holds tens of millions of
    slots, and a Python list of them took 5 s and 2 GB of host memory to build on an H100."""

    def __init__(self, capacity: int, kind: str):
        self.capacity, self.kind = capacity, kind
        self._fresh = 0                # slots [_fresh, capacity) have never been handed out
        self._released: list[int] = []  # released slots, reused last-in first-out

    @property
    def num_free(self) -> int:
        return len(self._released) + self.capacity - self._fresh

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def alloc(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfSlots(f"asked for {n} {self.kind} slots, {self.num_free} of {self.capacity} free")
        if n == 0:
            return []
        reuse = min(n, len(self._released))
        out = self._released[len(self._released) - reuse:]
        del self._released[len(self._released) - reuse:]
        out.reverse()
        if n > reuse:  # then never-used slots, ascending: a fresh pool hands out contiguous runs
            out.extend(range(self._fresh, self._fresh + n - reuse))
            self._fresh += n - reuse
        return out

    def release(self, slots: list[int]) -> None:
        self._released.extend(slots)


class KVPool(SlotAllocator):
    def __init__(self, config: ModelConfig, layers: list[int], num_slots: int, device: torch.device, dtype: torch.dtype):
        super().__init__(num_slots, "KV")
        shape = (num_slots + 1, config.num_key_value_heads, config.head_dim)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.scratch = num_slots
        self.dtype = dtype

    @staticmethod
    def bytes_per_slot(config: ModelConfig, layers: list[int], dtype: torch.dtype) -> int:
        return len(layers) * 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize


class StatePool(SlotAllocator):
    def __init__(self, config: ModelConfig, layers: list[int], num_slots: int, device: torch.device, dtype: torch.dtype):
        super().__init__(num_slots, "Mamba state")
        conv = (num_slots, config.conv_dim, config.conv_kernel - 1)
        ssm = (num_slots, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size)
        self.conv = {i: torch.zeros(conv, device=device, dtype=dtype) for i in layers}
        self.ssm = {i: torch.zeros(ssm, device=device, dtype=torch.float32) for i in layers}

    @staticmethod
    def bytes_per_slot(config: ModelConfig, layers: list[int], dtype: torch.dtype) -> int:
        conv = config.conv_dim * (config.conv_kernel - 1) * dtype.itemsize
        ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4
        return len(layers) * (conv + ssm)

    def copy(self, src: int, dst: int) -> None:
        for i in self.conv:
            self.conv[i][dst] = self.conv[i][src]
            self.ssm[i][dst] = self.ssm[i][src]

    def zero(self, slot: int) -> None:
        for i in self.conv:
            self.conv[i][slot] = 0
            self.ssm[i][slot] = 0
