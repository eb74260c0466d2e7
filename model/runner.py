"""One forward pass over a scheduled batch, reading and writing the shared pools."""

from __future__ import annotations

import torch

from agentrt.kernels.attention import attention_ref

from .network import NemotronH
from .pools import KVPool, StatePool
from .sequence import Sequence


class PagedView:
    """The `StateView` of one step: K/V go to and come from pool slots, Mamba states from state slots."""

    def __init__(self, kv: KVPool, states: StatePool | None, batch: list[tuple[Sequence, int]],
                 scale: float, device: torch.device):
        self.kv, self.states, self.scale = kv, states, scale
        self.seq_lens = [n for _, n in batch]
        new = [s.slots[s.computed:s.computed + n] for s, n in batch]
        self.new_slots = torch.tensor([x for part in new for x in part], device=device)
        self.tables = [torch.tensor(s.slots[: s.computed + n], device=device) for s, n in batch]
        starts = [sum(self.seq_lens[:i]) for i in range(len(batch))]
        self.segments = [(starts[i], n) for i, n in enumerate(self.seq_lens)]
        if states is not None:
            self.state_idx = torch.tensor([s.state_slot for s, _ in batch], device=device)
        # one-token sequences attend as one padded batch; longer ones one at a time
        self.decode = [i for i, n in enumerate(self.seq_lens) if n == 1]
        if self.decode:
            lengths = [len(self.tables[i]) for i in self.decode]
            width = max(lengths)
            table = torch.full((len(self.decode), width), kv.scratch, device=device)
            for row, i in enumerate(self.decode):
                table[row, : lengths[row]] = self.tables[i]
            self.decode_table = table
            self.decode_pad = torch.arange(width, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
            self.decode_tok = torch.tensor([starts[i] for i in self.decode], device=device)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V = self.kv.k[layer], self.kv.v[layer]
        K[self.new_slots] = k
        V[self.new_slots] = v
        out = torch.empty_like(q)
        if self.decode:
            B, (Hq, D), Hkv = len(self.decode), q.shape[1:], k.shape[1]
            qd = q[self.decode_tok].view(B, Hkv, Hq // Hkv, D)
            kd, vd = K[self.decode_table], V[self.decode_table]  # [B, S, Hkv, D]
            scores = torch.einsum("bhgd,bshd->bhgs", qd, kd) * self.scale
            scores = scores.float().masked_fill(self.decode_pad[:, None, None, :], -torch.inf)
            probs = scores.softmax(-1).to(q.dtype)
            out[self.decode_tok] = torch.einsum("bhgs,bshd->bhgd", probs, vd).reshape(B, Hq, D)
        for i, (start, n) in enumerate(self.segments):
            if n > 1:
                table = self.tables[i]
                out[start:start + n] = attention_ref(q[start:start + n], K[table], V[table], self.scale)
        return out

    def mamba_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.states.conv[layer][self.state_idx], self.states.ssm[layer][self.state_idx]

    def set_mamba_states(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.states.conv[layer].index_copy_(0, self.state_idx, conv)
        self.states.ssm[layer].index_copy_(0, self.state_idx, ssm)


@torch.inference_mode()
def run_batch(model: NemotronH, kv: KVPool, states: StatePool | None, batch: list[tuple[Sequence, int]],
              all_logits: bool = False) -> torch.Tensor:
    """Feed each sequence its next n tokens; return fp32 logits of the last fed position of every
    sequence that reaches the end of its tokens ([rows, vocab], in batch order), or of every
    position with `all_logits` ([T, vocab])."""
    device = model.device
    ids = torch.tensor([t for s, n in batch for t in s.tokens[s.computed:s.computed + n]], device=device)
    view = PagedView(kv, states, batch, model.attn_scale, device)
    hidden = model(ids, view=view, seq_lens=view.seq_lens)
    if all_logits:
        return model.logits(hidden)
    rows = [start + n - 1 for (s, n), (start, _) in zip(batch, view.segments) if s.computed + n == len(s.tokens)]
    return model.logits(hidden[rows])
