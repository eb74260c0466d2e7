"""A plain single-sequence generation loop over `NemotronH` with incremental state.

The engine batches many sequences; this loop is the simple path for scripts and the demo, and
the per-token reference the engine's batched output is compared with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .network import NemotronH


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits: [vocab] fp32 -> token id (greedy when temperature == 0)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: NemotronH,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[tuple[int, float]]:
    """Yield (token id, its log-probability) until `max_new_tokens` or a stop id (which is yielded).

    >>> for tok, logprob in generate(lm.model, ids, 32, stop_ids=lm.eos_token_ids):  # doctest: +SKIP
    ...     print(lm.tokenizer.decode([tok]), end="")
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; generation needs at least one prompt token")
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    state = model.new_state()
    ids = torch.tensor(list(prompt_ids), device=model.device)
    logits = model.logits(model(ids, [state])[-1:])[0]
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, generator)
        yield tok, float(torch.log_softmax(logits, -1)[tok])
        if tok in stop_ids:
            return
        logits = model.logits(model(torch.tensor([tok], device=model.device), [state]))[0]
