"""`agentrt bench agents`: the runtime's own overhead, with a zero-latency scripted model.

Each agent runs the tool loop for `turns` rounds (model call -> one tool call -> result) and then
answers. The model is a Python function that returns the next call at once, and the tool is an
async function that returns at once, so what is measured is the runtime: scheduling, message
handling, schema validation, dispatch. The peer is PydanticAI's `Agent` with its `FunctionModel`
running the same workload in the same process. A probe task measures event-loop lag (how late a
1 ms sleep wakes up) throughout each run.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from agentrt.bench import tables
from agentrt.bench.tables import markdown_table


@dataclass(slots=True)
class Outcome:
    name: str
    agents: int
    turns: int
    seconds: float
    lag_ms: list[float] = field(default_factory=list)
    completed: int = 0

    @property
    def turns_per_s(self) -> float:
        return self.agents * self.turns / self.seconds

    def lag(self, q: float) -> float:
        if not self.lag_ms:
            return 0.0
        ordered = sorted(self.lag_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LagProbe:
    """Sleeps `interval` seconds in a loop and records how late each wake-up is (ms)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.samples = interval, []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, (time.perf_counter() - t - self.interval) * 1e3))

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def lookup(key: int) -> int:
    """Look a key up.

    Args:
        key: The key.
    """
    return key * 2


async def run_agentrt(agents: int, turns: int) -> tuple[float, int, list[float]]:
    from agentrt import Agent, Runtime, ScriptedModel, tool

    def script(messages: list[dict], tools: list[dict] | None) -> dict | str:
        done = sum(1 for m in messages if m["role"] == "tool")
        if done < turns:
            return {"tool_calls": [{"id": f"call_{done}", "name": "lookup", "arguments": {"key": done}}]}
        return "done"

    agent = Agent(name="bench", instructions="Look keys up.", tools=[tool(lookup)], max_turns=turns + 1)
    async with Runtime(model=ScriptedModel(script), max_concurrency=agents) as rt:
        async with LagProbe() as probe:
            started = time.perf_counter()
            results = await rt.run([(agent, f"task {i}") for i in range(agents)])
            seconds = time.perf_counter() - started
    ok = sum(1 for r in results if r.status == "done" and r.spent.tool_calls == turns)
    return seconds, ok, probe.samples


async def run_pydantic_ai(agents: int, turns: int) -> tuple[float, int, list[float]]:
    from pydantic_ai import Agent as PAgent
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import FunctionModel

    def script(messages: list, info: object) -> ModelResponse:
        done = sum(1 for m in messages for p in m.parts if isinstance(p, ToolReturnPart))
        if done < turns:
            return ModelResponse(parts=[ToolCallPart("lookup", {"key": done}, tool_call_id=f"call_{done}")])
        return ModelResponse(parts=[TextPart("done")])

    agent = PAgent(FunctionModel(script), instructions="Look keys up.", tools=[lookup])
    async with LagProbe() as probe:
        started = time.perf_counter()
        results = await asyncio.gather(*(agent.run(f"task {i}") for i in range(agents)))
        seconds = time.perf_counter() - started
    ok = sum(1 for r in results if r.output == "done")
    return seconds, ok, probe.samples


CONTESTANTS: dict[str, Callable[[int, int], Awaitable[tuple[float, int, list[float]]]]] = {
    "agentrt": run_agentrt,
    "pydantic-ai": run_pydantic_ai,
}


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome]
    machine: dict

    def ratio(self) -> float | None:
        by = {o.name: o for o in self.outcomes}
        if "agentrt" in by and "pydantic-ai" in by:
            return by["agentrt"].turns_per_s / by["pydantic-ai"].turns_per_s
        return None


def run_benchmark(agents: int, turns: int, names: list[str], log: Callable[[str], None] = lambda _: None) -> Report:
    outcomes = []
    for name in names:
        asyncio.run(CONTESTANTS[name](min(agents, 20), 2))  # warm-up: imports, schema building
        gc.collect()
        log(f"running {name}: {agents} agents x {turns} tool turns")
        seconds, ok, lag = asyncio.run(CONTESTANTS[name](agents, turns))
        outcomes.append(Outcome(name, agents, turns, seconds, lag, ok))
    return Report(outcomes, machine_info())


def machine_info() -> dict:
    import pydantic_ai

    return tables.machine_info("pydantic-ai", getattr(pydantic_ai, "__version__", "?"))


def targets(report: Report) -> list[tuple[str, bool]]:
    out = []
    ratio = report.ratio()
    if ratio is not None:
        out.append((f"agentrt / pydantic-ai agent turns/s: {ratio:.2f}x, target >= 1.0x", ratio >= 1.0))
    for o in report.outcomes:
        if o.name == "agentrt":
            out.append((f"agentrt event-loop lag p99: {o.lag(0.99):.1f} ms, target < 20 ms", o.lag(0.99) < 20))
    return out


def rows(report: Report) -> list[list[str]]:
    ratio = report.ratio()
    out = []
    for o in report.outcomes:
        out.append([o.name, f"{o.agents:,}", str(o.turns), f"{o.completed:,}", f"{o.seconds:.2f}",
                    f"{o.turns_per_s:,.0f}", f"{o.lag(0.5):.2f}", f"{o.lag(0.99):.2f}",
                    f"{ratio:.2f}x" if o.name == "agentrt" and ratio else "-"])
    return out


HEADER = ["contestant", "agents", "tool turns each", "completed", "wall s", "agent turns/s", "loop lag p50 ms",
          "loop lag p99 ms", "vs pydantic-ai"]


def format_text(report: Report) -> str:
    return tables.text_report(HEADER, rows(report), targets(report), report.machine)


def format_markdown(report: Report, command: str) -> str:
    return markdown_table(command, HEADER, rows(report))
