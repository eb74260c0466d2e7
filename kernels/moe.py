"""Mixture-of-experts references: non-gated squared-ReLU experts over routed tokens."""

from __future__ import annotations

import torch


def moe_experts_ref(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Sum over each token's chosen experts of weight * down(relu(up(x))^2).

    x: [T, Din]; up: [E, I, Din]; down: [E, Din, I]; topk_ids: [T, k] (int); topk_weights: [T, k]
    (fp32). Accumulates in fp32 and returns [T, Din] in x's dtype.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=up.shape[0]).tolist()
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.reshape(-1)[order]
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        tokens = token_of[start:start + n]
        h = torch.relu(x[tokens] @ up[expert].t()).square() @ down[expert].t()
        out.index_add_(0, tokens, h.float() * weight_of[start:start + n, None])
        start += n
    return out.to(x.dtype)
