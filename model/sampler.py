"""Batched token sampling with a seeded generator per request.

Every row is processed on its own (its own logits, its own generator), so a request samples the
same tokens alone or in any batch. The log-probability returned is the model's own (softmax of the
raw logits, before temperature, filtering or grammar masks), which is what a trainer recomputes.
"""

from __future__ import annotations

import torch

from .request import SamplingParams


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering of one row [vocab] (fp32)."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if p.top_p < 1.0 or p.min_p > 0.0:
        probs = torch.softmax(logits, -1)
        if p.min_p > 0.0:
            logits = logits.masked_fill(probs < p.min_p * probs.max(), -torch.inf)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p  # keeps the most likely token always
            logits = logits.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), -torch.inf)
    return logits


def sample(
    logits: torch.Tensor,
    raw_logprobs: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float]]:
    """logits: [B, vocab] fp32 after masks; raw_logprobs: [B, vocab] -> (token ids, their logprobs)."""
    greedy = [p.temperature == 0 for p in params]
    tokens = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if greedy[i]:
            continue
        probs = torch.softmax(filter_logits(logits[i], p), -1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    rows = torch.arange(len(tokens), device=logits.device)
    chosen = raw_logprobs[rows, torch.tensor(tokens, device=logits.device)].tolist()
    return tokens, chosen
