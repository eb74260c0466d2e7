"""One forward pass over a scheduled batch, reading and writing the shared pools."""

from __future__ import annotations

import torch

from agentrt.kernels.attention import attention_ref

from .network import NemotronH
from .pools import KVPool, StatePool
from .sequence import Sequence

SHARED_MIN = 64  # a shared prefix shorter than this is gathered per sequence like the rest


class PagedView:
    """The `StateView` of one step: K/V go to and come from pool slots, Mamba states from state slots."""

    def __init__(self, kv: KVPool, states: StatePool | None, batch: list[tuple[Sequence, int]],
                 scale: float, device: torch.device):
        self.kv, self.states, self.scale = kv, states, scale
        self.seq_lens = [n for _, n in batch]
        self.tables = [s.slot_table(s.computed + n, device) for s, n in batch]
        self.new_slots = torch.cat([t[s.computed:] for t, (s, _) in zip(self.tables, batch)])
        starts = [sum(self.seq_lens[:i]) for i in range(len(batch))]
        self.segments = [(starts[i], n) for i, n in enumerate(self.seq_lens)]
        if states is not None:
            self.state_idx = torch.tensor([s.state_slot for s, _ in batch], device=device)
        # One-token sequences attend as one padded batch; longer ones one at a time.
        self.decode = [i for i, n in enumerate(self.seq_lens) if n == 1]
        if self.decode:
            lengths = torch.tensor([len(self.tables[i]) for i in self.decode], device=device)
            width = int(lengths.max())
            table = torch.full((len(self.decode), width), kv.scratch, device=device)
            for row, i in enumerate(self.decode):
                table[row, : len(self.tables[i])] = self.tables[i]
            self.decode_tok = torch.tensor([starts[i] for i in self.decode], device=device)
            # Cascade: the slots every decoding sequence shares (a common system prompt) are read
            # once for all of them; only the rest is gathered per sequence.
            same = (table == table[:1]).all(0)[: int(lengths.min())]
            shared = int(same.int().cumprod(0).sum()) if len(self.decode) > 1 else 0
            self.shared = table[0, :shared] if shared >= SHARED_MIN else None
            cut = shared if self.shared is not None else 0
            self.decode_table = table[:, cut:]
            self.decode_pad = torch.arange(cut, width, device=device)[None, :] >= lengths[:, None]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V = self.kv.k[layer], self.kv.v[layer]
        K[self.new_slots] = k
        V[self.new_slots] = v
        out = torch.empty_like(q)
        if self.decode:
            out[self.decode_tok] = self._decode_attention(q[self.decode_tok], K, V)
        for i, (start, n) in enumerate(self.segments):
            if n > 1:
                table = self.tables[i]
                out[start:start + n] = attention_ref(q[start:start + n], K[table], V[table], self.scale)
        return out

    def _decode_attention(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        # q: [B, Hq, D] -> [B, Hq, D]; keys: the shared prefix (if any), then each row's own slots
        B, Hq, D = q.shape
        Hkv = K.shape[1]
        qg = q.view(B, Hkv, Hq // Hkv, D)
        ks, vs = K[self.decode_table], V[self.decode_table]  # [B, S, Hkv, D]
        scores = torch.einsum("bhgd,bshd->bhgs", qg, ks)
        scores = scores.masked_fill(self.decode_pad[:, None, None, :], -torch.inf)
        if self.shared is not None:
            kp, vp = K[self.shared], V[self.shared]  # [P, Hkv, D], read once
            scores = torch.cat([torch.einsum("bhgd,phd->bhgp", qg, kp), scores], dim=-1)
        probs = (scores.float() * self.scale).softmax(-1).to(q.dtype)
        P = 0 if self.shared is None else len(self.shared)
        out = torch.einsum("bhgs,bshd->bhgd", probs[..., P:], vs)
        if self.shared is not None:
            out = out + torch.einsum("bhgp,phd->bhgd", probs[..., :P], vp)
        return out.reshape(B, Hq, D)

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
