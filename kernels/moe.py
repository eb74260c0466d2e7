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


def moe_experts(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """`moe_experts_ref`, fast on CPU: never pads more than a quarter of the work.

    Few routed rows (decode): one padded pair of batched matmuls over all experts, cheaper than a
    matmul pair per expert. Many rows (prefill): rows sorted by expert, one unpadded matmul pair per
    expert on a contiguous slice. The activation runs in place and the weighted results are added
    into the output by token (`index_add_`), with no unsort.
    """
    T, k = topk_ids.shape
    E, d_in = up.shape[0], x.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=E)
    tokens = order // k
    rows = T * k
    weights = topk_weights.reshape(-1)[order, None].float()
    out = torch.zeros(T, d_in, dtype=torch.float32, device=x.device)
    width = int(counts.max())
    if rows <= 16 * E or E * width * 4 <= rows * 5:
        sorted_ids = flat_ids[order]
        rank = torch.arange(rows, device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_ids]
        slot = sorted_ids * width + rank
        grouped = x.new_zeros(E * width, d_in)
        grouped[slot] = x.index_select(0, tokens)
        h = torch.bmm(grouped.view(E, width, d_in), up.transpose(1, 2))
        h = torch.bmm(torch.relu_(h).square_(), down.transpose(1, 2)).view(E * width, d_in)
        out.index_add_(0, tokens, h.index_select(0, slot).float().mul_(weights))
    else:
        xs = x.index_select(0, tokens)
        start = 0
        for expert, n in enumerate(counts.tolist()):
            if n:
                h = torch.relu_(xs[start:start + n] @ up[expert].t()).square_() @ down[expert].t()
                out.index_add_(0, tokens[start:start + n], h.float().mul_(weights[start:start + n]))
                start += n
    return out.to(x.dtype)
