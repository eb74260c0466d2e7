"""`agentrt run`, `watch`, `serve`, every command's help, and the plain display."""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentrt.cli import cli
from agentrt.display import PlainDisplay, Progress, format_line, progress_bar, progress_from_store
from agentrt.store import StoreReader

COMMANDS = [[], ["run"], ["watch"], ["serve"], ["replay"], ["export"], ["bench"], ["bench", "engine"],
            ["bench", "agents"], ["bench", "store"]]


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def logistics_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("runs") / "logistics.db"
    r = invoke("run", "logistics", "--policy", "baseline", "--display", "none", "--db", str(db), "--agents", "4")
    assert r.exit_code == 0, r.output
    return db, r.output


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "agentrt")
def test_help(command):
    r = invoke(*command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage: agentrt" in r.output


def test_run_world_baseline_records_and_summarises(logistics_db):
    db, out = logistics_db
    assert out.startswith("logistics (baseline): ")
    assert "agents: 4 (done 4)" in out and "reward: " in out and f"trajectories: {db}" in out
    assert "[00:" not in out  # --display none: no progress lines
    with StoreReader(db) as reader:
        [run] = reader.runs()
        assert run.status == "finished"
        trajectories = reader.trajectories(run.id)
        assert len(trajectories) == 4 and {t.status for t in trajectories} == {"done"}
        assert reader.tool_calls(trajectories[0].id)


@pytest.mark.parametrize("world", ["churn", "fleet"])
def test_run_single_agent_worlds(world, tmp_path):
    db = tmp_path / f"{world}.db"
    r = invoke("run", world, "--policy", "baseline", "--display", "plain", "--db", str(db))
    assert r.exit_code == 0, r.output
    assert f"{world} (baseline): " in r.output and "agents: 1 (done 1)" in r.output
    assert "] agents 1/1 (done 1) | tokens 0" in r.output  # the plain display's last line
    with StoreReader(db) as reader:
        assert len(reader.trajectories()) == 1


def test_run_default_db_and_no_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("run", "churn", "--policy", "baseline", "--display", "none").exit_code == 0
    assert (tmp_path / "runs" / "churn.db").exists()
    r = invoke("run", "churn", "--policy", "baseline", "--display", "none", "--db", "")
    assert r.exit_code == 0 and "trajectories: not recorded" in r.output


def test_env_var_overrides_option(tmp_path):
    db = str(tmp_path / "env.db")
    r = invoke("run", "churn", "--policy", "baseline", "--db", db, env={"AGENTRT_RUN_DISPLAY": "none"})
    assert r.exit_code == 0 and "] agents" not in r.output
    r = invoke("run", "churn", "--db", db, "--display", "none", env={"AGENTRT_RUN_POLICY": "baseline"})
    assert r.exit_code == 0 and "churn (baseline)" in r.output
    r = invoke("run", "churn", "--db", db, env={"AGENTRT_RUN_POLICY": "greedy"})
    assert r.exit_code == 2 and "'greedy' is not one of" in r.output


@pytest.mark.parametrize("args, message", [
    (["run", "nowhere"], "'nowhere' is not a target; TARGET is a Python script"),
    (["run", "missing.py"], "no script 'missing.py'"),
    (["run", "no_such_module_xyz:agent"], "cannot import module 'no_such_module_xyz'"),
    (["run", "os:sep"], "'os:sep' is str"),
    (["run", "os:nothing_here"], "module 'os' has no attribute 'nothing_here'"),
    (["run", "logistics", "--display", "fancy"], "'fancy' is not one of 'tui', 'plain', 'none'"),
    (["run", "logistics", "--agents", "0"], "0 is not in the range x>=1"),
    (["run", "logistics", "--model", "/no/such/checkpoint"], "neither 'tiny' nor an existing checkpoint"),
    (["run", "logistics", "--task", "x"], "--task is for module:attribute targets"),
    (["run", "logistics", "extra"], "only a script target takes arguments"),
    (["watch", "missing.db"], "missing.db does not exist"),
    (["watch", "--display", "none"], "'none' is not one of 'tui', 'plain'"),
    (["watch", "--interval", "0"], "0 is not in the range x>=0.05"),
    (["serve", "--port", "70000"], "70000 is not in the range 0<=x<=65535"),
    (["serve", "--model", "/no/such/checkpoint"], "neither 'tiny' nor a checkpoint directory"),
    (["serve", "--max-active", "0"], "0 is not in the range x>=1"),
    (["bench", "serve", "--clients", "0"], "0 is not in the range x>=1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output


def test_watch_without_db_and_no_runs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("watch")
    assert r.exit_code == 2 and "no runs/*.db here to watch" in r.output


def test_watch_finished_db_prints_summary(logistics_db):
    db, _ = logistics_db
    r = invoke("watch", str(db), "--display", "plain", "--interval", "0.05")
    assert r.exit_code == 0, r.output
    first, *rest = r.output.splitlines()
    assert "] agents 4/4 (done 4) | tokens 0" in first and "tool calls" in first
    assert rest[0].startswith("run: ") and " finished after " in rest[0]
    assert "agents: 4 (done 4)" in r.output and "reward: " in r.output


def test_watch_defaults_to_newest_runs_db(logistics_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "w.db").write_bytes(logistics_db[0].read_bytes())
    r = invoke("watch", "--display", "plain")
    assert r.exit_code == 0 and "trajectories: runs/w.db" in r.output


def test_watch_unknown_run(logistics_db):
    r = invoke("watch", str(logistics_db[0]), "--run", "nope")
    assert r.exit_code == 2 and "no run 'nope'" in r.output


def test_serve_passes_its_options_and_environment_to_the_server(monkeypatch):
    import agentrt.server

    seen = {}
    monkeypatch.setattr(agentrt.server, "run_server", lambda model, **kw: seen.update(model=model, **kw))
    monkeypatch.setenv("AGENTRT_SERVE_API_KEY", "from-env")
    r = invoke("serve", "--port", "8123", "--max-active", "3", "--max-body-mb", "0.5", "--host", "0.0.0.0")
    assert r.exit_code == 0, r.output
    config = seen["config"]
    assert (seen["model"], seen["host"], seen["port"]) == ("tiny", "0.0.0.0", 8123)
    assert (config.api_key, config.max_active, config.max_body_bytes, config.model_name) == (
        "from-env", 3, 1 << 19, "tiny")
    monkeypatch.delenv("AGENTRT_SERVE_API_KEY")
    r = invoke("serve", "--host", "0.0.0.0")
    assert "without --api-key" in r.output  # exposed beyond loopback without a key: warned


@pytest.mark.slow
def test_bench_serve_runs_a_server_and_clients():
    r = invoke("bench", "serve", "--clients", "4", "--seconds", "2", "--max-tokens", "4", "--markdown")
    assert r.exit_code == 0, r.output
    assert "| clients | seconds | requests | errors |" in r.output and "agentrt bench serve --clients 4" in r.output


def test_run_script_target(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("import sys\nprint('argv', sys.argv[1:])\nif '--fail' in sys.argv:\n    sys.exit(3)\n")
    r = invoke("run", str(script), "--x", "1", "--seed", "5", "--", "--display")
    assert r.exit_code == 0, r.output
    assert "argv ['--x', '1', '--display', '--seed=5']" in r.output
    assert invoke("run", str(script), "--fail").exit_code == 3


def test_tui_missing_falls_back_to_plain(tmp_path, monkeypatch):
    for name in ("agentrt.tui", "agentrt.tui.data", "agentrt.tui.remote", "agentrt.tui.app"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the TUI were not built
    r = invoke("run", "churn", "--policy", "baseline", "--display", "tui", "--db", str(tmp_path / "t.db"))
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("note: the TUI is not available") and "] agents 1/1" in r.stdout


def test_tui_without_a_terminal_falls_back_to_plain(tmp_path):
    # CliRunner's stdin and stdout are not a terminal: the TUI's process says so and exits, the run goes on
    r = invoke("run", "churn", "--policy", "baseline", "--display", "tui", "--db", str(tmp_path / "t.db"))
    assert r.exit_code == 0, r.output
    assert "agents: 1 (done 1)" in r.stdout and "churn (baseline)" in r.stdout
    left = subprocess.run(["pgrep", "-f", "agentrt.tui.remote"], capture_output=True, text=True).stdout
    assert left == "", f"the TUI's process outlived the run: {left}"


def test_tui_gets_the_sources(tmp_path, monkeypatch, logistics_db):
    pytest.importorskip("agentrt.tui.app")
    made = []

    class FakeApp:
        def __init__(self, source, refresh_hz):
            made.append((type(source).__name__, refresh_hz))

        def run(self):
            return None

    class FakeProcess:  # the app of `run` lives in a child process; quit at once: the run goes on in plain lines
        @classmethod
        async def start(cls, source, refresh_hz):
            made.append((type(source).__name__, refresh_hz))
            return cls()

        async def wait(self):
            return 0

    monkeypatch.setattr("agentrt.tui.app.make_app", FakeApp)
    monkeypatch.setattr("agentrt.tui.remote.TuiProcess", FakeProcess)
    r = invoke("run", "churn", "--policy", "baseline", "--display", "tui", "--db", str(tmp_path / "t.db"))
    assert r.exit_code == 0 and "churn (baseline)" in r.output
    assert invoke("watch", str(logistics_db[0]), "--display", "tui").exit_code == 0
    assert made == [("RuntimeSource", 3.0), ("StoreSource", 3.0)]


AGENTS_MODULE = textwrap.dedent("""
    from agentrt import Agent

    async def say(ctx):
        return (await ctx.chat(tools=False)).content

    one = Agent(name="one", policy=say)
    both = [one, Agent(name="two", policy=say)]
""")


def test_run_module_attribute_rejects_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_agents_cli.py").write_text(AGENTS_MODULE)
    r = invoke("run", "my_agents_cli:both", "--policy", "baseline")
    assert r.exit_code == 2 and "--policy baseline is for worlds" in r.output


@pytest.mark.slow
def test_run_module_attribute_on_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_agents_cli_tiny.py").write_text(AGENTS_MODULE)
    r = invoke("run", "my_agents_cli_tiny:both", "--task", "hi", "--agents", "2", "--display", "none",
               "--db", "a.db")
    assert r.exit_code == 0, r.output
    assert "agents: 4 (done 4)" in r.output and "turns 4," in r.output
    with StoreReader(tmp_path / "a.db") as reader:
        assert sorted(t.agent for t in reader.trajectories()) == ["one", "one", "two", "two"]
        assert {t.task for t in reader.trajectories()} == {"hi"}


# -- the plain display -----------------------------------------------------------------------------
def test_plain_display_line_and_bar():
    p = Progress(elapsed=75, total=4, by_status={"done": 1, "running": 3}, output_tokens=300, tool_calls=7,
                 prompt_tokens=100, cached_tokens=25)
    assert format_line(p) == ("[01:15] agents 1/4 (done 1, running 3) | tokens 300 (4.0/s) | tool calls 7 | "
                              "prefix hits 25.0%")
    assert progress_bar(1, 4, width=8) == "[##------]  25%"
    stream, polls = io.StringIO(), iter([p, Progress(elapsed=80, total=4, by_status={"done": 4},
                                                     output_tokens=400, finished=True)])
    display = PlainDisplay(lambda: next(polls), interval=0.01, stream=stream, bar_after=60)
    last = display.follow(sleep=lambda s: None)
    assert last.finished
    first, second = stream.getvalue().splitlines()
    assert first.endswith("[######------------------]  25%")
    assert "tokens 400 (20.0/s)" in second  # the rate over the last interval, not the whole run


def test_plain_display_polls_a_runtime_not_tokens():
    import asyncio

    from agentrt import Agent, Runtime, ScriptedModel

    async def slow(ctx):
        await asyncio.sleep(0.25)
        return (await ctx.chat(tools=False)).content

    async def main(stream):
        async with Runtime(model=ScriptedModel(lambda m, t: "ok")) as rt:
            return await PlainDisplay(rt, interval=0.1, stream=stream).run_while(
                rt.run([(Agent(name=f"a{i}", policy=slow), "t") for i in range(3)]))

    stream = io.StringIO()
    results = asyncio.run(main(stream))
    lines = stream.getvalue().splitlines()
    assert [r.status for r in results] == ["done"] * 3
    assert 2 <= len(lines) <= 5  # one per interval and a last one
    assert "agents 0/3 (running 3)" in lines[0] and "agents 3/3 (done 3)" in lines[-1]


def test_progress_from_store(logistics_db):
    with StoreReader(logistics_db[0]) as reader:
        p = progress_from_store(reader)
    assert p.finished and p.total == 4 and p.by_status == {"done": 4} and p.tool_calls > 0 and p.reward


def test_help_is_fast():
    exe = Path(sys.executable).with_name("agentrt")
    command = [str(exe)] if exe.exists() else [sys.executable, "-c", "from agentrt.cli import main; main()"]
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([*command, "--help"], check=True, capture_output=True, env={**os.environ})
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.5, times
