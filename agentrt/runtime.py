"""The runtime: one model, one tool registry, one recorder, and an asyncio task per agent."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from .agent import Agent, AgentContext, AgentResult, MaxTurns, tool_loop
from .budget import BudgetExceeded
from .gcpacing import paced_full_collections
from .llm import ChatModel
from .recorder import NullRecorder, Recorder



@dataclass(slots=True)
class Episode:
    """One agent run with full control over how it starts.

    `messages`: start from this conversation instead of the agent's instructions and the task (a
    resumed or forked trajectory). `meta` goes to the recorder's `trajectory_started`; with
    `parent_node` (a store node id) the new messages hang under that node, so a fork is a sibling
    branch of the trajectory it came from, and the given `messages` (that branch's prefix) are not
    recorded again. `fork_of` names the trajectory forked.
    """

    agent: Agent
    task: Any = None
    messages: list[dict] | None = None
    meta: dict = field(default_factory=dict)


RunItem = Agent | tuple[Agent, Any] | Episode
LAUNCH_BATCH = 32
DEFAULT_MODEL_CALLS = 32


@dataclass(slots=True)
class AgentState:
    """A live view of one agent, for displays: polled, never pushed."""

    name: str
    trajectory_id: str
    status: str = "waiting"  # waiting, running, then the result's status
    ctx: AgentContext | None = None
    result: AgentResult | None = None
    started: float | None = None


@dataclass(slots=True)
class RunSummary:
    run_id: str
    agents: int
    by_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0
    reward: float = 0.0


class Runtime:
    """Runs agents concurrently on one model.

    `model`: "tiny" (the embedded model), a checkpoint path, or any `ChatModel` (`RemoteEngine`,
    `ScriptedModel`, a `LocalModel` you built). `tools`: tools every agent may name.
    `max_concurrency`: agents running at once (the rest wait to start). `max_model_calls`: model
    calls in flight at once (default: the model's `max_concurrency`, else 32); agents past it wait
    for the model (backpressure), which keeps the event loop's ready queue, and so its lag,
    bounded however many agents run.

    >>> async with Runtime(model="tiny") as rt:                         # doctest: +SKIP
    ...     results = await rt.run([(calc, "What is 17 * 23?"), (calc, "And 2 ** 10?")])
    >>> results = Runtime.run_sync([(calc, "What is 17 * 23?")], model="tiny")  # doctest: +SKIP
    """

    def __init__(self, model: str | ChatModel = "tiny", *, tools: Iterable[Any] = (), recorder: Recorder | None = None,
                 max_concurrency: int = 1024, max_model_calls: int | None = None, engine_config: Any = None):
        from agentrt.tools import ToolRegistry

        if max_concurrency < 1 or (max_model_calls is not None and max_model_calls < 1):
            raise ValueError(f"max_concurrency={max_concurrency} and max_model_calls={max_model_calls} must be >= 1")
        self.max_model_calls = max_model_calls
        self._model_spec, self._engine_config = model, engine_config
        self.model: ChatModel | None = model if not isinstance(model, str) else None
        self._owns_model = isinstance(model, str)
        self.tools = ToolRegistry(tools)
        self.recorder: Recorder = recorder or NullRecorder()
        self.max_concurrency = max_concurrency
        self.agents: dict[str, AgentState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._gate: asyncio.Semaphore | None = None
        self._model_gate: asyncio.Semaphore | None = None
        self.last_summary: RunSummary | None = None

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self.model is None:
            from .local import LocalModel

            self.model = await LocalModel.load(self._model_spec, self._engine_config)
        start = getattr(self.model, "start", None)
        if start is not None:
            await start()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self.model is not None and self._owns_model:
            await self.model.close()

    # -- running -----------------------------------------------------------------------------------
    async def run(self, items: Iterable[RunItem], *, run_id: str | None = None) -> list[AgentResult]:
        """Run every (agent, task) pair (an agent alone has no task) concurrently; results in input
        order. One agent failing, timing out or being cancelled never disturbs the others."""
        if self.model is None:
            raise RuntimeError("the runtime is not started; use `async with Runtime(...) as rt:`")
        episodes = [item if isinstance(item, Episode) else Episode(item) if isinstance(item, Agent)
                    else Episode(*item) for item in items]
        for ep in episodes:
            if not isinstance(ep.agent, Agent):
                raise TypeError(f"run() takes Agents, (Agent, task) pairs or Episodes, got {ep.agent!r}")
        run_id = run_id or uuid.uuid4().hex
        started = time.monotonic()
        self._gate = self._gate or asyncio.Semaphore(self.max_concurrency)
        if self._model_gate is None:
            limit = self.max_model_calls or getattr(self.model, "max_concurrency", DEFAULT_MODEL_CALLS)
            self._model_gate = asyncio.Semaphore(limit)
        self.recorder.run_started(run_id, {"agents": len(episodes), "model": getattr(self.model, "name", "?")})
        async with paced_full_collections():  # no full-collection pause mid-run (gcpacing.py)
            tasks, ids = [], []
            for i, ep in enumerate(episodes):
                if i and i % LAUNCH_BATCH == 0:
                    await asyncio.sleep(0)  # start agents a batch per loop tick: no burst of thousands at once
                trajectory_id = uuid.uuid4().hex
                self.agents[trajectory_id] = AgentState(ep.agent.name, trajectory_id)
                self.recorder.trajectory_started(trajectory_id, run_id, ep.agent.name, {
                    "task": ep.task, "budget": ep.agent.budget.model_dump(), **ep.meta})
                t = asyncio.create_task(self._episode(trajectory_id, ep), name=f"agent:{ep.agent.name}")
                self._tasks[trajectory_id] = t
                tasks.append(t)
                ids.append(trajectory_id)
            try:
                results = await asyncio.gather(*tasks)
            finally:
                for trajectory_id in ids:
                    self._tasks.pop(trajectory_id, None)
        self.last_summary = summarize(run_id, results, time.monotonic() - started)
        self.recorder.run_finished(run_id, "finished", dataclasses.asdict(self.last_summary))
        return results

    @classmethod
    def run_sync(cls, items: Iterable[RunItem], **kwargs: Any) -> list[AgentResult]:
        """`run` for scripts: starts a runtime with `kwargs`, runs `items`, closes it."""
        async def main() -> list[AgentResult]:
            async with cls(**kwargs) as rt:
                return await rt.run(items)
        return asyncio.run(main())

    def cancel(self, trajectory_id: str) -> bool:
        """Cancel one running agent (recorded as "cancelled"); False if it is not running."""
        task = self._tasks.get(trajectory_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    def snapshot(self) -> list[AgentState]:
        """The agents of this runtime as they are now (for displays)."""
        return list(self.agents.values())

    # -- one episode -------------------------------------------------------------------------------
    async def _episode(self, trajectory_id: str, ep: Episode) -> AgentResult:
        state = self.agents[trajectory_id]
        try:
            async with self._gate:
                return await self._run_agent(trajectory_id, ep, state)
        except asyncio.CancelledError:
            ctx = state.ctx
            result = self._result(ctx, ep.agent, trajectory_id, ep.task, "cancelled", None) if ctx else AgentResult(
                ep.agent.name, trajectory_id, ep.task, "cancelled")
            self._finish(state, result)
            return result

    async def _run_agent(self, trajectory_id: str, ep: Episode, state: AgentState) -> AgentResult:
        agent, task = ep.agent, ep.task
        try:
            registry = self._registry_for(agent)
        except ValueError as e:
            result = AgentResult(agent.name, trajectory_id, task, "failed", str(e), error=str(e))
            self._finish(state, result)
            return result
        ctx = AgentContext(agent, task, self.model, registry, self.recorder, trajectory_id,
                           model_gate=self._model_gate)
        if ep.messages is not None:
            ctx.messages = [dict(m) for m in ep.messages]
        state.ctx, state.status, state.started = ctx, "running", time.monotonic()
        if "parent_node" not in ep.meta:  # a fork's prefix is already recorded
            for message in ctx.messages:
                self.recorder.message(trajectory_id, message)
        policy = agent.policy or tool_loop
        status, reason, output, error = "done", None, None, None
        try:
            if agent.timeout is not None:
                async with asyncio.timeout(agent.timeout):
                    output = await policy(ctx)
            else:
                output = await policy(ctx)
        except BudgetExceeded as e:
            status, reason = "budget", e.reason
            self.recorder.event(trajectory_id, "budget", {"reason": e.reason, "detail": e.detail})
        except MaxTurns as e:
            status, reason = "max_turns", str(e)
        except TimeoutError:
            status, reason = "timeout", f"agent timeout of {agent.timeout} s"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the agent's own bug: recorded, never propagated to the others
            status, reason, error = "failed", f"{type(e).__name__}: {e}", traceback.format_exc()
        result = self._result(ctx, agent, trajectory_id, task, status, reason, output, error)
        self._finish(state, result)
        return result

    def _registry_for(self, agent: Agent):
        from agentrt.tools import ToolRegistry

        own, named = [t for t in agent.tools if not isinstance(t, str)], [t for t in agent.tools if isinstance(t, str)]
        missing = [n for n in named if n not in self.tools]
        if missing:
            raise ValueError(f"agent {agent.name!r} names tools {missing} that the runtime does not have; "
                             f"registered: {self.tools.names}")
        return ToolRegistry([self.tools.get(n) for n in named] + own, default_timeout=self.tools.default_timeout)

    def _result(self, ctx: AgentContext, agent: Agent, trajectory_id: str, task: Any, status: str,
                reason: str | None, output: Any = None, error: str | None = None) -> AgentResult:
        ctx.tracker.spent.seconds = ctx.tracker.elapsed()
        return AgentResult(agent=agent.name, trajectory_id=trajectory_id, task=task, status=status, reason=reason,
                           output=output, error=error, spent=ctx.tracker.spent, rewards=dict(ctx.rewards),
                           tool_failures=dict(ctx.tools.failures), messages=ctx.messages)

    def _finish(self, state: AgentState, result: AgentResult) -> None:
        state.status, state.result = result.status, result
        self.recorder.trajectory_finished(result.trajectory_id, result)


def summarize(run_id: str, results: list[AgentResult], seconds: float) -> RunSummary:
    s = RunSummary(run_id=run_id, agents=len(results), seconds=seconds)
    for r in results:
        s.by_status[r.status] = s.by_status.get(r.status, 0) + 1
        s.turns += r.spent.turns
        s.tool_calls += r.spent.tool_calls
        s.prompt_tokens += r.spent.prompt_tokens
        s.output_tokens += r.spent.output_tokens
        s.thinking_tokens += r.spent.thinking_tokens
        s.reward += r.reward
    return s
