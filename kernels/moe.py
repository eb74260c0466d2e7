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


def relu2_fresh(h: torch.Tensor) -> torch.Tensor:
    """Squared ReLU of a freshly computed projection: in place (no new buffer to fault in) unless
    autograd needs the original."""
    if torch.is_grad_enabled() and h.requires_grad:
        return torch.relu(h).square()
    return torch.relu_(h).square_()


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
        h = torch.bmm(relu2_fresh(h), down.transpose(1, 2)).view(E * width, d_in)
        out.index_add_(0, tokens, h.index_select(0, slot).float().mul_(weights))
    else:
        xs = x.index_select(0, tokens)
        start = 0
        for expert, n in enumerate(counts.tolist()):
            if n:
                h = relu2_fresh(xs[start:start + n] @ up[expert].t()) @ down[expert].t()
                out.index_add_(0, tokens[start:start + n], h.float().mul_(weights[start:start + n]))
                start += n
    return out.to(x.dtype)


def moe_align_ref(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*k (token, choice) pairs by expert, each group padded to a multiple of `block_m`.

    topk_ids: [T, k] (int). Returns:
      sorted_ids [capacity] int32: flat pair indices (t*k + j), expert by expert (experts in
        ascending order, pairs of one expert in ascending flat index); padding entries (the tail of
        each group and everything past the used length) hold the sentinel T*k.
      block_experts [capacity // block_m] int32: the expert of each block of `block_m` entries,
        -1 for the unused blocks past the used length.
      num_padded [1] int32: the used length (sum over experts of the padded group sizes), a tensor
        on topk_ids' device so that callers never have to synchronise with the host.
    capacity = T*k + E*(block_m - 1) rounded up to a multiple of block_m: a static upper bound.
    """
    T, k = topk_ids.shape
    pairs, device = T * k, topk_ids.device
    capacity = -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    starts = torch.cumsum(padded, 0) - padded  # [E] first slot of each expert's group
    order = torch.argsort(flat, stable=True)  # [pairs] ascending flat index within an expert
    sorted_experts = flat[order]
    rank = torch.arange(pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=device)
    sorted_ids[starts[sorted_experts] + rank] = order.to(torch.int32)
    block_experts = torch.full((capacity // block_m,), -1, dtype=torch.int32, device=device)
    block_experts[: int(padded.sum()) // block_m] = torch.repeat_interleave(
        torch.arange(num_experts, device=device), padded // block_m
    ).to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, block_experts, num_padded


def moe_forward_ref(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_up: torch.Tensor,
    shared_down: torch.Tensor,
    latent_in_w: torch.Tensor | None = None,
    latent_in_b: torch.Tensor | None = None,
    latent_out_w: torch.Tensor | None = None,
    latent_out_b: torch.Tensor | None = None,
    *,
    shared_up_b: torch.Tensor | None = None,
    shared_down_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole (Latent)MoE block given the router's outputs, as `model.layers.MoE.forward` computes it.

    x: [T, hidden]; up: [E, I, L]; down: [E, L, I] where L = latent size (or hidden without latent
    projections); topk_ids: [T, k] (int); topk_weights: [T, k] (fp32); shared_up: [S, hidden];
    shared_down: [hidden, S]; latent_in_w: [L, hidden] with latent_in_b: [L] or None (the
    fc1_latent_proj Linear); latent_out_w: [hidden, L] with latent_out_b: [hidden] or None
    (fc2_latent_proj); shared_up_b: [S] / shared_down_b: [hidden] or None (the shared expert's
    biases, present when mlp_bias). Returns [T, hidden] in x's dtype:
    latent_out(experts(latent_in(x))) + shared_down(relu(shared_up(x))^2).
    """
    import torch.nn.functional as F

    h = x if latent_in_w is None else F.linear(x, latent_in_w, latent_in_b)  # [T, L]
    h = moe_experts_ref(h, up, down, topk_ids, topk_weights)  # [T, L]
    if latent_out_w is not None:
        h = F.linear(h, latent_out_w, latent_out_b)  # [T, hidden]
    shared = F.linear(torch.relu(F.linear(x, shared_up, shared_up_b)).square(), shared_down, shared_down_b)
    return h + shared
