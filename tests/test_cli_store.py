"""`agentrt export` and `agentrt replay` on a recorded store file."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from agentrt import Agent, Runtime, ScriptedModel, tool
from agentrt.cli import cli
from agentrt.store import Store


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@pytest.fixture
def db(tmp_path):
    def script(messages, tools):
        return f"it is {messages[-1]['content']}" if messages[-1]["role"] == "tool" else {
            "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}

    async def main():
        with Store(tmp_path / "runs.db") as store:
            async with Runtime(model=ScriptedModel(script), recorder=store) as rt:
                return await rt.run([(Agent(name="calc", tools=[add]), "2 + 3?"), (Agent(name="calc2", tools=[add]), "x")],
                                    run_id="run-a")

    return tmp_path / "runs.db", asyncio.run(main())


def test_export_writes_one_line_per_branch(db, tmp_path):
    path, results = db
    out = tmp_path / "train.jsonl"
    r = CliRunner().invoke(cli, ["export", str(path), str(out), "--run", "run-a"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "2 branches written" in r.output and len(lines) == 2
    assert {line["trajectory_id"] for line in lines} == {res.trajectory_id for res in results}
    bad = CliRunner().invoke(cli, ["export", str(path), str(out), "--run", "nope"])
    assert bad.exit_code == 2 and "no run 'nope'" in bad.output and "run-a" in bad.output


def test_replay_lists_and_renders(db):
    path, results = db
    listing = CliRunner().invoke(cli, ["replay", str(path)])
    assert listing.exit_code == 0 and "run run-a" in listing.output
    assert all(res.trajectory_id in listing.output for res in results)
    shown = CliRunner().invoke(cli, ["replay", str(path), results[0].trajectory_id[:10]])
    assert shown.exit_code == 0, shown.output
    assert "add" in shown.output and "it is 5.0" in shown.output
    unknown = CliRunner().invoke(cli, ["replay", str(path), "zzz"])
    assert unknown.exit_code == 2 and "matches 0 trajectories" in unknown.output
    missing = CliRunner().invoke(cli, ["replay", str(path.with_name("none.db"))])
    assert missing.exit_code == 2 and "does not exist" in missing.output
