"""The plain display: one summary line every few seconds, for logs, pipes and CI.

It polls a snapshot (a `Runtime` in process, a store file or `StoreReader` from another process)
and never hooks into the token stream, so its cost is one small query per `interval`.

>>> display = PlainDisplay(rt, interval=2.0)                      # doctest: +SKIP
>>> results = await display.run_while(rt.run(items))              # a line every 2 s, then a last one
>>> PlainDisplay("runs/logistics.db").follow()                    # until the newest run finishes # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TextIO, TypeVar

T = TypeVar("T")
ACTIVE = ("waiting", "running")
BAR_WIDTH = 24


@dataclass(slots=True)
class Progress:
    """Where a run stands: agents by status, tokens and tool calls so far (what the display prints)."""

    elapsed: float = 0.0
    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    turns: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reward: float | None = None
    finished: bool = False
    run_id: str | None = None
    status: str | None = None  # the run's status, when read from a store

    @property
    def ended(self) -> int:
        """Agents no longer waiting or running."""
        return self.total - sum(self.by_status.get(s, 0) for s in ACTIVE)

    @property
    def hit_rate(self) -> float | None:
        """Prompt tokens served from the prefix cache, or None before any prompt was counted."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def add_spent(self, spent: Any) -> None:
        """Add a `Spent` (or its `as_dict()`) to the totals."""
        get = spent.get if isinstance(spent, dict) else lambda k, d=0: getattr(spent, k, d)
        self.turns += get("turns", 0) or 0
        self.tool_calls += get("tool_calls", 0) or 0
        self.prompt_tokens += get("prompt_tokens", 0) or 0
        self.cached_tokens += get("cached_tokens", 0) or 0
        self.output_tokens += get("output_tokens", 0) or 0


# -- sources ---------------------------------------------------------------------------------------
def progress_from_runtime(rt: Any, elapsed: float = 0.0) -> Progress:
    """Totals over `rt.snapshot()`: finished agents from their result, running ones from their budget tracker."""
    p = Progress(elapsed=elapsed)
    for state in rt.snapshot():
        p.total += 1
        p.by_status[state.status] = p.by_status.get(state.status, 0) + 1
        spent = state.result.spent if state.result is not None else state.ctx.tracker.spent if state.ctx else None
        if spent is not None:
            p.add_spent(spent)
    p.finished = p.total > 0 and p.ended == p.total
    return p


def progress_from_results(results: list[Any], seconds: float, run_id: str | None = None) -> Progress:
    """Totals over finished `AgentResult`s (rewards included)."""
    p = Progress(elapsed=seconds, total=len(results), finished=True, run_id=run_id, reward=0.0)
    for r in results:
        p.by_status[r.status] = p.by_status.get(r.status, 0) + 1
        p.add_spent(r.spent)
        p.reward += r.reward
    return p


def newest_run(reader: Any) -> str | None:
    """The id of the run that started last in a store, or None for an empty store."""
    runs = reader.runs()
    return runs[-1].id if runs else None


def progress_from_store(reader: Any, run_id: str | None = None) -> Progress:
    """Totals for one run of a store (the newest when `run_id` is None), from a few aggregate queries:
    model and tool calls are counted as they are recorded, so running agents count too."""
    from sqlalchemy import func, select

    from agentrt.store.schema import model_calls, rewards, runs, tool_calls, trajectories

    run_id = run_id or newest_run(reader)
    p = Progress(run_id=run_id)
    if run_id is None:
        return p
    mine = select(trajectories.c.id).where(trajectories.c.run_id == run_id).scalar_subquery()
    with reader.engine.connect() as c:
        run = c.execute(select(runs.c.started, runs.c.finished, runs.c.status).where(runs.c.id == run_id)).first()
        if run is None:
            raise KeyError(f"no run {run_id!r} in {reader}")
        for status, n in c.execute(select(trajectories.c.status, func.count()).where(trajectories.c.run_id == run_id)
                                   .group_by(trajectories.c.status)):
            p.by_status[status] = n
        calls = c.execute(select(func.count(), func.coalesce(func.sum(model_calls.c.prompt_tokens), 0),
                                 func.coalesce(func.sum(model_calls.c.cached_tokens), 0),
                                 func.coalesce(func.sum(model_calls.c.output_tokens), 0))
                          .where(model_calls.c.trajectory_id.in_(mine))).one()
        p.tool_calls = c.execute(select(func.count()).where(tool_calls.c.trajectory_id.in_(mine))).scalar_one()
        p.reward = c.execute(select(func.coalesce(func.sum(rewards.c.value), 0.0))
                             .where(rewards.c.trajectory_id.in_(mine))).scalar_one()
    p.turns, p.prompt_tokens, p.cached_tokens, p.output_tokens = calls
    p.total = sum(p.by_status.values())
    p.status = run.status
    p.finished = run.status != "running"
    p.elapsed = (run.finished if run.finished is not None else time.time()) - run.started
    return p


