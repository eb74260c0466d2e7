"""Agents: a pydantic definition, the context a policy acts through, and the built-in tool loop."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .budget import Budget, BudgetExceeded, BudgetTracker, Spent
from .llm import ChatModel, ChatOptions, ChatReply, ToolCallRequest

if TYPE_CHECKING:
    from agentrt.tools import ToolRegistry, ToolResult

    from .recorder import Recorder

Policy = Callable[["AgentContext"], Awaitable[Any]]


class Sampling(BaseModel):
    """Sampling settings of an agent's model calls (greedy by default)."""

    model_config = ConfigDict(frozen=True)

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class Agent(BaseModel):
    """An agent definition: who it is, what it may use, and how it acts.

    Without `policy` the agent runs the built-in tool loop: model turn, tool calls executed (in
    parallel), results appended, next turn, until the model answers without calling a tool,
    `max_turns` model turns were made, or a budget runs out. With `policy`, the coroutine
    `policy(ctx)` acts instead and its return value is the episode's output.

    `tools` holds `agentrt.tools.Tool` objects, plain functions (made into tools with `@tool`'s
    rules) or names of tools registered on the `Runtime`.

    >>> from agentrt import Agent, Budget, tool
    >>> @tool
    ... def add(a: float, b: float) -> float:
    ...     "Add two numbers."
    ...     return a + b
    >>> calc = Agent(name="calc", instructions="Use the tools.", tools=[add], budget=Budget(tool_calls=4))
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    name: str = Field(min_length=1)
    instructions: str = ""
    tools: list[Any] = Field(default_factory=list)
    budget: Budget = Field(default_factory=Budget)
    sampling: Sampling = Field(default_factory=Sampling)
    max_turns: int = Field(10, ge=1)
    timeout: float | None = Field(None, gt=0)
    constrain_tools: bool = True
    policy: Policy | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, tools: list[Any]) -> list[Any]:
        from agentrt.tools import Tool, tool

        out = []
        for t in tools:
            if isinstance(t, (Tool, str)):
                out.append(t)
            elif callable(t):
                out.append(tool(t))
            else:
                raise ValueError(f"tool {t!r} is neither a Tool, a function nor a registered tool name")
        return out


@dataclass(slots=True)
class AgentResult:
    """How one episode ended.

    `status`: "done" (answered, or the policy returned), "max_turns", "budget" (see `reason`,
    e.g. "budget:tool_calls"), "timeout", "cancelled" or "failed" (`error` holds the traceback).
    """

    agent: str
    trajectory_id: str
    task: Any
    status: str
    reason: str | None = None
    output: Any = None
    error: str | None = None
    spent: Spent = field(default_factory=Spent)
    rewards: dict[str, float] = field(default_factory=dict)
    tool_failures: dict[str, int] = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def reward(self) -> float:
        return sum(self.rewards.values())


class AgentContext:
    """What a policy acts through. Every model and tool call goes through here, so every one is
    budgeted and recorded.

    >>> async def policy(ctx: AgentContext) -> str:
    ...     reply = await ctx.chat("What is 2 + 3? Use the add tool.")
    ...     results = await ctx.call_tools(reply.tool_calls)
    ...     answer = await ctx.chat()          # sees the tool results
    ...     ctx.reward(1.0 if "5" in answer.content else 0.0)
    ...     return answer.content
    """

    def __init__(self, agent: Agent, task: Any, model: ChatModel, tools: ToolRegistry, recorder: Recorder,
                 trajectory_id: str | None = None, session: str | None = None,
                 model_gate: asyncio.Semaphore | None = None):
        self.agent, self.task, self.model, self.tools, self.recorder = agent, task, model, tools, recorder
        self.model_gate = model_gate or asyncio.Semaphore(1 << 30)
        self.trajectory_id = trajectory_id or uuid.uuid4().hex
        self.session = session or self.trajectory_id
        self.tracker = BudgetTracker(agent.budget)
        self.state: dict[str, Any] = {}
        self.rewards: dict[str, float] = {}
        self.messages: list[dict] = []
        self.last_action = "started"
        self._schema_cache: dict[Any, list[dict]] = {}
        self._call_ids: set[str] = set()
        if agent.instructions:  # recorded by the runtime once the trajectory is started
            self.messages.append({"role": "system", "content": agent.instructions})
        if task is not None:
            self.messages.append({"role": "user", "content": task if isinstance(task, str) else str(task)})

    # -- what policies use -------------------------------------------------------------------------
    @property
    def spent(self) -> Spent:
        return self.tracker.spent

    @property
    def budget(self) -> Budget:
        return self.agent.budget

    async def chat(self, message: str | dict | None = None, *, tools: bool | list[str] = True,
                   require_call: bool = False, **options: Any) -> ChatReply:
        """Append `message` (a user message, if given), run one model turn on the conversation and
        append the reply. `tools`: offer all the agent's tools (True), none, or the named ones."""
        if message is not None:
            self._append(message if isinstance(message, dict) else {"role": "user", "content": message})
        reply = await self.generate(self.messages, tools=tools, require_call=require_call, **options)
        self._append(reply.to_message())
        return reply

    async def generate(self, messages: list[dict], *, tools: bool | list[str] = False, require_call: bool = False,
                       **options: Any) -> ChatReply:
        """One model call on `messages` without touching the conversation (budgeted and recorded)."""
        schemas = self._schemas(tools)
        s = self.agent.sampling
        opts = ChatOptions(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed,
                           stop=list(s.stop), constrain_tools=self.agent.constrain_tools,
                           require_call=require_call, session=self.session)
        for key, value in options.items():
            if not hasattr(opts, key):
                raise TypeError(f"unknown model option {key!r}; ChatOptions has {sorted(ChatOptions.__slots__)}")
            setattr(opts, key, value)
        opts.max_tokens, opts.max_total_tokens = self.tracker.before_model(opts.max_tokens)
        self._think_budget(opts)
        self.last_action = "thinking"
        reply = await self._within_time(self._call_model(messages, schemas, opts))
        if reply.finish_reason == "budget":
            raise BudgetExceeded("total_tokens", f"{self.spent.total_tokens} tokens used and the next prompt does not "
                                 f"fit the {opts.max_total_tokens} left of {self.agent.budget.total_tokens}")
        u = reply.usage
        self.tracker.charge_model(u.prompt_tokens, u.cached_tokens, u.thinking_tokens, u.output_tokens)
        for i, call in enumerate(reply.tool_calls + reply.errors):  # ids unique within the episode
            if call.id in self._call_ids:
                call.id = f"call_{self.spent.turns}_{i}"
            self._call_ids.add(call.id)
        self.recorder.model_call(self.trajectory_id, reply, {"options": opts, "turn": self.spent.turns,
                                                             "tools": schemas})
        self.last_action = f"called {len(reply.tool_calls)} tools" if reply.tool_calls else "answered"
        return reply

    async def call_tool(self, name: str, arguments: dict | str | None = None, *, call_id: str | None = None
                        ) -> ToolResult:
        """Run one tool call (budgeted, recorded); errors come back as results, never raised."""
        call = ToolCallRequest(call_id or f"call_{uuid.uuid4().hex[:8]}", name, {} if arguments is None else arguments)
        return (await self.call_tools([call]))[0]

    async def call_tools(self, calls: list[ToolCallRequest], *, append: bool = True) -> list[ToolResult]:
        """Run a turn's tool calls concurrently and (by default) append their results to the
        conversation. Calls past the `tool_calls` budget are not executed: the ones within it run,
        then `BudgetExceeded` ends the episode."""
        allowed: list[ToolCallRequest] = []
        exceeded: BudgetExceeded | None = None
        for call in calls:
            try:
                self.tracker.before_tool()
            except BudgetExceeded as e:
                exceeded = e
                break
            self.tracker.charge_tool()
            allowed.append(call)
        self.last_action = "tools: " + ", ".join(str(c.name) for c in allowed)
        results = await self._within_time(self.tools.dispatch_many(allowed)) if allowed else []
        for call, result in zip(allowed, results):
            self.recorder.tool_call(self.trajectory_id, {"id": call.id, "name": call.name,
                                                         "arguments": call.arguments}, result)
            if append:
                self._append(result.to_message())
        if exceeded is not None:
            raise exceeded
        return results

    def reject_calls(self, errors: list[ToolCallRequest]) -> None:
        """Answer tool calls that did not parse (`reply.errors`): each gets a tool message with
        what was wrong, tied to its id, and counts as a failure of its tool."""
        for bad in errors:
            self.tools.failures[bad.name] += 1
            self._append({"role": "tool", "tool_call_id": bad.id, "name": bad.name, "content": str(bad.arguments)})

    def reward(self, value: float, *, name: str = "reward", info: dict | None = None) -> None:
        """Record a reward; rewards of the same name add up."""
        self.rewards[name] = self.rewards.get(name, 0.0) + float(value)
        self.recorder.reward(self.trajectory_id, name, float(value), info)

    # -- internals ---------------------------------------------------------------------------------
    def _append(self, message: dict) -> None:
        self.messages.append(message)
        self.recorder.message(self.trajectory_id, message)

    def _schemas(self, tools: bool | list[str]) -> list[dict] | None:
        if tools is False or not len(self.tools):
            return None
        key = True if tools is True else tuple(tools)
        if key not in self._schema_cache:  # the same list every turn: no rebuilding, a stable prompt prefix
            self._schema_cache[key] = self.tools.schemas(None if tools is True else tools)
        return self._schema_cache[key]

    def _think_budget(self, opts: ChatOptions) -> None:
        """What is left of the episode's thinking budget goes with the request; the grace window
        is carved out of it (a quarter at most), so the episode never thinks past its budget."""
        left = self.tracker.think_tokens_left()
        if left is None:
            return
        if opts.think_tokens is not None:
            left = min(left, opts.think_tokens)
        opts.think_grace = min(opts.think_grace, left // 4)
        opts.think_tokens = left - opts.think_grace

    async def _call_model(self, messages: list[dict], schemas: list[dict] | None, opts: ChatOptions) -> ChatReply:
        async with self.model_gate:  # backpressure: agents past the model's capacity wait here
            return await self.model.chat(messages, schemas, opts)

    async def _within_time(self, work: Awaitable[Any]) -> Any:
        left = self.tracker.seconds_left()
        if left is None:
            return await work
        try:
            return await asyncio.wait_for(work, timeout=max(left, 0.0))
        except asyncio.TimeoutError:
            raise BudgetExceeded("seconds", f"ran out during a call, limit {self.agent.budget.seconds} s") from None


class MaxTurns(Exception):
    """The tool loop made `max_turns` model turns without a final answer."""


async def tool_loop(ctx: AgentContext) -> str:
    """The built-in policy: call the model, run its tool calls, repeat until it answers."""
    for _ in range(ctx.agent.max_turns):
        reply = await ctx.chat()
        if not reply.tool_calls and not reply.errors:
            return reply.content
        ctx.reject_calls(reply.errors)  # calls that did not parse: the model is told what was wrong
        if reply.tool_calls:
            await ctx.call_tools(reply.tool_calls)
    raise MaxTurns(f"{ctx.agent.max_turns} turns without a final answer")
