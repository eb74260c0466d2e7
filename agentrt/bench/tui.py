"""`agentrt bench tui`: what the dashboard costs a run it watches in the same process.

The workload: `agents` agents in the tool loop for `turns` rounds against a zero-latency scripted
model, with an async tool that sleeps 10-50 ms per call (deterministic per agent and turn), so the
run lasts a few seconds and the dashboard has something to show. It runs twice in one process:
(a) without a display, (b) with the TUI attached on the same event loop:
`make_app(RuntimeSource(rt), refresh_hz)` driven headless with `App.run_test(size=(120, 36))`
while the run proceeds; (c) as `agentrt run --display tui` runs it: the app headless in a child
process, this loop only answering its snapshot calls (`agentrt.tui.remote`). Both runs have a `LagProbe` (how late a 1 ms sleep wakes up). Reported:
wall time, agent turns/s, event-loop lag p50/p99, and for (b) the dashboard's real refresh rate
(`SnapshotReady` messages the app handled per second of the run), what one `snapshot()` costs and
how long applying one snapshot to the screens takes (rendering, which Textual does after, is not in
it; it shows in the lag).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agentrt.bench.agents import LagProbe
from agentrt.bench import tables
from agentrt.bench.tables import markdown_table

SIZE = (120, 36)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(slots=True)
class Outcome:
    name: str  # "no display", "tui (same loop)" or "tui (child process)"
    agents: int
    turns: int
    seconds: float
    completed: int
    lag_ms: list[float] = field(default_factory=list)
    refreshes: int | None = None  # SnapshotReady messages handled during the run (tui only)
    snapshot_ms: list[float] = field(default_factory=list)  # one source.snapshot() call each
    apply_ms: list[float] = field(default_factory=list)  # one SnapshotReady applied to the screens each

    @property
    def turns_per_s(self) -> float:
        return self.agents * self.turns / self.seconds

    @property
    def refresh_per_s(self) -> float | None:
        return None if self.refreshes is None else self.refreshes / self.seconds

    def lag(self, q: float) -> float:
        return _quantile(self.lag_ms, q)


class TimedSource:
    """Wraps a source: times each `snapshot()` call; everything else passes through."""

    def __init__(self, source: Any):
        self._source = source
        self.calls_ms: list[float] = []

    @property
    def blocking(self) -> bool:
        return getattr(self._source, "blocking", False)

    @property
    def clock(self):
        return self._source.clock

    @clock.setter
    def clock(self, value) -> None:
        self._source.clock = value

    def snapshot(self):
        started = time.perf_counter()
        try:
            return self._source.snapshot()
        finally:
            self.calls_ms.append((time.perf_counter() - started) * 1e3)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def _timed_app_class():
    from agentrt.tui.app import AgentrtApp

    class TimedApp(AgentrtApp):
        """`make_app`'s app, timing how long each `SnapshotReady` takes to apply to the screens."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.apply_ms: list[float] = []

        def on_snapshot_ready(self, message: Any) -> None:
            started = time.perf_counter()
            super().on_snapshot_ready(message)
            message.prevent_default()  # textual calls each class's handler in the MRO: not the base's again
            self.apply_ms.append((time.perf_counter() - started) * 1e3)

    return TimedApp


def _workload(agents: int, turns: int):
    from agentrt import Agent, ScriptedModel, tool

    async def lookup(key: int, who: int) -> int:
        """Look a key up (10-50 ms).

        Args:
            key: The key.
            who: The agent asking.
        """
        await asyncio.sleep((10 + (key * 7919 + who * 104729) % 41) / 1e3)
        return key * 2

    def script(messages: list[dict], tools: list[dict] | None) -> dict | str:
        done = sum(1 for m in messages if m["role"] == "tool")
        if done < turns:
            who = int(next(m["content"] for m in messages if m["role"] == "user").split()[-1])
            return {"tool_calls": [{"id": f"call_{done}", "name": "lookup",
                                    "arguments": {"key": done, "who": who}}]}
        return "done"

    agent = Agent(name="bench", instructions="Look keys up.", tools=[tool(lookup)], max_turns=turns + 1)
    return ScriptedModel(script), [(agent, f"task {i}") for i in range(agents)]


def _ok(results: list, turns: int) -> int:
    return sum(1 for r in results if r.status == "done" and r.spent.tool_calls == turns)


async def run_plain(agents: int, turns: int) -> Outcome:
    from agentrt import Runtime

    model, items = _workload(agents, turns)
    async with Runtime(model=model, max_concurrency=agents) as rt:
        async with LagProbe() as probe:
            started = time.perf_counter()
            results = await rt.run(items)
            seconds = time.perf_counter() - started
    return Outcome("no display", agents, turns, seconds, _ok(results, turns), probe.samples)


async def run_tui(agents: int, turns: int, refresh_hz: float) -> Outcome:
    from agentrt import Runtime
    from agentrt.tui.data import RuntimeSource

    model, items = _workload(agents, turns)
    async with Runtime(model=model, max_concurrency=agents) as rt:
        source = TimedSource(RuntimeSource(rt))
        app = _timed_app_class()(source, refresh_hz=refresh_hz)  # what make_app(source, refresh_hz) builds
        async with app.run_test(size=SIZE):
            async with LagProbe() as probe:
                polls, calls, applied = app.polls, len(source.calls_ms), len(app.apply_ms)
                started = time.perf_counter()
                results = await rt.run(items)
                seconds = time.perf_counter() - started
                refreshes = app.polls - polls
                snapshot_ms, apply_ms = source.calls_ms[calls:], app.apply_ms[applied:]
    return Outcome("tui (same loop)", agents, turns, seconds, _ok(results, turns), probe.samples, refreshes, snapshot_ms,
                   apply_ms)


