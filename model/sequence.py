"""A request while the engine works on it: its tokens, cache holdings, sampler and stop state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .radix import Node
from .request import Counts, FinishReason, Request, ThinkingBudget


@dataclass(slots=True)
class ThinkState:
    """Counts reasoning tokens and decides when to force the end-think tokens (NVIDIA's budget control).

    At the budget the model may finish its line (a token containing a newline) within `grace`
    more tokens; then the end-think tokens are forced. Budget 0 forces them at once.
    """

    start_id: int | None
    end_ids: list[int]
    budget: ThinkingBudget | None
    inside: bool = False
    count: int = 0
    forcing: list[int] = field(default_factory=list)

    def open(self) -> None:
        self.inside = True
        if self.budget is not None and self.budget.tokens == 0:
            self.forcing = list(self.end_ids)

    def observe(self, token: int, has_newline: bool) -> None:
        if self.forcing and token == self.forcing[0]:
            self.forcing.pop(0)
        if not self.inside:
            if token == self.start_id:
                self.open()
            return
        if token == self.end_ids[-1]:
            self.inside, self.forcing = False, []
            return
        self.count += 1
        if self.budget is None or self.forcing:
            return
        over = self.count - self.budget.tokens
        if over >= 0 and (over >= self.budget.grace or has_newline or self.budget.tokens == 0):
            self.forcing = list(self.end_ids)


class Sequence:
    """Engine-side state of one request.

    Positions [0, computed) are in the caches: `slots[i]` is position i's KV slot; slots before
    `owned_from` belong to the prefix cache (locked through `node`), the rest to this sequence.
    `state_slot` holds the Mamba state after `computed` tokens.
    """

    def __init__(self, request: Request, generator: torch.Generator | None, think: ThinkState | None):
        self.request = request
        self.id = request.id
        self.tokens = list(request.prompt_ids)
        self.num_prompt = len(self.tokens)
        self.computed = 0
        self.slots: list[int] = []
        self._table: torch.Tensor | None = None  # slots as a tensor, grown as slots are appended
        self._table_len = 0
        self.owned_from = 0
        self.state_slot: int | None = None
        self.node: Node | None = None
        self.splits: list[int] = []  # prefill stops here to snapshot a prefix others share
        self.waits_for: tuple[Sequence, int] | None = None  # deferred until that sequence caches a prefix
        self.generator = generator
        self.think = think
        self.constraint = None  # a constraints.ConstraintState when the request is constrained
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""  # decoded output, kept only when stop strings need it
        self.decoder = None
        self.counts = Counts(prompt=self.num_prompt)
        self.first_admission = True
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.arrived = time.perf_counter()
        self.admitted = 0.0
        self.cancelled = False

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.tokens) - self.computed

    def next_stop(self) -> int:
        """Where the current prefill chunk must end: the next split point, else the end."""
        for s in self.splits:
            if s > self.computed:
                return s
        return len(self.tokens)

    def slots_rewritten(self) -> None:
        """Earlier entries of `slots` changed (prefix taken from or given to the cache)."""
        self._table_len = 0

    def slot_table(self, upto: int, device: torch.device) -> torch.Tensor:
        """`slots[:upto]` as a tensor; only entries appended since the last call are converted."""
        t, n = self._table, min(self._table_len, upto)
        if t is None or t.device != device or upto > t.numel():
            grown = torch.empty(max(upto, 2 * (t.numel() if t is not None else 0), 64), dtype=torch.long, device=device)
            if t is not None and t.device == device:
                grown[:n] = t[:n]
            else:
                n = 0
            t = self._table = grown
        if upto - n == 1:  # a decode step's one new slot: no temporary tensor
            t[n] = self.slots[n]
        elif n < upto:
            t[n:upto] = torch.tensor(self.slots[n:upto], dtype=torch.long, device=device)
        self._table_len = upto
        return t[:upto]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
