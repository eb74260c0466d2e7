"""An agent over `RemoteEngine` against `agentrt serve` in another process gets the in-process
engine's greedy tokens, turn by turn; and the server holds up under 200 streaming clients."""

from __future__ import annotations

import asyncio
import enum
from typing import Literal

import pytest

from agentrt import Agent, Budget, MemoryRecorder, Runtime, Sampling, tool
from agentrt.bench.serve import run_load, start_server_process, stop_server_process
from agentrt.remote import RemoteEngine


class Colour(enum.Enum):
    red = "red"
    green = "green"


@tool
def paint(count: Literal[1, 2, 3], colour: Colour) -> str:
    """Paint some boxes.

    Args:
        count: How many boxes.
        colour: Which colour.
    """
    return f"painted {count} {colour.value}"


async def policy(ctx):
    reply = await ctx.chat(require_call=True, parallel_calls=False, max_tokens=200)
    await ctx.call_tools(reply.tool_calls)
    return (await ctx.chat(tools=False, max_tokens=24)).content


AGENT = Agent(name="painter", instructions="Paint boxes with the tool.", tools=[paint], policy=policy,
              budget=Budget(think_tokens=16, tool_calls=2), sampling=Sampling(temperature=0))
TASKS = [(AGENT, f"Paint {i + 1} boxes, please.") for i in range(4)]


def model_calls(model) -> list[list[tuple[list[int], list[int], list[float]]]]:
    """(prompt ids, output ids, logprobs) of every model call of every agent, in task order."""
    rec = MemoryRecorder()

    async def main():
        async with Runtime(model=model, recorder=rec) as rt:
            return await rt.run(TASKS)

    results = asyncio.run(main())
    assert all(r.status in ("done", "budget") for r in results), [r.error for r in results]
    return [[(c["reply"].prompt_ids, c["reply"].token_ids, c["reply"].logprobs)
             for c in rec.of("model_call", r.trajectory_id)] for r in results]


@pytest.fixture(scope="module")
def served():
    proc, url = start_server_process("tiny")
    try:
        yield url
    finally:
        stop_server_process(proc)


def test_remote_engine_gets_the_in_process_greedy_tokens(served):
    local = model_calls("tiny")
    remote = model_calls(RemoteEngine(served, "tiny", token_ids=True))
    assert [len(calls) for calls in remote] == [len(calls) for calls in local] and all(len(c) == 2 for c in local)
    for agent_local, agent_remote in zip(local, remote):
        for (lp, lt, ll), (rp, rt, rl) in zip(agent_local, agent_remote):
            assert rp == lp  # the server rendered the same prompt from the messages it was sent
            assert rt == lt  # and generated the same tokens
            assert rl == pytest.approx(ll, abs=1e-4)


@pytest.mark.slow
def test_200_streaming_clients_for_60_seconds_without_an_error(served):
    report = asyncio.run(run_load(served, clients=200, seconds=60, max_tokens=16))
    assert report.errors == []
    assert report.requests >= 200 and report.output_tokens >= 16 * report.requests * 0.5
    assert report.mean_batch > 1  # the clients were batched together
