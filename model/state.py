"""Incremental inference state, and the view of it that one forward pass sees.

A forward pass runs over a flat batch of tokens: `seq_lens[i]` new tokens of sequence i, laid
end to end. Layers never touch storage directly; they ask a `StateView`:

- attention layers call `view.attention(layer, q, k, v)`: the view stores the new K/V and
  attends over each sequence's cached prefix plus its new tokens;
- Mamba layers call `view.mamba_states(layer)` for the stacked conv windows and SSM states of
  the batch's sequences, and `view.set_mamba_states(...)` to write them back. A view over pools
  may also offer `mamba_pools(layer)` (the pools and each sequence's slot) with `cu_seqlens`;
  the C kernel of the CPU path then updates the slots in place instead.

`SequenceState` keeps one sequence's caches in contiguous tensors; the engine's paged KV pool and
Mamba state-slot pool implement the same `StateView` methods over shared storage.
"""

from __future__ import annotations

from typing import Protocol

import torch

from agentrt.kernels.attention import attention_ref

from .config import ModelConfig


class StateView(Protocol):
    """What a forward pass needs from the caches of the sequences in its batch."""

    seq_lens: list[int]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for the batch's new tokens -> [T, Hq, D]."""
        ...

    def mamba_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (conv windows [B, C, K-1], SSM states [B, H, P, N] fp32), one row per sequence."""
        ...

    def set_mamba_states(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None: ...


def cached_layers(config: ModelConfig) -> tuple[list[int], list[int]]:
    """Indices of the attention and Mamba layers, MTP layers numbered after the backbone's."""
    types = list(config.layer_types)
    types += list(config.mtp_layer_types) * config.num_nextn_predict_layers
    attn = [i for i, t in enumerate(types) if t == "full_attention"]
    mamba = [i for i, t in enumerate(types) if t == "linear_attention"]
    return attn, mamba


class SequenceState:
    """One sequence's caches: K/V per attention layer (grown by doubling), conv + SSM per Mamba layer.

    >>> state = SequenceState(config)            # doctest: +SKIP
    >>> hidden = model(ids, [state])             # prefill; state.length == len(ids)
    >>> hidden = model(next_id, [state])         # one decode step costs one token's work
    """

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.length = 0  # tokens the backbone has consumed
        attn, mamba = cached_layers(config)
        kv_shape = (0, config.num_key_value_heads, config.head_dim)
        self.kv = {i: (torch.empty(kv_shape, device=device, dtype=dtype),) * 2 for i in attn}
        self.kv_len = dict.fromkeys(attn, 0)  # per layer: MTP layers trail the backbone
        self.conv = {i: torch.zeros(config.conv_dim, config.conv_kernel - 1, device=device, dtype=dtype) for i in mamba}
        ssm_shape = (config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size)
        self.ssm = {i: torch.zeros(ssm_shape, device=device, dtype=torch.float32) for i in mamba}

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V [n, Hkv, D] after the layer's cached rows; return all its rows so far."""
        kbuf, vbuf = self.kv[layer]
        start = self.kv_len[layer]
        end = start + k.shape[0]
        if end > kbuf.shape[0]:
            grown = max(end, 2 * kbuf.shape[0], 16)
            kbuf = torch.cat([kbuf[:start], kbuf.new_empty(grown - start, *kbuf.shape[1:])])
            vbuf = torch.cat([vbuf[:start], vbuf.new_empty(grown - start, *vbuf.shape[1:])])
            self.kv[layer] = (kbuf, vbuf)
        kbuf[start:end] = k
        vbuf[start:end] = v
        self.kv_len[layer] = end
        return kbuf[:end], vbuf[:end]

    def clone(self) -> "SequenceState":
        """An independent copy, e.g. to fork a conversation at this point."""
        twin = SequenceState.__new__(SequenceState)
        twin.config, twin.device, twin.dtype, twin.length = self.config, self.device, self.dtype, self.length
        twin.kv = {i: (k[: self.kv_len[i]].clone(), v[: self.kv_len[i]].clone()) for i, (k, v) in self.kv.items()}
        twin.kv_len = dict(self.kv_len)
        twin.conv = {i: c.clone() for i, c in self.conv.items()}
        twin.ssm = {i: s.clone() for i, s in self.ssm.items()}
        return twin


class SequenceBatchView:
    """A `StateView` over a list of `SequenceState`s; `commit()` advances their lengths."""

    def __init__(self, states: list[SequenceState], seq_lens: list[int], scale: float):
        if len(states) != len(seq_lens):
            raise ValueError(f"got {len(states)} states for {len(seq_lens)} sequences; pass one state per sequence")
        self.states, self.seq_lens, self.scale = states, seq_lens, scale

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for state, n in zip(self.states, self.seq_lens):
            k_all, v_all = state.append_kv(layer, k[start : start + n], v[start : start + n])
            outs.append(attention_ref(q[start : start + n], k_all, v_all, self.scale))
            start += n
        return torch.cat(outs)

    def mamba_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        conv = torch.stack([s.conv[layer] for s in self.states])
        ssm = torch.stack([s.ssm[layer] for s in self.states])
        return conv, ssm

    def set_mamba_states(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        for i, state in enumerate(self.states):
            state.conv[layer] = conv[i]
            state.ssm[layer] = ssm[i]

    def commit(self) -> None:
        for state, n in zip(self.states, self.seq_lens):
            state.length += n
