"""The Textual app over a real recorded store: navigation, agent view, replay stepping, filtering,
and SVG snapshots (AGENTRT_UPDATE_SNAPSHOTS=1 writes the references)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from agentrt import Agent, Budget, Runtime, ScriptedModel, tool
from agentrt.store import Store

pytest.importorskip("textual")

from agentrt.tui import RuntimeSource, StoreSource, make_app  # noqa: E402
from agentrt.tui.screens.agent import AgentScreen  # noqa: E402
from agentrt.tui.screens.dashboard import DashboardScreen  # noqa: E402
from agentrt.tui.screens.help import HelpScreen  # noqa: E402
from agentrt.tui.screens.replay import ReplayScreen  # noqa: E402
from agentrt.tui.widgets.agent_table import AgentTable  # noqa: E402
from agentrt.tui.widgets.transcript import Transcript  # noqa: E402

SNAPSHOTS = Path(__file__).parent / "snapshots"
SIZE = (120, 36)
FROZEN = 1_700_000_000.0


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@tool
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


def script(messages, tools):
    task = next(m["content"] for m in messages if m["role"] == "user")
    last = messages[-1]
    if last["role"] == "tool":
        return f"the result is {last['content']}"
    if "add" in task:
        return {"reasoning": "I should add the numbers with the tool.",
                "tool_calls": [{"id": "call-add", "name": "add", "arguments": {"a": 2, "b": 3}}]}
    if "divide" in task:
        return {"tool_calls": [{"id": "call-div", "name": "divide", "arguments": {"a": 1, "b": 0}}]}
    return "hello there"


def _record(path: Path, monkeypatch) -> None:
    import agentrt.runtime
    from agentrt.runtime import Episode

    counter = itertools.count()
    fake = types.SimpleNamespace(uuid4=lambda: types.SimpleNamespace(hex=f"{next(counter):032x}"))
    monkeypatch.setattr(agentrt.runtime, "uuid", fake)  # stable trajectory ids: stable screenshots

    calc = Agent(name="calc", tools=[add], budget=Budget(think_tokens=64))
    div = Agent(name="divider", tools=[divide])
    echo = Agent(name="echo")

    async def main():
        with Store(path) as store:
            async with Runtime(model=ScriptedModel(script), recorder=store) as rt:
                first = await rt.run([(calc, "please add 2 and 3"), (div, "please divide 1 by 0"),
                                      (echo, "say hello")], run_id="run-a")
            store.flush()
            # a fork of calc from its user message: a sibling branch of the same message tree
            nodes = store.messages(first[0].trajectory_id)
            user = next(n for n in nodes if n.role == "user")
            prefix = nodes[:nodes.index(user) + 1]
            async with Runtime(model=ScriptedModel(lambda m, t: "forked answer"), recorder=store) as rt:
                await rt.run([Episode(calc, "please add 2 and 3", messages=[n.message for n in prefix],
                                      meta={"parent_node": user.id, "fork_of": first[0].trajectory_id})],
                             run_id="run-b")

    asyncio.run(main())


@pytest.fixture
def db(tmp_path, monkeypatch):
    path = tmp_path / "runs.db"
    _record(path, monkeypatch)
    return path


def _app(db, **kw):
    return make_app(StoreSource(db, run_id="run-a"), refresh_hz=kw.pop("refresh_hz", 4.0), clock=lambda: FROZEN)


async def _settle(pilot, app, polls: int = 1) -> None:
    for _ in range(200):
        await pilot.pause()
        if app.polls >= polls and not any(w.is_running for w in app.workers):
            break
        await asyncio.sleep(0.01)
    await pilot.pause()


def _table(app) -> AgentTable:
    return app.screen.query_one(AgentTable)


def _names(app) -> list[str]:
    return [row.name for row in _table(app).shown_rows]


# -- data ---------------------------------------------------------------------------------------------
def test_store_source_snapshot_and_transcript(db):
    src = StoreSource(db, run_id="run-a", clock=lambda: FROZEN)
    snap = src.snapshot()
    assert snap.run_id == "run-a" and (snap.done, snap.total) == (3, 3) and snap.taken_at == FROZEN
    rows = {r.name: r for r in snap.agents}
    assert set(rows) == {"calc", "divider", "echo"}
    assert rows["calc"].tool_calls == 1 and rows["calc"].turn == 2 and rows["calc"].think_budget == 64
    assert rows["calc"].tokens > 0 and rows["calc"].last_action.startswith("answer")
    calc = rows["calc"].trajectory_id
    tr = src.transcript(calc)
    roles = [e["role"] for e in tr]
    assert roles[:2] == ["user", "assistant"] and "tool" in roles and roles[-1] == "end"
    assert tr[1]["reasoning"] and tr[1]["tool_calls"][0]["name"] == "add"
    div = src.transcript(rows["divider"].trajectory_id)
    assert any(e["role"] == "tool" and e["error"] for e in div)
    tree = src.tree(calc)  # the fork hangs under calc's user message
    assert [b["agent"] for bs in tree.values() for b in bs] == ["calc"]
    assert src.search("divide") == {rows["divider"].trajectory_id}
    assert [r.id for r in src.runs()] == ["run-a", "run-b"]
    assert StoreSource(db).snapshot().run_id == "run-b"  # latest run by default


def test_runtime_source_reads_a_live_runtime():
    async def main():
        async with Runtime(model=ScriptedModel(script)) as rt:
            await rt.run([(Agent(name="calc", tools=[add]), "please add 2 and 3")])
            src = RuntimeSource(rt, clock=lambda: FROZEN)
            snap = src.snapshot()
            [row] = snap.agents
            assert (row.name, row.status, row.tool_calls, snap.done, snap.total) == ("calc", "done", 1, 1, 1)
            assert snap.engine is None  # a ScriptedModel has no stats()
            rt.model.stats = lambda: types.SimpleNamespace(tokens_per_s=12.5, batch_size=3, queue_len=1,
                                                           prefix_hit_rate=0.5, kv_used=10, kv_total=100,
                                                           state_used=2, state_total=8)
            engine = src.snapshot().engine
            assert engine.tokens_per_s == 12.5 and engine.queue == 1 and engine.hit_rate == 0.5
            assert [e["role"] for e in src.transcript(row.trajectory_id)] == ["user", "assistant", "tool", "assistant"]

            app = make_app(src, clock=lambda: FROZEN)
            async with app.run_test(size=SIZE) as pilot:
                await _settle(pilot, app)
                assert _names(app) == ["calc"]
    asyncio.run(main())


# -- pilot --------------------------------------------------------------------------------------------
def test_dashboard_navigation_agent_view_and_help(db):
    async def main():
        app = _app(db)
        async with app.run_test(size=SIZE) as pilot:
            await _settle(pilot, app)
            assert isinstance(app.screen, DashboardScreen)
            assert _names(app) == ["calc", "divider", "echo"]
            await pilot.press("down")  # the divider
            await pilot.press("enter")
            await _settle(pilot, app)
            assert isinstance(app.screen, AgentScreen)
            entries = app.screen.query_one(Transcript).entries
            assert [e["role"] for e in entries] == ["user", "assistant", "tool", "assistant", "end"]
            assert entries[2]["error"] and app.screen.query(".entry.-error")
            await pilot.press("escape")
            assert isinstance(app.screen, DashboardScreen)
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            text = str(app.screen.query_one("#help-text").render())
            assert "Filter" in text and "Agent view" in text
            await pilot.press("escape")
            await pilot.press("r")
            assert isinstance(app.screen, ReplayScreen)
            await pilot.press("d")
            assert isinstance(app.screen, DashboardScreen)
            # mouse: clicking the third row focuses it, a second click opens it
            await pilot.click(AgentTable, offset=(3, 3))
            await pilot.pause()
            assert _table(app).cursor_row == 2
            await pilot.click(AgentTable, offset=(3, 3))
            await _settle(pilot, app)
            assert isinstance(app.screen, AgentScreen) and app.screen.entries[-2]["content"] == "hello there"
    asyncio.run(main())


def test_filter_reduces_rows_and_cells_update_in_place(db):
    async def main():
        app = _app(db)
        async with app.run_test(size=SIZE) as pilot:
            await _settle(pilot, app)
            await pilot.press("slash")
            await pilot.press(*"div")
            await pilot.pause()
            assert _names(app) == ["divider"]
            await pilot.press("enter", "escape")
            await pilot.pause()
            assert _names(app) == ["calc", "divider", "echo"]
            # a repeated identical snapshot writes no cell
            assert _table(app).show(app.snapshot.agents) == 0
    asyncio.run(main())


def test_replay_steps_jumps_and_follows_a_branch(db):
    async def main():
        app = _app(db)
        async with app.run_test(size=SIZE) as pilot:
            await _settle(pilot, app)
            await pilot.press("r")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, ReplayScreen) and screen.run_id == "run-a"
            assert [e["role"] for e in screen.entries] == ["user", "assistant", "tool", "assistant", "end"]
            assert screen.step == 0
            await pilot.press("j", "j")
            assert screen.step == 2
            await pilot.press("k")
            assert screen.step == 1
            await pilot.press("p", "t")  # back to 0, then jump to the tool call
            assert screen.step == 1 and screen.entries[1]["tool_calls"][0]["name"] == "add"
            await pilot.press("n", "n", "n", "n")  # stops at the end
            assert screen.step == 4
            # the divider: jump to its error
            await pilot.press("down")
            await pilot.pause()
            assert screen.step == 0 and screen.entries[0]["content"] == "please divide 1 by 0"
            await pilot.press("e")
            assert screen.entries[screen.step]["role"] == "tool" and screen.entries[screen.step]["error"]
            # calc forks at its user message (step 0): follow the branch into run-b
            await pilot.press("up")
            await pilot.pause()
            await pilot.press("b")
            await pilot.pause()
            assert screen.run_id == "run-b" and screen.entries[-2]["content"] == "forked answer"
            assert screen.entries[0]["shared"]
            # search message text
            await pilot.press("slash", *"forked", "enter")
            await pilot.pause()
            assert screen.query_one("#trajectories").row_count == 1
    asyncio.run(main())


# -- snapshots ----------------------------------------------------------------------------------------


def _check_svg(name: str, svg: str) -> None:
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("AGENTRT_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg)
        return
    if not path.exists():
        pytest.fail(f"no reference {path}; write it with AGENTRT_UPDATE_SNAPSHOTS=1 pytest tests/test_tui.py")
    if path.read_text() != svg:
        pytest.fail(f"{name} screenshot differs from {path}; if the change is intended, update it with "
                    f"AGENTRT_UPDATE_SNAPSHOTS=1 pytest tests/test_tui.py -k snapshot")


async def _screens(db) -> dict[str, str]:
    app = _app(db)
    out = {}
    async with app.run_test(size=SIZE) as pilot:
        await _settle(pilot, app)
        out["dashboard"] = app.export_screenshot(title="dashboard")
        await pilot.press("enter")
        await _settle(pilot, app, polls=2)
        out["agent"] = app.export_screenshot(title="agent")
        await pilot.press("escape", "r")
        await pilot.pause()
        await pilot.press("j", "j")
        await pilot.pause()
        out["replay"] = app.export_screenshot(title="replay")
    return out


def test_snapshots_are_deterministic_and_match(db, tmp_path, monkeypatch):
    first = asyncio.run(_screens(db))
    other = tmp_path / "again"
    other.mkdir()
    _record(other / "runs.db", monkeypatch)  # a second recording: other timestamps, same pictures
    second = asyncio.run(_screens(other / "runs.db"))
    assert first == second, "two renders of the same data differ: the SVG is not deterministic"
    for name, svg in first.items():
        _check_svg(f"tui_{name}", svg)


def test_import_does_not_pull_torch_or_the_engine():
    code = "import json, sys; import agentrt.tui; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(__import__("json").loads(out.stdout))
    assert "textual" in loaded
    assert not {"torch", "agentrt.model"} & loaded
