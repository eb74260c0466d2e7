"""`agentrt bench store`: the trajectory store under the runtime's full speed.

The workload of `agentrt bench agents` (a zero-latency scripted model, `turns` tool-loop rounds per
agent, all agents at once) runs twice: once with no recorder (the runtime alone), once recording
into a `Store` on a fresh SQLite file. What is measured with the store: recorder calls committed
per second, from the start of the run to the end of the final flush; event-loop lag throughout
(`LagProbe`: how late a 1 ms sleep wakes up), flush included; the file's size once closed.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agentrt.bench import tables
from agentrt.bench.tables import markdown_table

from agentrt.bench.agents import LagProbe, lookup


@dataclass(slots=True)
class Outcome:
    name: str
    agents: int
    turns: int
    seconds: float  # run start to the last commit (the run alone for the runtime without a store)
    completed: int
    events: int = 0  # recorder calls committed
    file_bytes: int | None = None
    lag_ms: list[float] = field(default_factory=list)

    @property
    def turns_per_s(self) -> float:
        return self.agents * self.turns / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    def lag(self, q: float) -> float:
        if not self.lag_ms:
            return 0.0
        ordered = sorted(self.lag_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_workload(agents: int, turns: int, url: str | None, batch_size: int = 500,
                       writer: str = "thread") -> Outcome:
    """The tool-loop workload, recording into a Store at `url` (None: no recorder) with its
    writer on a thread or in a child process (`Store(writer=...)`)."""
    from agentrt import Agent, Runtime, ScriptedModel, tool
    from agentrt.store import Store
    from agentrt.store.schema import sqlite_path

    def script(messages: list[dict], tools: list[dict] | None) -> dict | str:
        done = sum(1 for m in messages if m["role"] == "tool")
        if done < turns:
            return {"tool_calls": [{"id": f"call_{done}", "name": "lookup", "arguments": {"key": done}}]}
        return "done"

    store = Store(url, batch_size=batch_size, writer=writer) if url is not None else None
    agent = Agent(name="bench", instructions="Look keys up.", tools=[tool(lookup)], max_turns=turns + 1)
    try:
        async with Runtime(model=ScriptedModel(script), max_concurrency=agents, recorder=store) as rt:
            async with LagProbe() as probe:
                started = time.perf_counter()
                results = await rt.run([(agent, f"task {i}") for i in range(agents)])
                if store is not None:
                    await store.aflush()
                seconds = time.perf_counter() - started
    finally:
        if store is not None:
            await store.aclose()
    ok = sum(1 for r in results if r.status == "done" and r.spent.tool_calls == turns)
    name = f"runtime + store ({writer} writer)" if store is not None else "runtime alone"
    out = Outcome(name, agents, turns, seconds, ok, lag_ms=probe.samples)
    if store is not None:
        out.events = store.flushed_events
        path = sqlite_path(store.url)
        out.file_bytes = path.stat().st_size if path is not None and path.exists() else None
    return out


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome]
    machine: dict

    @property
    def stores(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.events]


WRITERS = ("thread", "process")


def run_benchmark(agents: int, turns: int, batch_size: int = 500, url: str | None = None,
                  writers: tuple[str, ...] = WRITERS, log: Callable[[str], None] = lambda _: None) -> Report:
    """The workload without a store, then with one per writer (`Store(writer=...)`; a temporary
    SQLite file each unless `url`)."""
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="agentrt-bench-store-") as tmp:
        for writer in writers:  # imports, schema building, the writer process's start
            asyncio.run(run_workload(min(agents, 20), 2, str(Path(tmp) / f"warmup-{writer}.db"), writer=writer))
        runs = [("runtime alone", None, "thread")]
        runs += [(f"runtime + store ({w} writer)", url or str(Path(tmp) / f"bench-{w}.db"), w) for w in writers]
        outcomes = []
        for name, target, writer in runs:
            gc.collect()
            log(f"running {name}: {agents} agents x {turns} tool turns")
            outcomes.append(asyncio.run(run_workload(agents, turns, target, batch_size, writer)))
    return Report(outcomes, machine)


def machine_info() -> dict:
    import sqlalchemy

    return tables.machine_info("SQLAlchemy", sqlalchemy.__version__)


def targets(report: Report) -> list[tuple[str, bool]]:
    out = []
    for s in report.stores:
        writer = s.name.removeprefix("runtime + store ")
        out += [(f"store events/s written {writer}: {s.events_per_s:,.0f}, target >= 20,000", s.events_per_s >= 20_000),
                (f"event-loop lag p99 with the store {writer}: {s.lag(0.99):.1f} ms, target < 10 ms",
                 s.lag(0.99) < 10)]
    return out


def rows(report: Report) -> list[list[str]]:
    out = []
    for o in report.outcomes:
        size = f"{o.file_bytes / 1e6:.1f}" if o.file_bytes is not None else "-"
        per_event = f"{o.file_bytes / o.events:.0f}" if o.file_bytes and o.events else "-"
        out.append([o.name, f"{o.agents:,}", str(o.turns), f"{o.completed:,}", f"{o.seconds:.2f}",
                    f"{o.turns_per_s:,.0f}", f"{o.events:,}" if o.events else "-",
                    f"{o.events_per_s:,.0f}" if o.events else "-", f"{o.lag(0.5):.2f}", f"{o.lag(0.99):.2f}",
                    size, per_event])
    return out


HEADER = ["contestant", "agents", "tool turns each", "completed", "wall s", "agent turns/s", "events written",
          "events/s", "loop lag p50 ms", "loop lag p99 ms", "file MB", "bytes/event"]


def format_text(report: Report) -> str:
    return tables.text_report(HEADER, rows(report), targets(report), report.machine)


def format_markdown(report: Report, command: str) -> str:
    return markdown_table(command, HEADER, rows(report))
