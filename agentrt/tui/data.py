"""What the TUI shows, as plain data, and the two places it comes from.

`RuntimeSource(rt)` reads a live `Runtime` in this process (`rt.snapshot()` and, when the model
has one, `rt.model.stats()`); `StoreSource(path)` polls a trajectory store, possibly while another
process writes it. Both return a `Snapshot` from `snapshot()` and a transcript (a list of plain
dicts) from `transcript(trajectory_id)`. Nothing here imports textual, torch or `agentrt.model`:
the app polls these a few times a second, the runtime never pushes.

>>> source = StoreSource("runs.db")                               # doctest: +SKIP
>>> [row.name for row in source.snapshot().agents]                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

LIFECYCLE = frozenset({"trajectory_started", "trajectory_finished", "run_started", "run_finished", "started",
                       "finished", "interrupted"})
FINISHED = frozenset({"done", "max_turns", "budget", "timeout", "cancelled", "failed", "interrupted", "finished"})


@dataclass(frozen=True, slots=True)
class AgentRow:
    """One agent, one row of the dashboard. `tokens`: prompt + output tokens so far."""

    trajectory_id: str
    name: str
    status: str
    turn: int = 0
    tokens: int = 0
    tokens_per_s: float | None = None
    think_used: int = 0
    think_budget: int | None = None
    tool_calls: int = 0
    reward: float | None = None
    last_action: str = ""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """The engine, when there is one in process; every field may be unknown."""

    tokens_per_s: float | None = None
    batch_size: int | None = None
    queue: int | None = None
    hit_rate: float | None = None
    kv_used: int | None = None
    kv_total: int | None = None
    state_used: int | None = None
    state_total: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    run_id: str | None
    agents: list[AgentRow] = field(default_factory=list)
    engine: EngineInfo | None = None
    done: int = 0
    total: int = 0
    taken_at: float = 0.0


# -- helpers -------------------------------------------------------------------------------------------
def one_line(text: Any, limit: int = 80) -> str:
    s = " ".join(str(text if text is not None else "").split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _args_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False, sort_keys=True,
                                                                     default=str)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)


def entry(step: int, message: dict, *, node_id: int | None = None, trajectory_id: str | None = None,
          error: str | None = None, shared: bool = False) -> dict:
    """One transcript entry: a message made plain for display."""
    calls = []
    for c in message.get("tool_calls") or []:
        fn = c.get("function") or c
        calls.append({"id": c.get("id"), "name": fn.get("name"), "arguments": _args_text(fn.get("arguments"))})
    return {"step": step, "node_id": node_id, "trajectory_id": trajectory_id, "role": message.get("role", "?"),
            "content": _content_text(message.get("content")), "reasoning": message.get("reasoning_content"),
            "tool_calls": calls, "tool_name": message.get("name"), "tool_call_id": message.get("tool_call_id"),
            "error": error if error is not None else message.get("error"), "shared": shared}


def describe(message: dict | None) -> str:
    """A last action, from the last message of a conversation."""
    if not message:
        return "started"
    role = message.get("role")
    if role == "assistant":
        calls = [(c.get("function") or c).get("name") for c in message.get("tool_calls") or []]
        if calls:
            return "call " + ", ".join(str(n) for n in calls)
        return "answer: " + one_line(message.get("content"), 60)
    if role == "tool":
        return f"result {message.get('name', '?')}: " + one_line(message.get("content"), 50)
    return f"{role}: " + one_line(message.get("content"), 60)


def _engine_info(stats: Any) -> EngineInfo | None:
    if stats is None:
        return None
    d = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else (
        dict(stats) if isinstance(stats, dict) else {k: getattr(stats, k) for k in dir(stats) if not k.startswith("_")})
    pick = lambda *names: next((d[n] for n in names if d.get(n) is not None), None)  # noqa: E731
    return EngineInfo(tokens_per_s=pick("tokens_per_s"), batch_size=pick("batch_size"), queue=pick("queue_len", "queue"),
                      hit_rate=pick("prefix_hit_rate", "hit_rate"), kv_used=pick("kv_used"), kv_total=pick("kv_total"),
                      state_used=pick("state_used"), state_total=pick("state_total"))


# -- a live runtime ------------------------------------------------------------------------------------
class RuntimeSource:
    """Reads a `Runtime` in this process. Call it on the runtime's event loop (`blocking` is False:
    the app polls it from an async worker, never from a thread)."""

    blocking = False

    def __init__(self, rt: Any, *, clock: Callable[[], float] = time.time):
        self.rt, self.clock = rt, clock

    def _row(self, a: Any) -> AgentRow:
        ctx, result = a.ctx, a.result
        spent = result.spent if result is not None else (ctx.spent if ctx is not None else None)
        budget = ctx.agent.budget if ctx is not None else None
        rewards = result.rewards if result is not None else (ctx.rewards if ctx is not None else {})
        tokens = (spent.prompt_tokens + spent.output_tokens) if spent is not None else 0
        rate = None
        if spent is not None and a.started is not None and a.status == "running":
            elapsed = time.monotonic() - a.started  # AgentState.started is monotonic
            rate = spent.output_tokens / elapsed if elapsed > 0 else None
        last = ctx.last_action if ctx is not None else a.status
        if result is not None and result.status != "done":
            last = result.reason or result.status
        return AgentRow(a.trajectory_id, a.name, a.status, turn=spent.turns if spent else 0, tokens=tokens,
                        tokens_per_s=rate, think_used=spent.thinking_tokens if spent else 0,
                        think_budget=budget.think_tokens if budget else None,
                        tool_calls=spent.tool_calls if spent else 0,
                        reward=sum(rewards.values()) if rewards else None, last_action=last)

    def snapshot(self) -> Snapshot:
        states = list(self.rt.snapshot())
        rows = [self._row(a) for a in states]
        stats = getattr(self.rt.model, "stats", None)
        engine = None
        if callable(stats):
            try:
                engine = _engine_info(stats())
            except Exception:  # an engine not started yet, or gone: no panel data this tick
                engine = None
        done = sum(r.status not in ("waiting", "running") for r in rows)
        return Snapshot(getattr(self.rt, "run_id", None), rows, engine, done, len(rows), self.clock())

    def transcript(self, trajectory_id: str) -> list[dict]:
        a = self.rt.agents.get(trajectory_id)
        if a is None:
            return []
        messages = a.result.messages if a.result is not None else (a.ctx.messages if a.ctx is not None else [])
        out = [entry(i, m, trajectory_id=trajectory_id) for i, m in enumerate(list(messages))]
        if a.result is not None and a.result.status != "done":
            out.append(_end_entry(len(out), a.result.status, a.result.reason, a.result.error, trajectory_id))
        return out


def _end_entry(step: int, status: str, reason: str | None, error: str | None, trajectory_id: str | None) -> dict:
    text = f"status: {status}" + (f" ({reason})" if reason else "")
    failed = status not in ("done", "running", "finished")
    return {"step": step, "node_id": None, "trajectory_id": trajectory_id, "role": "end", "content": text,
            "reasoning": None, "tool_calls": [], "tool_name": None, "tool_call_id": None,
            "error": (error or reason or status) if failed else None, "shared": False}


# -- a store -------------------------------------------------------------------------------------------
class StoreSource:
    """Polls a trajectory store (a path or a SQLAlchemy URL): the run `run_id`, or the latest run.
    Its calls block on the database, so the app polls it from a thread worker (`blocking`)."""

    blocking = True

    def __init__(self, url_or_path: str | Path, run_id: str | None = None, *, clock: Callable[[], float] = time.time):
        from agentrt.store import StoreReader

        self.reader = StoreReader(url_or_path)
        self.run_id, self.clock = run_id, clock
        self._finished: dict[str, AgentRow] = {}  # rows of finished trajectories never change

    def close(self) -> None:
        self.reader.close()

    # -- the dashboard
    def current_run(self) -> str | None:
        if self.run_id is not None:
            return self.run_id
        runs = self.reader.runs()
        return runs[-1].id if runs else None

    def _row(self, t: Any, now: float) -> AgentRow:
        if t.id in self._finished:
            return self._finished[t.id]
        budget = ((t.meta or {}).get("budget") or {}).get("think_tokens")
        path = self.reader.messages(t.id)
        if t.spent:
            s = t.spent
            turns, tokens, think, tools = (s.get("turns", 0), s.get("prompt_tokens", 0) + s.get("output_tokens", 0),
                                           s.get("thinking_tokens", 0), s.get("tool_calls", 0))
            output = s.get("output_tokens", 0)
        else:
            calls = self.reader.model_calls(t.id)
            turns, think = len(calls), sum(c.thinking_tokens for c in calls)
            tokens = sum(c.prompt_tokens + c.output_tokens for c in calls)
            output = sum(c.output_tokens for c in calls)
            tools = len(self.reader.tool_calls(t.id))
        last_node = path[-1] if path else None
        last = describe(last_node.message if last_node else None)
        events = self.reader.events(trajectory_id=t.id)
        if events and (last_node is None or events[-1].created > last_node.created) and events[-1].kind not in LIFECYCLE:
            last = events[-1].kind
        finished = t.finished is not None or t.status in FINISHED
        if finished and t.status != "done":
            last = t.reason or t.status
        rate = None
        if not finished and now > t.started:
            rate = output / (now - t.started)
        row = AgentRow(t.id, t.agent, t.status, turns, tokens, rate, think, budget, tools, t.reward, last)
        if finished:
            self._finished[t.id] = row
        return row

    def snapshot(self) -> Snapshot:
        now = self.clock()
        run_id = self.current_run()
        if run_id is None:
            return Snapshot(None, [], None, 0, 0, now)
        rows = [self._row(t, now) for t in self.reader.trajectories(run_id)]
        done = sum(r.status in FINISHED for r in rows)
        return Snapshot(run_id, rows, None, done, len(rows), now)

    # -- the replay browser
    def runs(self) -> list[Any]:
        return self.reader.runs()

    def trajectories(self, run_id: str | None = None) -> list[Any]:
        return self.reader.trajectories(run_id)

    def tree(self, trajectory_id: str) -> dict[int, list[dict]]:
        """For each node of the trajectory's conversation, the branches that continue from it other
        than this trajectory's own next step: `{node_id: [{"node_id", "trajectory_id", "agent", "role"}]}`."""
        path = self.reader.messages(trajectory_id)
        names = {t.id: t.agent for t in self.reader.trajectories()}
        out: dict[int, list[dict]] = {}
        for i, node in enumerate(path):
            nxt = path[i + 1].id if i + 1 < len(path) else None
            others = [k for k in self.reader.children(node.id) if k.id != nxt]
            if others:
                out[node.id] = [{"node_id": k.id, "trajectory_id": k.trajectory_id,
                                 "agent": names.get(k.trajectory_id, "?"), "role": k.role} for k in others]
        return out

    def transcript(self, trajectory_id: str) -> list[dict]:
        path = self.reader.messages(trajectory_id)
        results = {c.node_id: c for c in self.reader.tool_calls(trajectory_id) if c.node_id is not None}
        out = []
        for i, node in enumerate(path):
            rec = results.get(node.id)
            error = None if rec is None or rec.ok else f"{rec.error}"
            out.append(entry(i, node.message, node_id=node.id, trajectory_id=node.trajectory_id, error=error,
                             shared=node.trajectory_id != trajectory_id))
        t = self.reader.trajectory(trajectory_id)
        if t.status != "running":
            out.append(_end_entry(len(out), t.status, t.reason, t.error, trajectory_id))
        return out

    def search(self, text: str, run_id: str | None = None) -> set[str]:
        """Trajectories of `run_id` whose agent name, task or messages contain `text` (any case)."""
        needle = text.lower()
        found = set()
        for t in self.reader.trajectories(run_id):
            if needle in t.agent.lower() or needle in (t.task or "").lower():
                found.add(t.id)
                continue
            for e in self.transcript(t.id):
                hay = " ".join([e["content"], e["reasoning"] or "", *(c["name"] or "" for c in e["tool_calls"]),
                                *(c["arguments"] for c in e["tool_calls"])]).lower()
                if needle in hay:
                    found.add(t.id)
                    break
        return found


__all__ = ["AgentRow", "EngineInfo", "RuntimeSource", "Snapshot", "StoreSource", "describe", "entry", "one_line"]
