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
    """A free list of integer slot ids."""

    def __init__(self, capacity: int, kind: str):
        self.capacity, self.kind = capacity, kind
        self.free = list(range(capacity - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self.free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfSlots(f"asked for {n} {self.kind} slots, {len(self.free)} of {self.capacity} free")
        if n == 0:
            return []
        out = self.free[-n:]
        del self.free[-n:]
        out.reverse()  # ascending: a fresh pool hands out contiguous runs, read as slices
        return out

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)


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
