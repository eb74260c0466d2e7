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
    T, k = topk_ids.shape
    E, d_in = up.shape[0], x.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, choice) pairs grouped by expert
    sorted_ids = flat_ids[order]
    counts = torch.bincount(flat_ids, minlength=E)
    width = int(counts.max())
    tokens = order // k
    if E * width <= 2 * T * k:  # balanced enough: pad every expert's group to `width`, two batched matmuls
        rank = torch.arange(T * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_ids]
        slot = sorted_ids * width + rank
        grouped = x.new_zeros(E * width, d_in)
        grouped[slot] = x[tokens]
        h = torch.relu(torch.bmm(grouped.view(E, width, d_in), up.transpose(1, 2))).square()
        h = torch.bmm(h, down.transpose(1, 2)).view(E * width, d_in)[slot].float()
    else:  # a few experts take most tokens: one matmul pair per expert, no padding
        h = torch.empty(T * k, d_in, dtype=torch.float32, device=x.device)
        start = 0
        for expert, n in enumerate(counts.tolist()):
            if n:
                rows = tokens[start:start + n]
                h[start:start + n] = torch.relu(x[rows] @ up[expert].t()).square() @ down[expert].t()
                start += n
    h = h * topk_weights.reshape(-1)[order, None].float()
    unsorted = torch.empty_like(h)
    unsorted[order] = h  # back to (token, choice) order, then sum each token's choices
    return unsorted.view(T, k, -1).sum(1).to(x.dtype)
