"""The TUI in a real terminal: `agentrt watch DB --display tui` in a tmux pane while `agentrt run`
records a run into DB in another process; `agentrt run --display tui` (the app in a child process);
and `agentrt bench tui` on a small workload."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("textual")

from agentrt.cli import cli  # noqa: E402

TMUX = shutil.which("tmux")
AGENTS, TURNS, TOOL_DELAY = 20, 15, 0.5  # about 7.5 s of run: still going while the test watches

# The tool of both scripts below: each call sleeps TOOL_DELAY seconds.
SLOW_LOOKUP = f'''
import asyncio
from agentrt import Agent, tool

@tool
async def slow_lookup(key: int) -> int:
    """Look a key up, slowly.

    Args:
        key: The key.
    """
    await asyncio.sleep({TOOL_DELAY})
    return key * 2
'''

# AGENTS agents for `agentrt run slow_agents:AGENTS`: each turn one short model call, then the tool.
SLOW_AGENTS = SLOW_LOOKUP + f'''
async def look(ctx):
    for key in range({TURNS}):
        await ctx.chat(f"Key {{key}}?", tools=False, max_tokens=2)
        await ctx.call_tool("slow_lookup", {{"key": key}})
    return "all keys looked up"

AGENTS = [Agent(name="looker", instructions="Look keys up.", tools=[slow_lookup], policy=look)] * {AGENTS}
'''

ENTRY = "from agentrt.cli import main; main()"


HEADER = re.compile(r"agents (\d+)\s+finished (\d+)/(\d+)\s+tokens (\d+)")
ROW = re.compile(r"^ looker\s+(\w+)\s+(\d+)\s+(\d+)", re.M)  # name, state, turn, tokens


class Pane:
    """One tmux session on a private server (its own socket: nothing of the user's is touched)."""

    def __init__(self, name: str):
        self.socket, self.name = f"agentrt-test-{name}", name

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # COLUMNS/LINES (pytest's, say) would override the pane's size in Textual: the server must not inherit them
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run([TMUX, "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                              check=check, timeout=10, env=env)

    def start(self, command: str) -> None:
        # a shell first, so remain-on-exit is set before the command can end (a crash stays readable)
        self.tmux("new-session", "-d", "-s", self.name, "-x", "120", "-y", "36")
        self.tmux("set-option", "-t", self.name, "remain-on-exit", "on")
        self.tmux("respawn-pane", "-k", "-t", self.name, command)

    def capture(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name).stdout

    def showing(self, test):
        """A predicate for `_wait_for`: the screen when `test(screen)` holds, else None."""
        def check() -> str | None:
            screen = self.capture()
            return screen if test(screen) else None
        return check

    def dead(self) -> bool:
        return self.tmux("display-message", "-p", "-t", self.name, "#{pane_dead}").stdout.strip() == "1"

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def kill(self) -> None:
        where = self.tmux("display-message", "-p", "#{socket_path}", check=False).stdout.strip()
        self.tmux("kill-server", check=False)
        if where.endswith(self.socket):  # tmux leaves the socket file behind
            Path(where).unlink(missing_ok=True)


def _wait_for(predicate, timeout: float, what: str, pane: Pane | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    screen = f"\n--- pane ---\n{pane.capture()}" if pane is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{screen}")


def _counters(screen: str) -> tuple[int, int, list[int]]:
    """(finished, tokens, the turn column) of a dashboard screen."""
    m = HEADER.search(screen)
    assert m is not None, f"no dashboard header on screen:\n{screen}"
    assert int(m.group(1)) == AGENTS == int(m.group(3)), screen
    turns = [int(t) for _, t, _ in ROW.findall(screen)]
    return int(m.group(2)), int(m.group(4)), turns


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed: the real-terminal test needs it")
def test_watch_tui_in_tmux_follows_a_run_another_process_writes(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    (tmp_path / "slow_agents.py").write_text(SLOW_AGENTS)
    writer = subprocess.Popen([sys.executable, "-c", ENTRY, "run", "slow_agents:AGENTS", "--display", "none",
                               "--db", str(db)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    pane = Pane(uuid.uuid4().hex[:12])
    try:
        def run_recorded() -> bool:
            if writer.poll() is not None:
                raise AssertionError(f"the writer ended early ({writer.returncode}): {writer.stdout.read()}")
            if not db.exists():
                return False
            from agentrt.store import StoreReader

            try:
                with StoreReader(db) as reader:
                    return bool(reader.runs())
            except Exception:  # the writer is still creating the schema
                return False

        _wait_for(run_recorded, 60, "`agentrt run` to record its run")
        pane.start(shlex.join([sys.executable, "-c", ENTRY, "watch", str(db), "--display", "tui"]))

        # the dashboard, with a row per agent
        first = _wait_for(pane.showing(lambda s: HEADER.search(s) and len(ROW.findall(s)) >= 10), 15,
                          "the dashboard", pane)
        assert "turn" in first and "tools" in first and "Quit" in first, first
        done1, tokens1, turns1 = _counters(first)
        assert done1 < AGENTS, f"the run was over before the test could watch it:\n{first}"
        assert "running" in first, first

        # the counters move while the other process writes
        def moved():
            s = pane.capture()
            done, tokens, turns = _counters(s)
            return s if tokens > tokens1 and (done > done1 or sum(turns) > sum(turns1)) else None

        later = _wait_for(moved, 8, "the dashboard's counters to grow", pane)
        assert max(_counters(later)[2]) > min(turns1), later

        # down one row, Enter: the agent view with its transcript
        pane.keys("Down")
        time.sleep(0.3)
        pane.keys("Enter")
        agent = _wait_for(pane.showing(lambda s: "tool slow_lookup" in s and "Back" in s), 8,
                          "the agent view with its transcript", pane)
        assert "assistant" in agent and "user" in agent and "looker" in agent, agent

        # q quits the app: the pane's command ends
        pane.keys("q")
        _wait_for(pane.dead, 8, "the TUI to quit on q", pane)
    finally:
        pane.kill()
        if writer.poll() is None:
            writer.kill()
        writer.wait(timeout=10)
        if writer.stdout is not None:
            writer.stdout.close()


def test_bench_tui_command_reports_the_three_runs() -> None:
    result = CliRunner().invoke(cli, ["bench", "tui", "--agents", "50", "--turns", "3", "--markdown"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("display"))
    for column in ("agent turns/s", "loop lag p50 ms", "loop lag p99 ms", "refreshes/s", "snapshot p50 ms"):
        assert column in header
    plain = next(line for line in lines if line.startswith("no display"))
    assert plain.split()[2:5] == ["50", "3", "50"], plain  # agents, turns, all completed
    for name in ("tui (same loop)", "tui (child process)"):
        row = next(line for line in lines if line.startswith(name))
        assert row.split()[3:6] == ["50", "3", "50"], row
        assert re.search(rf"{re.escape(name)}: dashboard refreshes [\d.]+/s \(asked 3/s\), target >= 2/s: "
                         r"(PASS|FAIL)", out), out
        assert re.search(rf"{re.escape(name)}: event-loop lag with the TUI - without: p50 [-+][\d.]+ ms, "
                         r"p99 [-+][\d.]+ ms", out), out
        assert f"{name}: agent turns/s with the TUI / without:" in out
    assert "machine:" in out
    assert "```\nagentrt bench tui --agents 50 --turns 3 --refresh-hz 3 --markdown\n```" in out
    assert "| display | agents |" in out and "| tui (same loop) | 50 | 3 | 50 |" in out and "| tui (child process) | 50 | 3 | 50 |" in out


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed: the real-terminal test needs it")
def test_run_tui_in_tmux_renders_in_a_child_process(tmp_path: Path) -> None:
    (tmp_path / "slow_agents.py").write_text(SLOW_AGENTS)
    pane = Pane(uuid.uuid4().hex[:12])
    try:
        run = shlex.join([sys.executable, "-c", ENTRY, "run", "slow_agents:AGENTS", "--display", "tui",
                          "--db", str(tmp_path / "runs.db")])
        pane.start(f"sh -c {shlex.quote(f'cd {shlex.quote(str(tmp_path))} && {run}')}")
        first = _wait_for(pane.showing(lambda s: HEADER.search(s) and len(ROW.findall(s)) >= 10), 60,
                          "the dashboard", pane)
        done1, _, _ = _counters(first)
        assert done1 < AGENTS and "running" in first, first

        def progressed():
            s = pane.capture()
            return s if HEADER.search(s) and _counters(s)[0] > done1 else None

        _wait_for(progressed, 20, "agents to finish while the dashboard watches", pane)
        # q quits the app (the child process); the run goes on in plain lines and ends with its summary
        pane.keys("q")
        end = _wait_for(pane.showing(lambda s: f"agents: {AGENTS} (done {AGENTS})" in s), 30,
                        "the run's summary after quitting the TUI", pane)
        assert "slow_agents:AGENTS" in end, end
    finally:
        pane.kill()
