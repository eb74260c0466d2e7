"""What a caller hands the engine, and what it gets back."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]
_ids = itertools.count()


@dataclass(slots=True)
class SamplingParams:
    """How to pick each token. temperature 0 is greedy; `seed` makes sampling reproducible.

    >>> SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=64, stop=["\\n\\n"])  # doctest: +ELLIPSIS
    SamplingParams(...)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} is negative; use 0 for greedy or a positive value")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p={self.min_p} must be in [0, 1)")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} must be >= 1")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))


@dataclass(slots=True)
class ThinkingBudget:
    """At most `tokens` reasoning tokens, then up to `grace` more to finish the line, then end-think is forced."""

    tokens: int
    grace: int = 32

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.grace < 0:
            raise ValueError(f"thinking budget tokens={self.tokens}, grace={self.grace}: both must be >= 0")


@dataclass(slots=True)
class Constraint:
    """Constrained decoding: a JSON schema for the whole output, or tool schemas for a tool-call turn.

    `tools` are OpenAI-style tool schemas; the output is free text (or reasoning) followed by tool
    calls whose arguments follow their tool's schema. `require_call` forbids answering without a call
    (OpenAI's tool_choice "required"); `parallel_calls=False` allows one call at most.
    """

    json_schema: dict | None = None
    tools: list[dict] | None = None
    require_call: bool = False
    parallel_calls: bool = True

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (self.tools is None):
            raise ValueError("a Constraint takes exactly one of json_schema or tools")


@dataclass(slots=True)
class Request:
    """One generation: prompt token ids plus how to continue them."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    constraint: Constraint | None = None
    thinking: ThinkingBudget | None = None
    thinking_open: bool | None = None  # prompt ends inside <think>; None: detect from the prompt
    session: str | None = None
    priority: int = 0
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.id}: prompt_ids is empty; give at least one token")


@dataclass(slots=True)
class Counts:
    prompt: int = 0
    cached_prompt: int = 0
    thinking: int = 0
    output: int = 0


@dataclass(slots=True)
class TokenEvent:
    """One streamed token with the model's log-probability of it."""

    token_id: int
    logprob: float


@dataclass(slots=True)
class Result:
    """A finished request: every token it produced, why it stopped, and its counts."""

    id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    counts: Counts
    error: str | None = None
