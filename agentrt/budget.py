"""Budgets: what an agent may spend, checked in one place before every model and tool call."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class Budget(BaseModel):
    """Limits of one agent episode; None means unlimited.

    - `think_tokens`: reasoning tokens over the whole episode. What is left goes with every request
      to the engine as its thinking budget (at 0 the model answers without thinking).
    - `output_tokens`: generated tokens (thinking included); each request's `max_tokens` is capped
      to what is left, so the limit is never exceeded.
    - `total_tokens`: prompt + generated tokens over all model calls (what an API would bill).
    - `tool_calls`: tool calls executed; a call past the limit is not executed.
    - `turns`: model calls.
    - `seconds`: wall time since the episode started; a model or tool call in flight when it runs
      out is cancelled.

    Running out ends the episode with the reason `budget:<kind>`.

    >>> Budget(think_tokens=256, tool_calls=8, seconds=60)
    Budget(think_tokens=256, output_tokens=None, total_tokens=None, tool_calls=8, turns=None, seconds=60.0)
    """

    model_config = ConfigDict(frozen=True)

    think_tokens: int | None = Field(None, ge=0)
    output_tokens: int | None = Field(None, ge=0)
    total_tokens: int | None = Field(None, ge=0)
    tool_calls: int | None = Field(None, ge=0)
    turns: int | None = Field(None, ge=0)
    seconds: float | None = Field(None, gt=0)


class BudgetExceeded(Exception):
    """Raised by `AgentContext` methods when a budget ran out; ends the episode with `reason`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"budget:{kind}: {detail}")
        self.kind, self.detail = kind, detail

    @property
    def reason(self) -> str:
        return f"budget:{self.kind}"


@dataclass(slots=True)
class Spent:
    """What an episode has used so far."""

    turns: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    thinking_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__} | {"total_tokens": self.total_tokens}


class BudgetTracker:
    """The one place budgets are checked: `before_model` and `before_tool` raise `BudgetExceeded`."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.spent = Spent()
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def seconds_left(self) -> float | None:
        return None if self.budget.seconds is None else self.budget.seconds - self.elapsed()

    def _check_time(self) -> None:
        left = self.seconds_left()
        if left is not None and left <= 0:
            raise BudgetExceeded("seconds", f"{self.elapsed():.2f} s used of {self.budget.seconds} s")

    def before_model(self, max_tokens: int) -> tuple[int, int | None]:
        """Check the limits of one more model call. Returns the `max_tokens` it may generate and the
        prompt + generated tokens it may use in all (None: unlimited), which the model enforces once
        it knows the prompt's length."""
        b, s = self.budget, self.spent
        self._check_time()
        if b.turns is not None and s.turns >= b.turns:
            raise BudgetExceeded("turns", f"{s.turns} model calls made, limit {b.turns}")
        if b.output_tokens is not None:
            left = b.output_tokens - s.output_tokens
            if left <= 0:
                raise BudgetExceeded("output_tokens", f"{s.output_tokens} tokens generated, limit {b.output_tokens}")
            max_tokens = min(max_tokens, left)
        total_left = None
        if b.total_tokens is not None:
            total_left = b.total_tokens - s.total_tokens
            if total_left <= 0:
                raise BudgetExceeded("total_tokens", f"{s.total_tokens} tokens used, limit {b.total_tokens}")
            max_tokens = min(max_tokens, total_left)
        return max_tokens, total_left

    def think_tokens_left(self) -> int | None:
        if self.budget.think_tokens is None:
            return None
        return max(0, self.budget.think_tokens - self.spent.thinking_tokens)

    def before_tool(self) -> None:
        self._check_time()
        b, s = self.budget, self.spent
        if b.tool_calls is not None and s.tool_calls >= b.tool_calls:
            raise BudgetExceeded("tool_calls", f"{s.tool_calls} tool calls made, limit {b.tool_calls}")

    def charge_model(self, prompt: int, cached: int, thinking: int, output: int) -> None:
        s = self.spent
        s.turns += 1
        s.prompt_tokens += prompt
        s.cached_tokens += cached
        s.thinking_tokens += thinking
        s.output_tokens += output

    def charge_tool(self) -> None:
        self.spent.tool_calls += 1
