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