async def run_tui_child(agents: int, turns: int, refresh_hz: float) -> Outcome:
    """The dashboard as `agentrt run --display tui` runs it: rendering in a child process, only
    snapshots taken on this loop (`agentrt.tui.remote`)."""
    from agentrt import Runtime
    from agentrt.tui.data import RuntimeSource
    from agentrt.tui.remote import TuiProcess

    model, items = _workload(agents, turns)
    async with Runtime(model=model, max_concurrency=agents) as rt:
        child = await TuiProcess.start(RuntimeSource(rt), refresh_hz=refresh_hz, headless=True, size=SIZE)
        try:
            await asyncio.wait_for(child.host.first_call.wait(), 60)  # the app is up and polling
            async with LagProbe() as probe:
                started = time.perf_counter()
                results = await rt.run(items)
                ended = time.perf_counter()
        finally:
            await child.close()
        host = child.host
        during = [ms for ms, at in zip(host.snapshot_ms, host.snapshot_at) if started <= at <= ended]
    return Outcome("tui (child process)", agents, turns, ended - started, _ok(results, turns), probe.samples,
                   len(during), during)


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome]
    refresh_hz: float
    machine: dict

    def by(self, name: str) -> Outcome | None:
        return next((o for o in self.outcomes if o.name == name), None)


def run_benchmark(agents: int, turns: int, refresh_hz: float = 3.0,
                  log: Callable[[str], None] = lambda _: None) -> Report:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    asyncio.run(run_plain(min(agents, 20), 2))  # warm-up: imports, schema building
    asyncio.run(run_tui(min(agents, 20), 2, refresh_hz))  # warm-up: textual's imports and CSS
    asyncio.run(run_tui_child(min(agents, 20), 2, refresh_hz))
    outcomes = []
    gc.collect()
    log(f"running without a display: {agents} agents x {turns} tool turns (tool sleeps 10-50 ms)")
    outcomes.append(asyncio.run(run_plain(agents, turns)))
    gc.collect()
    log(f"running with the TUI attached (headless, {SIZE[0]}x{SIZE[1]}, {refresh_hz:g} Hz)")
    outcomes.append(asyncio.run(run_tui(agents, turns, refresh_hz)))
    gc.collect()
    log("running with the TUI in a child process, as `agentrt run --display tui` does")
    outcomes.append(asyncio.run(run_tui_child(agents, turns, refresh_hz)))
    return Report(outcomes, refresh_hz, machine_info(load))


def machine_info(load: float | None) -> dict:
    import textual

    return tables.machine_info("textual", getattr(textual, "__version__", "?"), load)


def targets(report: Report) -> list[tuple[str, bool | None]]:
    """(text, passed); None: reported only."""
    out: list[tuple[str, bool | None]] = []
    plain = report.by("no display")
    for name in ("tui (child process)", "tui (same loop)"):
        tui = report.by(name)
        if tui is None:
            continue
        if tui.refresh_per_s is not None:
            out.append((f"{name}: dashboard refreshes {tui.refresh_per_s:.2f}/s (asked {report.refresh_hz:g}/s), "
                        "target >= 2/s", tui.refresh_per_s >= 2.0))
        if plain is not None:
            out.append((f"{name}: event-loop lag with the TUI - without: p50 {tui.lag(0.5) - plain.lag(0.5):+.2f} ms, "
                        f"p99 {tui.lag(0.99) - plain.lag(0.99):+.2f} ms", None))
            out.append((f"{name}: agent turns/s with the TUI / without: {tui.turns_per_s / plain.turns_per_s:.2f}x",
                        None))
    return out


HEADER = ["display", "agents", "tool turns each", "completed", "wall s", "agent turns/s", "loop lag p50 ms",
          "loop lag p99 ms", "refreshes/s", "snapshot p50 ms", "snapshot p99 ms",
          "apply p50 ms", "apply p99 ms"]


def rows(report: Report) -> list[list[str]]:
    out = []
    for o in report.outcomes:
        tui = o.refresh_per_s is not None
        out.append([o.name, f"{o.agents:,}", str(o.turns), f"{o.completed:,}", f"{o.seconds:.2f}",
                    f"{o.turns_per_s:,.0f}", f"{o.lag(0.5):.2f}", f"{o.lag(0.99):.2f}",
                    f"{o.refresh_per_s:.2f}" if tui else "-",
                    f"{_quantile(o.snapshot_ms, 0.5):.2f}" if o.snapshot_ms else "-",
                    f"{_quantile(o.snapshot_ms, 0.99):.2f}" if o.snapshot_ms else "-",
                    f"{_quantile(o.apply_ms, 0.5):.2f}" if o.apply_ms else "-",
                    f"{_quantile(o.apply_ms, 0.99):.2f}" if o.apply_ms else "-"])
    return out


def format_text(report: Report) -> str:
    return tables.text_report(HEADER, rows(report), targets(report), report.machine)


def format_markdown(report: Report, command: str) -> str:
    return markdown_table(command, HEADER, rows(report))
