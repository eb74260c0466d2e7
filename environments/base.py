"""The Environment API: a world that hands each agent seat its opening messages and tools bound to
the world's state, advances (in ticks, for multi-agent worlds) and scores what the agents did."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar

Policy = Callable[[Any], Awaitable[Any]]  # async def policy(ctx: agentrt.AgentContext) -> Any


@dataclass(slots=True)
class Seat:
    """One agent's place in a world: who it is, what it is asked, and the tools it acts through."""

    id: str
    instructions: str
    task: str
    tools: list[Any] = field(default_factory=list)  # agentrt.tools.Tool objects bound to the world's state

    @property
    def messages(self) -> list[dict]:
        return [{"role": "system", "content": self.instructions}, {"role": "user", "content": self.task}]


class Environment(ABC):
    """A world for agents.

    - `reset(seed)` builds a fresh world (deterministic for a seed) and returns its seats.
    - `done` says the episode is over (all ticks played, the task submitted, ...).
    - `reward(seat_id)` is the world's score for a seat (profit, rubric, verified answer).
    - `baseline(seat_id)` is a scripted policy using only the seat's tools, to compare models with.
    - Multi-agent worlds advance in ticks: `run_ticks()` is started beside the agents and advances
      the world whenever every active seat has ended its tick (`end_tick(seat_id)`) or
      `tick_timeout` passed; `leave(seat_id)` tells it a seat's agent stopped. Single-agent worlds
      keep the defaults (no ticks).

    >>> env = LogisticsWorld(trucks=4)                                   # doctest: +SKIP
    >>> seats = env.reset(seed=0)
    >>> results = await run_environment(rt, env, policy="baseline")
    """

    name: ClassVar[str] = "environment"

    @abstractmethod
    def reset(self, seed: int = 0) -> list[Seat]: ...

    @property
    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def reward(self, seat_id: str) -> float: ...

    @abstractmethod
    def baseline(self, seat_id: str) -> Policy: ...

    def reward_info(self, seat_id: str) -> dict:
        """The parts of `reward(seat_id)` (a rubric's items, a verified answer), recorded with it."""
        return {}

    def close(self) -> None:
        """Release what the world holds (work files, connections)."""

    # -- ticks (multi-agent worlds override `advance`) -------------------------------------------
    tick_timeout: float = 5.0

    def advance(self) -> None:
        """Play one tick of the world (multi-agent worlds); called by `run_ticks`."""

    def leave(self, seat_id: str) -> None:
        """The seat's agent stopped acting (finished, failed or ran out of budget): ticks no longer wait for it."""

    async def run_ticks(self) -> None:
        """Advance the world until `done`; a no-op for worlds without ticks."""


async def run_environment(rt: Any, env: Environment, *, seed: int = 0, policy: str | Policy | None = None,
                          agent: Any = None, **agent_fields: Any) -> list[Any]:
    """Reset `env`, run one agent per seat on runtime `rt` (with the world's tick loop beside them
    for multi-agent worlds) and return the `AgentResult`s with the world's rewards recorded.

    `policy`: None for the model's tool loop, "baseline" for the world's scripted baseline, or a
    policy function used for every seat. `agent`: an `agentrt.Agent` used as a template (its name,
    budget, sampling...); `agent_fields` override its fields.
    """
    from agentrt import Agent
    from agentrt.agent import tool_loop
    from agentrt.runtime import Episode

    seats = env.reset(seed)
    items = []
    for seat in seats:
        fields = dict(agent_fields)
        inner = env.baseline(seat.id) if policy == "baseline" else policy if callable(policy) else None
        template = agent or Agent(name=seat.id)
        inner = inner or template.policy or tool_loop
        fields.update(name=seat.id, instructions=seat.instructions, tools=list(seat.tools),
                      policy=_leaving(env, seat.id, inner))
        meta = {"environment": env.name, "seed": seed, "seat": seat.id, **getattr(seat, "meta", {})}
        items.append(Episode(template.model_copy(update=fields), seat.task, messages=seat.messages, meta=meta))
    ticks = asyncio.create_task(env.run_ticks())
    try:
        results = await rt.run(items)
    finally:
        if not ticks.done():
            ticks.cancel()
        await asyncio.gather(ticks, return_exceptions=True)
    if not ticks.cancelled() and ticks.exception() is not None:
        raise RuntimeError(f"the {env.name} world's tick loop failed") from ticks.exception()
    for seat, result in zip(seats, results):
        value = env.reward(seat.id)
        result.rewards[env.name] = value
        rt.recorder.reward(result.trajectory_id, env.name, value, {"seat": seat.id, **env.reward_info(seat.id)})
    return results


def _leaving(env: Environment, seat_id: str, policy: Policy) -> Policy:
    """`policy`, telling the world when the seat's agent stops, however it stops."""
    async def seat(ctx: Any) -> Any:
        try:
            return await policy(ctx)
        finally:
            env.leave(seat_id)
    return seat


def play_until_done(env: Environment) -> Policy:
    """The model's tool loop for a ticked world: every turn must call one tool (the engine constrains
    the call to the tools' schemas) until `env.done`, then one answer without tools. The built-in
    loop stops at the first turn without a call, which for a weak model comes long before the end.
    """
    from agentrt.agent import MaxTurns

    async def play(ctx) -> str:
        for _ in range(ctx.agent.max_turns):
            if env.done:
                return (await ctx.chat(tools=False)).content
            reply = await ctx.chat(require_call=True, parallel_calls=False)
            ctx.reject_calls(reply.errors)  # a call that did not parse: the model is told what was wrong
            await ctx.call_tools(reply.tool_calls)
        raise MaxTurns(f"{ctx.agent.max_turns} turns before the world was done")
    return play
