"""The compute thread every engine shares: how it ends with the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from agentrt.model.compute import ComputeThread

PROGRAMS = {
    # the plainest program: one request through an engine, then the end of the script
    "closed": """
        async def main():
            async with Engine(lm, EngineConfig(max_running=4)) as engine:
                r = await engine.submit(Request(list(range(5, 40)), greedy(4))).result()
            print(len(r.token_ids))
    """,
    # the script ends while the engine is still generating (started, never stopped)
    "running": """
        async def main():
            engine = Engine(lm, EngineConfig(max_running=4))
            engine.start()
            handle = engine.submit(Request(list(range(5, 40)), greedy(100_000)))
            n = 0
            async for _ in handle:
                n += 1
                if n == 3:
                    break
            print(n)
    """,
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_the_process_exits_cleanly(program, tmp_path):
    """A daemon thread still inside torch when the interpreter finalizes is killed mid-C++ and the
    process aborts ("terminate called without an active exception", exit 134); it happened in
    most runs of the plainest engine script once a closed engine was freed on the compute thread.
    The thread is now stopped at exit, after the step in progress."""
    source = textwrap.dedent("""
        import asyncio
        from agentrt.model import Engine, EngineConfig, Request, SamplingParams, load
        lm = load("tiny")
        def greedy(n):
            return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    """) + textwrap.dedent(PROGRAMS[program]) + "\nasyncio.run(main())\n"
    script = tmp_path / "script.py"
    script.write_text(source)
    for _ in range(3):  # the abort was a race: most runs, not all
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "AGENTRT_HOME": str(tmp_path / "home")})
        assert out.returncode == 0 and "terminate called" not in out.stderr, (out.returncode, out.stderr[-2000:])
        assert out.stdout.split() == (["4"] if program == "closed" else ["3"])


def test_close_finishes_the_running_task_fails_the_queued_and_refuses_new_work():
    import threading
    import time

    thread = ComputeThread()
    assert thread.call(lambda: 41 + 1) == 42
    started, release = threading.Event(), threading.Event()
    running = thread.submit(lambda: started.set() or (release.wait(10) and "finished"))
    queued = thread.submit(lambda: "never")
    assert started.wait(10)
    closer = threading.Thread(target=thread.close)
    closer.start()
    while not thread._closed:  # close() has begun: the queued task must not start now
        time.sleep(0.001)
    release.set()
    closer.join(10)
    assert running.result(5) == "finished"
    with pytest.raises(RuntimeError, match="shut down before running this task"):
        queued.result(5)
    with pytest.raises(RuntimeError, match="compute thread has shut down"):
        thread.submit(lambda: None)
    assert not thread._thread.is_alive()