def progress_source(source: Any, run_id: str | None = None) -> Callable[[], Progress]:
    """A function returning the current `Progress` of `source`: a Runtime, a StoreReader, a store
    path or URL, or already such a function."""
    if hasattr(source, "snapshot") and hasattr(source, "agents"):  # a Runtime
        started = time.monotonic()
        return lambda: progress_from_runtime(source, time.monotonic() - started)
    if isinstance(source, (str, Path)):
        from agentrt.store import StoreReader

        source = StoreReader(source)
    if hasattr(source, "engine") and hasattr(source, "runs"):  # a StoreReader
        return lambda: progress_from_store(source, run_id)
    if callable(source):
        return source
    raise TypeError(f"PlainDisplay needs a Runtime, a StoreReader, a store path or a function returning "
                    f"Progress, got {source!r}")


# -- formatting ------------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _statuses(by_status: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())) or "none yet"


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#########---------------]  37%` for `done` of `total`."""
    frac = done / total if total else 0.0
    filled = int(round(frac * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {frac:4.0%}"


def format_line(p: Progress, tokens_per_s: float | None = None, bar: bool = False) -> str:
    """One status line: time, agents ended/total by status, tokens and tokens/s, tool calls, prefix hits."""
    rate = p.output_tokens / p.elapsed if tokens_per_s is None and p.elapsed > 0 else tokens_per_s or 0.0
    parts = [f"[{_clock(p.elapsed)}] agents {p.ended}/{p.total} ({_statuses(p.by_status)})",
             f"tokens {p.output_tokens:,} ({rate:,.1f}/s)", f"tool calls {p.tool_calls:,}"]
    if p.hit_rate is not None:
        parts.append(f"prefix hits {p.hit_rate:.1%}")
    line = " | ".join(parts)
    return f"{line} {progress_bar(p.ended, p.total)}" if bar and p.total else line


def format_summary(p: Progress, title: str = "run", db: str | Path | None = None) -> str:
    """The final summary of a run, several lines."""
    head = f"{title}: {p.run_id or '-'} {p.status or ('finished' if p.finished else 'running')} after {p.elapsed:.1f} s"
    rate = p.output_tokens / p.elapsed if p.elapsed > 0 else 0.0
    lines = [head,
             f"agents: {p.total} ({_statuses(p.by_status)})",
             f"turns {p.turns:,}, tool calls {p.tool_calls:,}, tokens {p.prompt_tokens:,} prompt / "
             f"{p.output_tokens:,} generated ({rate:,.1f} tokens/s)"
             + (f", prefix-cache hit rate {p.hit_rate:.1%}" if p.hit_rate is not None else "")]
    if p.reward is not None:
        lines.append(f"reward: {p.reward:+.2f} in all")
    if db is not None:
        lines.append(f"trajectories: {db}" if str(db) else "trajectories: not recorded")
    return "\n".join(lines)


# -- the display -----------------------------------------------------------------------------------
class PlainDisplay:
    """Prints a summary line of `source` every `interval` seconds (and a progress bar once the run
    has gone on for `bar_after` seconds). `source`: a `Runtime`, a `StoreReader`, a store path or
    URL (with `run_id`, default the newest run), or a function returning a `Progress`.

    >>> PlainDisplay(rt).line()                                        # doctest: +SKIP
    '[00:03] agents 4/16 (done 4, running 12) | tokens 1,024 (341.3/s) | tool calls 40 | prefix hits 91.2%'
    """

    def __init__(self, source: Any, interval: float = 2.0, stream: TextIO | None = None, *,
                 run_id: str | None = None, bar_after: float = 10.0):
        if interval <= 0:
            raise ValueError(f"interval={interval}: the seconds between lines must be > 0")
        self.poll = progress_source(source, run_id)
        self.interval, self.stream, self.bar_after = interval, stream or sys.stdout, bar_after
        self._last: tuple[float, int] | None = None  # (elapsed, output tokens) at the previous line

    def line(self, p: Progress | None = None) -> str:
        """The line for `p` (default: a fresh poll); tokens/s over the time since the previous line."""
        p = p if p is not None else self.poll()
        rate = None
        if self._last is not None and p.elapsed > self._last[0]:
            rate = (p.output_tokens - self._last[1]) / (p.elapsed - self._last[0])
        self._last = (p.elapsed, p.output_tokens)
        return format_line(p, rate, bar=p.elapsed >= self.bar_after)

    def tick(self) -> Progress:
        """Poll once and print the line; returns what was polled."""
        p = self.poll()
        print(self.line(p), file=self.stream, flush=True)
        return p

    async def run_while(self, work: Awaitable[T]) -> T:
        """Await `work` (e.g. `rt.run(...)`), printing a line every `interval` and a last one at the end."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.interval)
                if done:
                    break
                self.tick()
        finally:
            if not task.done():
                task.cancel()
        self.tick()
        return task.result()

    def follow(self, sleep: Callable[[float], None] = time.sleep) -> Progress:
        """Print a line every `interval` until the run is finished (a store source); returns the last `Progress`."""
        while True:
            p = self.tick()
            if p.finished:
                return p
            sleep(self.interval)
