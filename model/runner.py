"""One forward pass over a scheduled batch, reading and writing the shared pools."""

from __future__ import annotations

import itertools

import torch
from torch.nn.utils.rnn import pad_sequence

from agentrt.kernels import cpu as cpu_kernels
from agentrt.kernels import use_triton
from agentrt.kernels.attention import attention_lse, merge_attention

from .network import NemotronH
from .pools import KVPool, StatePool
from .sequence import Sequence

SHARED_MIN = 64  # a shared prefix shorter than this is gathered per sequence like the rest


class PagedView:
    """The `StateView` of one step: K/V go to and come from pool slots, Mamba states from state slots.

    Attention is a cascade. The slots at the start of every sequence's table that all sequences of
    the step share (a common system prompt) are attended once, by every query of the step together;
    each sequence's own slots are gathered and attended separately (one-token sequences as one
    padded batch); the two partial results are merged by their log-sum-exp. The plan (which slots,
    which masks) is built once per step and used by every attention layer.
    """

    def __init__(self, kv: KVPool, states: StatePool | None, batch: list[tuple[Sequence, int]],
                 scale: float, device: torch.device, groups: int = 1):
        self.kv, self.states, self.scale, self.groups = kv, states, scale, groups
        self.seq_lens = [n for _, n in batch]
        tables = [s.slot_table(s.computed + n, device) for s, n in batch]
        self.new_slots = torch.tensor([slot for s, n in batch for slot in s.slots[s.computed:s.computed + n]],
                                      device=device)
        self.cu_seqlens = [0, *itertools.accumulate(self.seq_lens)]
        starts = self.cu_seqlens[:-1]
        self.segments = [(starts[i], n) for i, n in enumerate(self.seq_lens)]
        if states is not None:
            self.state_idx = torch.tensor([s.state_slot for s, _ in batch], device=device)
        self._plan(batch, tables, starts, device)

    def _plan(self, batch: list[tuple[Sequence, int]], tables: list[torch.Tensor], starts: list[int],
              device: torch.device) -> None:
        # the shared prefix: common to every table and already computed by every sequence
        longest = min(s.computed for s, _ in batch)
        shared = 0
        if len(batch) > 1 and longest >= SHARED_MIN:
            shared = _common_prefix([s.slots for s, _ in batch], longest)
        self.shared: slice | torch.Tensor | None = None
        if shared >= SHARED_MIN:
            slots = tables[0][:shared]
            first = batch[0][0].slots[0]
            contiguous = batch[0][0].slots[:shared] == list(range(first, first + shared))
            self.shared = slice(first, first + shared) if contiguous else slots
        else:
            shared = 0
        dtype = self.kv.dtype
        self.decode = [i for i, n in enumerate(self.seq_lens) if n == 1]
        self.all_decode = len(self.decode) == len(batch)
        self.decode_table: cpu_kernels.DecodeTable | None = None
        if self.decode:
            own = [tables[i][shared:] for i in self.decode]
            if self.all_decode and device.type == "cpu" and dtype == torch.float32 and cpu_kernels.available():
                # the C kernel reads every key in place: no gathers, masks or merge
                shared_slots = (torch.arange(self.shared.start, self.shared.stop) if isinstance(self.shared, slice)
                                else self.shared if self.shared is not None else torch.empty(0, dtype=torch.long))
                self.decode_table = cpu_kernels.DecodeTable(shared_slots, own, self.kv.scratch + 1)
            else:
                lengths = torch.tensor([len(t) for t in own], device=device)
                table = pad_sequence(own, batch_first=True, padding_value=self.kv.scratch)
                self.decode_slots, self.decode_width = table.view(-1), table.shape[1]
                hidden = torch.arange(table.shape[1], device=device)[None, :] >= lengths[:, None]
                self.decode_mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(
                    hidden, -torch.inf)[:, None, None, :]
            if not self.all_decode:
                self.decode_tok = torch.tensor([starts[i] for i in self.decode], device=device)
        self.prefill = []  # (start, n, own slots, causal mask over them)
        for i, (s, n) in enumerate(batch):
            if n > 1:
                own = tables[i][shared:]
                first_query = s.computed - shared  # own position of the first new token
                hidden = (torch.arange(len(own), device=device)[None, :]
                          > torch.arange(first_query, first_query + n, device=device)[:, None])
                mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, -torch.inf)
                self.prefill.append((starts[i], n, own, mask.repeat_interleave(self.groups, 0)[None, None]))

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V = self.kv.k[layer], self.kv.v[layer]
        K.index_copy_(0, self.new_slots, k)
        V.index_copy_(0, self.new_slots, v)
        T, Hq, D = q.shape
        Hkv = K.shape[1]
        G = Hq // Hkv
        if self.decode_table is not None:
            return cpu_kernels.decode_attention(q, K, V, self.decode_table, self.scale)[0]
        qg = q.view(T, Hkv, G, D)
        if self.all_decode:
            out, lse = self._decode(qg, K, V)
        else:
            out = q.new_empty(T, Hkv, G, D)
            lse = q.new_empty(T, Hkv, G, dtype=torch.float32)
            if self.decode:
                out[self.decode_tok], lse[self.decode_tok] = self._decode(qg[self.decode_tok], K, V)
            for start, n, own, mask in self.prefill:
                # the sequence's n queries x G heads per KV head form one block of n*G query rows
                qs = qg[start:start + n].permute(1, 0, 2, 3).reshape(1, Hkv, n * G, D)
                ks = K.index_select(0, own).transpose(0, 1)[None]
                vs = V.index_select(0, own).transpose(0, 1)[None]
                o, l = attention_lse(qs, ks, vs, mask, self.scale)
                out[start:start + n] = o.view(Hkv, n, G, D).permute(1, 0, 2, 3)
                lse[start:start + n] = l.view(Hkv, n, G).permute(1, 0, 2)
        if self.shared is not None:
            qs = qg.permute(1, 0, 2, 3).reshape(1, Hkv, T * G, D)
            ks, vs = (K[self.shared], V[self.shared]) if isinstance(self.shared, slice) else (
                K.index_select(0, self.shared), V.index_select(0, self.shared))
            o, l = attention_lse(qs, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], None, self.scale)
            out = merge_attention(o.view(Hkv, T, G, D).permute(1, 0, 2, 3), l.view(Hkv, T, G).permute(1, 0, 2),
                                  out, lse)
        return out.reshape(T, Hq, D)

    def _decode(self, qg: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one-token sequences: qg [B, Hkv, G, D] over their own slots, padded to one width
        B, Hkv, _, D = qg.shape
        ks = K.index_select(0, self.decode_slots).view(B, self.decode_width, Hkv, D).transpose(1, 2)
        vs = V.index_select(0, self.decode_slots).view(B, self.decode_width, Hkv, D).transpose(1, 2)
        return attention_lse(qg, ks, vs, self.decode_mask, self.scale)

    def mamba_pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conv pool, SSM pool, each sequence's slot): for kernels that update the slots in place."""
        return self.states.conv[layer], self.states.ssm[layer], self.state_idx

    def mamba_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.states.conv[layer][self.state_idx], self.states.ssm[layer][self.state_idx]

    def set_mamba_states(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.states.conv[layer].index_copy_(0, self.state_idx, conv)
        self.states.ssm[layer].index_copy_(0, self.state_idx, ssm)


class KernelView:
    """The `StateView` of one step on the Triton path (CUDA): varlen kernels over the whole batch.

    Attention writes the new K/V into their slots and runs one paged varlen kernel over every
    sequence's slot table (split-K when decoding long contexts). Mamba layers read `kernels` and
    call the slot-indexed kernels themselves: the one-token update for decoding sequences, the
    chunk-aligned varlen scan for the rest; states are read from and written to their pool slots
    in place, so `mamba_states` is never called.
    """

    kernels = True

    def __init__(self, kv: KVPool, states: StatePool | None, batch: list[tuple[Sequence, int]],
                 scale: float, device: torch.device):
        self.kv, self.states, self.scale = kv, states, scale
        self.seq_lens = [n for _, n in batch]
        starts = [sum(self.seq_lens[:i]) for i in range(len(batch))]
        self.segments = [(starts[i], n) for i, n in enumerate(self.seq_lens)]
        tables = [s.slot_table(s.computed + n, device) for s, n in batch]
        self.new_slots = torch.cat([t[s.computed:] for t, (s, _) in zip(tables, batch)])
        self.slot_table = pad_sequence(tables, batch_first=True, padding_value=0).to(torch.int32)
        self.ctx_lens = torch.tensor([s.computed + n for s, n in batch], dtype=torch.int32, device=device)
        self.cu_seqlens = torch.tensor([0, *starts[1:], sum(self.seq_lens)], dtype=torch.int32, device=device)
        if states is None:
            return
        slots = [s.state_slot for s, _ in batch]  # fresh slots are zeroed, resumed ones hold a snapshot
        decode = [i for i, n in enumerate(self.seq_lens) if n == 1]
        prefill = [i for i, n in enumerate(self.seq_lens) if n > 1]
        self.decode_tok = torch.tensor([starts[i] for i in decode], device=device)
        self.decode_slots = torch.tensor([slots[i] for i in decode], dtype=torch.int32, device=device)
        self.prefill_tok = torch.cat([torch.arange(starts[i], starts[i] + self.seq_lens[i], device=device)
                                      for i in prefill]) if prefill else None
        lengths = [self.seq_lens[i] for i in prefill]
        self.prefill_cu = torch.tensor([sum(lengths[:j]) for j in range(len(lengths) + 1)], dtype=torch.int32,
                                       device=device)
        self.prefill_slots = torch.tensor([slots[i] for i in prefill], dtype=torch.int32, device=device)
        self.prefill_initial = torch.ones(len(prefill), dtype=torch.bool, device=device)
        self.prefill_max = max(lengths, default=0)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from agentrt.kernels.triton_attention import paged_attention, write_kv

        K, V = self.kv.k[layer], self.kv.v[layer]
        write_kv(K, V, k, v, self.new_slots)
        return paged_attention(q, K, V, self.cu_seqlens, self.slot_table, self.ctx_lens, self.scale)

    def mamba_states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("on the kernel path Mamba layers update their pool slots in place")

    def set_mamba_states(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        raise NotImplementedError("on the kernel path Mamba layers update their pool slots in place")


def kernels_fit(model: NemotronH) -> bool:
    """Whether the Triton attention kernel takes this model's head size (a power of two >= 16)."""
    d = model.config.head_dim
    return d >= 16 and d & (d - 1) == 0


def _common_prefix(slot_lists: list[list[int]], limit: int) -> int:
    """Length of the slot prefix all lists share, at most `limit`.

    A KV slot holds one position of one path of the prefix cache (or of one sequence's own
    tokens), so two lists holding the same slot at position p agree on every position before it:
    agreement is monotone in p, and a binary search over single positions finds its end.
    """
    first = slot_lists[0]
    lo, hi = 0, limit  # lists agree on [0, lo); the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        slot = first[mid - 1]
        if all(other[mid - 1] == slot for other in slot_lists):
            lo = mid
        else:
            hi = mid - 1
    return lo


@torch.inference_mode()
def run_batch(model: NemotronH, kv: KVPool, states: StatePool | None, batch: list[tuple[Sequence, int]],
              all_logits: bool = False) -> torch.Tensor:
    """Feed each sequence its next n tokens; return fp32 logits of the last fed position of every
    sequence that reaches the end of its tokens ([rows, vocab], in batch order), or of every
    position with `all_logits` ([T, vocab])."""
    device = model.device
    ids = torch.tensor([t for s, n in batch for t in s.tokens[s.computed:s.computed + n]], device=device)
    config = model.config
    if use_triton(device) and kernels_fit(model):
        view = KernelView(kv, states, batch, model.attn_scale, device)
    else:
        view = PagedView(kv, states, batch, model.attn_scale, device,
                         groups=config.num_attention_heads // config.num_key_value_heads)
    hidden = model(ids, view=view, seq_lens=view.seq_lens)
    if all_logits:
        return model.logits(hidden)
    rows = [start + n - 1 for (s, n), (start, _) in zip(batch, view.segments) if s.computed + n == len(s.tokens)]
    return model.logits(hidden[rows])
