"""A process recording into a SQLite store is killed with SIGKILL: the file stays intact, everything
it reported as flushed is there, and reopening marks its run interrupted.

What is counted: every recorder call makes exactly one row in nodes, model_calls, tool_calls, rewards
or events (lifecycle calls make an event), so `StoreReader.recorded()` (those rows, minus the
`interrupted` events the store writes itself) is what `Store.flushed_events` counts.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from agentrt.store import Store, StoreReader

WORKER = r"""
import asyncio, sys
from agentrt import Agent, Runtime, ScriptedModel, tool
from agentrt.store import Store

@tool
async def work(n: int) -> int:
    "Work a little.\n\n    Args:\n        n: A number.\n    "
    await asyncio.sleep(0.01)
    return n + 1

def script(messages, tools):
    done = sum(1 for m in messages if m["role"] == "tool")
    if done < 60:
        return {"tool_calls": [{"name": "work", "arguments": {"n": done}}]}
    return "done"

async def report(store):
    last = -1
    while True:
        if store.flushed_events != last:
            last = store.flushed_events
            print(f"flushed {last}", flush=True)
        await asyncio.sleep(0.005)

async def main():
    store = Store(sys.argv[1], batch_size=64, flush_interval=0.01, writer=sys.argv[2])
    proc = getattr(store._writer, "proc", None)
    if proc is not None:
        print(f"writer-pid {proc.pid}", flush=True)
    agent = Agent(name="worker", instructions="Work.", tools=[work], max_turns=61)
    reporter = asyncio.create_task(report(store))
    async with Runtime(model=ScriptedModel(script), recorder=store) as rt:
        while True:  # until killed; one run records about 25,000 calls in a second or more
            await rt.run([(agent, f"job {i}") for i in range(100)])

asyncio.run(main())
"""

TARGET = 3000  # recorder calls flushed before the kill


def exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_sigkill_loses_nothing_that_was_flushed(tmp_path, writer):
    path = tmp_path / "crash.db"
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(path), writer], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    reported, writer_pid = 0, None
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            if line.startswith("writer-pid "):
                writer_pid = int(line.split()[1])
            if line.startswith("flushed "):
                reported = int(line.split()[1])
            if reported >= TARGET or time.monotonic() > deadline:
                break
        if reported < TARGET:
            proc.kill()
            pytest.fail(f"the worker reported {reported} flushed calls, not {TARGET}; "
                        f"stderr: {proc.stderr.read()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if writer == "process":  # the writer process sees its pipe close and stops at once
        assert writer_pid is not None
        stop_by = time.monotonic() + 10
        while not exited(writer_pid) and time.monotonic() < stop_by:
            time.sleep(0.01)
        assert exited(writer_pid), "the writer process outlived the process it recorded for"

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    with StoreReader(path) as reader:  # as the killed process left it
        assert reader.recorded() >= reported
        running = [r.id for r in reader.runs() if r.status == "running"]
        assert len(running) == 1, reader.runs()
        finished_before = [r.id for r in reader.runs() if r.status == "finished"]

    with Store(path) as store:  # reopening: the run that was going on is interrupted
        assert store.interrupted == running
        assert store.run(running[0]).status == "interrupted"
        assert all(store.run(r).status == "finished" for r in finished_before)
        cut = [t for t in store.trajectories(running[0]) if t.finished is None or t.status == "interrupted"]
        assert cut and all(t.status == "interrupted" and t.finished is not None for t in cut)
        assert [e.kind for e in store.events(run_id=running[0]) if e.trajectory_id is None][-1] == "interrupted"
        assert store.recorded() >= reported
        for t in cut[:5]:  # what was recorded of a cut trajectory still reads as one path
            path_nodes = store.messages(t.id)
            assert [n.seq for n in path_nodes] == list(range(len(path_nodes)))
