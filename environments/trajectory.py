"""`TrajectoryEnv`: a recorded trajectory, restored at one of its messages, as an environment.

The seat opens with the recorded conversation up to the fork point; its tools answer calls the
recording holds from the recording, and run the others live or fail, as configured. That turns any
recorded episode into a counterfactual environment: what would another sampling or policy have
done from message k on?

>>> env = TrajectoryEnv(store, trajectory_id, fork_at=3, world=LogisticsWorld(trucks=1),
...                     on_unrecorded="live")                                # doctest: +SKIP
>>> [seat] = env.reset(seed=0)
>>> agent = Agent(name=seat.id, tools=seat.tools)
>>> [r] = await rt.run([Episode(agent, seat.task, messages=env.seat_messages, meta=env.fork_meta)])
>>> env.reward(seat.id)
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from agentrt.llm import ToolCallRequest
from agentrt.replay import append_message, call_key, recorded_value
from agentrt.tools import Tool, ToolError, tool

from .base import Environment, Policy, Seat

if TYPE_CHECKING:
    from agentrt.store import StoreReader, ToolCallRecord

NOT_SERVED = ("unknown_tool", "invalid_call")  # recorded calls that never reached a tool


@dataclass(slots=True)
class ForkSeat(Seat):
    """A seat that opens with a recorded conversation (`messages`), not just instructions and task;
    `meta` is what a runtime `Episode` needs to record it as a fork (`parent_node`, `fork_of`)."""

    opening: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def messages(self) -> list[dict]:
        return [dict(m) for m in self.opening]


class TrajectoryEnv(Environment):
    """A recorded trajectory restored at message index `fork_at` (0-based, in `reader.messages(...)`;
    that message is the last of the opening), as a single-seat environment.

    - `reset(seed)` returns one `ForkSeat` (id: the recorded agent's name): `instructions` and
      `task` are the first system and user messages of the opening, `messages` / `seat_messages`
      the whole opening, `meta` / `fork_meta` the fork's `{"parent_node", "fork_of"}`. Start an
      episode with `Episode(agent, seat.task, messages=env.seat_messages, meta=env.fork_meta)` so
      the store records it as a branch of the original tree.
    - Tools: one per name among `live_tools` (or, with `world`, the world's tools for that seat) and
      the tools the trajectory called. A call is answered from the recording when a call recorded
      **after the fork point** (a tool call row recorded after the fork message) has the same name
      and arguments; each recorded result is served once, the earliest match first. Calls before
      the fork point are never served: their results are already in the opening. Any other call runs
      the live tool (`on_unrecorded="live"`) or fails with an error result that says why
      (`"fail"`). `served`, `ran_live` and `unrecorded` list what happened since `reset`.
      Recorded results come back with the recorded text exactly for successes and `tool_error`
      failures; other recorded failures (timeouts, crashes) are reported as a tool error holding
      the recorded text. A tool known only from the recording is offered without a parameter schema.
    - `reward(seat_id)`: with `world`, the world's reward for its seat (the world is reset with the
      same seed; calls answered from the recording do not reach it, so it reflects what ran live);
      without one, the sum of the rewards recorded on the trajectory.
    - `baseline(seat_id)`: replays the recorded actions after the fork point (messages appended as
      recorded, tool calls made as recorded and so answered from the recording); returns the
      recorded output.
    """

    name = "trajectory"

    def __init__(self, reader: StoreReader, trajectory_id: str, *, fork_at: int, world: Environment | None = None,
                 live_tools: list[Tool] | None = None, on_unrecorded: Literal["live", "fail"] = "fail"):
        if on_unrecorded not in ("live", "fail"):
            raise ValueError(f"on_unrecorded={on_unrecorded!r}: use 'live' (run the live tool) or 'fail'")
        if on_unrecorded == "live" and live_tools is None and world is None:
            raise ValueError("on_unrecorded='live' needs tools to run: pass live_tools=[...] or world=...")
        self.trajectory_id, self.world, self.on_unrecorded = trajectory_id, world, on_unrecorded
        self.live_tools = list(live_tools) if live_tools is not None else None
        self.record = reader.trajectory(trajectory_id)
        path = reader.messages(trajectory_id)
        if not 0 <= fork_at < len(path):
            raise ValueError(f"fork_at={fork_at}: trajectory {trajectory_id} has {len(path)} messages, so use "
                             f"0..{len(path) - 1}")
        self.fork_at, self.fork_node = fork_at, path[fork_at]
        self.seat_messages = [n.message for n in path[:fork_at + 1]]
        self.seat_id = self.record.agent
        self._later = path[fork_at + 1:]
        every = reader.tool_calls(trajectory_id)
        self._names = list(dict.fromkeys(c.name for c in every if c.name and c.error not in NOT_SERVED))
        self.recorded: list[ToolCallRecord] = [c for c in every if c.id > self.fork_node.id]
        self.recorded_reward = sum(r.value or 0.0 for r in reader.rewards(trajectory_id))
        self.served: list[ToolCallRecord] = []
        self.ran_live: list[tuple[str, dict]] = []
        self.unrecorded: list[tuple[str, dict]] = []
        self._used: set[int] = set()
        self._live: dict[str, Tool] = {}
        self._world_seat: str | None = None
        self._left = False

    @property
    def fork_meta(self) -> dict:
        return {"parent_node": self.fork_node.id, "fork_of": self.trajectory_id}

    # -- Environment -----------------------------------------------------------------------------
    def reset(self, seed: int = 0) -> list[Seat]:
        self.served, self.ran_live, self.unrecorded, self._used, self._left = [], [], [], set(), False
        live = self.live_tools
        if self.world is not None:
            seats = self.world.reset(seed)
            seat = next((s for s in seats if s.id == self.seat_id), seats[0])
            self._world_seat = seat.id
            live = seat.tools if live is None else live
        self._live = {t.name: t for t in live or []}
        names = list(dict.fromkeys([*self._live, *self._names]))
        system = next((m.get("content") or "" for m in self.seat_messages if m.get("role") == "system"), "")
        task = next((m.get("content") or "" for m in self.seat_messages if m.get("role") == "user"), "")
        return [ForkSeat(self.seat_id, system, task, [self._tool(n) for n in names], opening=self.seat_messages,
                         meta=self.fork_meta)]

    @property
    def done(self) -> bool:
        return self._left

    def leave(self, seat_id: str) -> None:
        self._left = True

    def reward(self, seat_id: str) -> float:
        if self.world is not None:
            return self.world.reward(self._world_seat)
        return self.recorded_reward

    def reward_info(self, seat_id: str) -> dict:
        return {"fork_of": self.trajectory_id, "fork_at": self.fork_at, "served": len(self.served),
                "live": len(self.ran_live), "unrecorded": len(self.unrecorded),
                "source": "world" if self.world is not None else "recorded"}

    def baseline(self, seat_id: str) -> Policy:
        by_node = {c.node_id: c for c in self.recorded if c.node_id is not None}
        steps = sorted([(n.id, False, n) for n in self._later]
                       + [(c.id, True, c) for c in self.recorded if c.node_id is None], key=lambda s: s[0])

        async def replay_actions(ctx: Any) -> Any:
            for _, loose_call, item in steps:
                if loose_call:  # a call whose result was not appended to the conversation
                    await ctx.call_tools([_request(item)], append=False)
                elif item.id in by_node:
                    await ctx.call_tools([_request(by_node[item.id])])
                else:
                    append_message(ctx, item.message)
            return self.record.output
        return replay_actions

    def close(self) -> None:
        if self.world is not None:
            self.world.close()

    # -- tools -----------------------------------------------------------------------------------
    def _tool(self, name: str) -> Tool:
        live = self._live.get(name)

        async def answer(**arguments: Any) -> Any:
            return await self._answer(name, arguments)

        if live is None:
            return tool(answer, name=name, schema={"type": "object"},
                        description=f"(known from the recording of trajectory {self.trajectory_id})")
        return tool(answer, name=name, description=live.description, schema=copy.deepcopy(live.parameters),
                    timeout=live.timeout, side_effects=live.side_effects)

    async def _answer(self, name: str, arguments: dict) -> Any:
        key = call_key(name, arguments)
        for i, rec in enumerate(self.recorded):
            if i not in self._used and call_key(rec.name, rec.arguments) == key:
                self._used.add(i)
                self.served.append(rec)
                return _outcome(rec, self._usage(name))
        live = self._live.get(name)
        if self.on_unrecorded == "live" and live is not None:
            self.ran_live.append((name, arguments))
            return await _run(live, arguments)
        self.unrecorded.append((name, arguments))
        why = (f"no live tool `{name}` was given" if self.on_unrecorded == "live" else
               "this environment has on_unrecorded='fail' (pass live_tools or world, and on_unrecorded='live', "
               "to run such calls)")
        raise ToolError(f"this call is not in the recording of trajectory {self.trajectory_id} after message "
                        f"{self.fork_at}, and {why}")

    def _usage(self, name: str) -> str:
        live = self._live.get(name)
        return live.usage() if live is not None else f"{name}()"


def _request(rec: ToolCallRecord) -> ToolCallRequest:
    return ToolCallRequest(rec.call_id or f"call_{rec.id}", rec.name, rec.arguments)


def _outcome(rec: ToolCallRecord, usage: str) -> Any:
    """The recorded result, as the tool's return value or the error it raised, so the registry gives
    the model the recorded text again."""
    content = rec.content if isinstance(rec.content, str) else str(rec.content)
    if rec.ok:
        return recorded_value(content)
    prefix, suffix = f"tool `{rec.name}` reported an error", f"\nUsage: {usage}"
    if rec.error == "tool_error" and content.startswith(prefix) and content.endswith(suffix):
        raise ToolError(content[len(prefix):-len(suffix)].removeprefix(": "))
    raise ToolError(f"(recorded {rec.error}) {content}")


async def _run(t: Tool, arguments: dict) -> Any:
    """Run a live tool as its registry would (its errors reach the seat's registry unchanged)."""
    kwargs, problems = t.check_arguments(arguments)
    if problems:
        raise ToolError("invalid arguments:\n" + "\n".join(f"- {p}" for p in problems))
    value = await t.fn(**kwargs) if t.is_async else await asyncio.to_thread(t.fn, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value


__all__ = ["ForkSeat", "TrajectoryEnv"]
