"""Attention reference: causal GQA without positional embeddings, continuing a cached prefix."""

from __future__ import annotations

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of T new queries over S >= T keys, the last T of which are the new tokens.

    q: [T, Hq, D]; k, v: [S, Hkv, D] with Hq a multiple of Hkv. Query t sits at position S-T+t and
    sees keys 0..S-T+t. Softmax in fp32. Returns [T, Hq, D] in q's dtype.
    """
    T, Hq, Dh = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    qg = q.view(T, Hkv, Hq // Hkv, Dh).permute(1, 2, 0, 3)  # [Hkv, g, T, D]
    scores = torch.einsum("hgtd,shd->hgts", qg, k) * scale
    query_pos = torch.arange(S - T, S, device=q.device)[:, None]
    visible = torch.arange(S, device=q.device)[None, :] <= query_pos  # [T, S]
    probs = scores.float().masked_fill(~visible, -torch.inf).softmax(-1).to(q.dtype)
    out = torch.einsum("hgts,shd->thgd", probs, v)
    return out.reshape(T, Hq, Dh)


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of each query's scores, so partial results over
    disjoint key sets can be merged (`merge_attention`).

    q: [N, H, L, D]; k, v: [N, H, S, D]; mask: additive, broadcastable to [N, H, L, S] (0 or -inf),
    in q's dtype, every query seeing at least one key. Returns out [N, H, L, D] in q's dtype and
    lse [N, H, L] in fp32 (natural log of the sum of exp(scale * q.k + mask)).
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = scores.logsumexp(-1)
    out = torch.matmul((scores - lse[..., None]).exp(), v.float())
    return out.to(q.dtype), lse


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_lse_ref`, fast: on CPU torch's fused flash-attention kernel, which returns the
    log-sum-exp alongside the output; elsewhere the reference (GPU kernels replace it there)."""
    if q.device.type == "cpu" and _flash_cpu is not None:
        out, lse = _flash_cpu(q, k, v, attn_mask=mask, scale=scale)[:2]
        return out, lse
    return attention_lse_ref(q, k, v, mask, scale)


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over keys A ∪ B from attention over A (o1, lse1) and over B (o2, lse2).

    o: [..., D]; lse: [...]. The weight of A is exp(lse1) / (exp(lse1) + exp(lse2)) = sigmoid(lse1 - lse2).
    """
    w = torch.sigmoid(lse1 - lse2).unsqueeze(-1).to(o1.dtype)
    return torch.lerp(o2, o1, w)


def write_kv_ref(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """Store the K/V of T new tokens in the paged pools, in place: k_pool[slots[t]] = k[t].

    k_pool, v_pool: [S, Hkv, D]; k, v: [T, Hkv, D]; slots: [T] int, distinct, in [0, S).
    """
    k_pool[slots.long()] = k.to(k_pool.dtype)
    v_pool[slots.long()] = v.to(v_pool.dtype)


def decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, shared: torch.Tensor,
                         own: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One new query token per sequence over keys read from the paged pools, with log-sum-exp.

    q: [B, Hq, D]; k_pool, v_pool: [S, Hkv, D]; shared: [L] int, slots every sequence attends (a
    common prefix); own: B int tensors, the slots sequence b attends besides. Every query sees all
    its keys (the new token's own K/V is among them). Returns out [B, Hq, D] in q's dtype and lse
    [B, Hq] fp32, as `attention_lse_ref`.
    """
    B, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    for b in range(B):
        slots = torch.cat([shared.long(), own[b].long()])
        k, v = k_pool[slots].transpose(0, 1), v_pool[slots].transpose(0, 1)  # [Hkv, n, D]
        o, l = attention_lse_ref(q[b].view(Hkv, Hq // Hkv, D), k, v, None, scale)
        out[b], lse[b] = o.reshape(Hq, D), l.reshape(Hq)
    return out, lse


def paged_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        slot_table: torch.Tensor, ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA of a varlen batch of B sequences over K/V gathered from the paged pools.

    q: [T, Hq, D], the new tokens of all sequences end to end; k_pool, v_pool: [S, Hkv, D];
    cu_seqlens_q: [B+1] int, sequence b's queries are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] (n_b of them);
    slot_table: [B, W] int, the pool slot of each position of each sequence (entries at positions
    >= ctx_lens[b] are ignored); ctx_lens: [B] int, keys of sequence b (cached prefix + its n_b new
    tokens, already written to the pools). Query j of sequence b sits at position ctx_lens[b] - n_b + j
    and sees keys 0..that position. Softmax in fp32. Returns [T, Hq, D] in q's dtype.
    """
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), ctx_lens.tolist()
    for b in range(len(lens)):
        if cu[b + 1] == cu[b]:
            continue
        slots = slot_table[b, :lens[b]].long()
        out[cu[b]:cu[b + 1]] = attention_ref(q[cu[b]:cu[b + 1]], k_pool[slots], v_pool[slots], scale)
    return out
