"""The runtime on the embedded model: constrained tool calls run for real, budgets reach the engine,
token ids are kept exactly, and the agents benchmark command runs."""

from __future__ import annotations

import asyncio
import enum
import re
from typing import Literal

import pytest
from click.testing import CliRunner

from agentrt import Agent, Budget, MemoryRecorder, Runtime, Sampling, tool


class Colour(enum.Enum):
    red = "red"
    green = "green"


seen: list[tuple[int, Colour]] = []


@tool
def paint(count: Literal[1, 2, 3], colour: Colour) -> str:  # closed sets: the random model's calls stay short
    """Paint some boxes.

    Args:
        count: How many boxes.
        colour: Which colour.
    """
    seen.append((count, colour))
    return f"painted {count} {colour.value}"


@pytest.fixture(scope="module")
def runs():
    """Eight agents on the tiny model, one tool, a thinking budget; recorded in memory."""
    seen.clear()
    rec = MemoryRecorder()
    async def policy(ctx):
        # the random model must call, once, constrained to the schema
        reply = await ctx.chat(require_call=True, parallel_calls=False, max_tokens=200)
        await ctx.call_tools(reply.tool_calls)
        return (await ctx.chat(tools=False, max_tokens=16)).content

    agent = Agent(name="painter", instructions="Paint boxes with the tool.", tools=[paint], policy=policy,
                  budget=Budget(think_tokens=12, tool_calls=4), sampling=Sampling(temperature=0.8))

    async def main():
        async with Runtime(model="tiny", recorder=rec) as rt:
            results = await rt.run([(agent.model_copy(update={"sampling": Sampling(temperature=0.8, seed=i)}),
                                     f"Paint {i + 1} boxes.") for i in range(8)])
            return results, rt.model.stats(), rt.model

    results, stats, model = asyncio.run(main())
    return results, stats, rec, model


def test_agents_on_the_embedded_model_call_tools_with_valid_arguments(runs):
    results, stats, rec, _ = runs
    assert all(r.status in ("done", "budget") for r in results), [r.error for r in results]
    calls = [c for r in results for c in rec.of("tool_call", r.trajectory_id)]
    assert len(calls) >= len(results)  # at least one call each (the tool-call budget may cut a turn short)
    assert all(c["result"].ok for c in calls), [c["result"].content for c in calls if not c["result"].ok]
    assert len(seen) == len(calls) and all(isinstance(colour, Colour) for _, colour in seen)
    assert stats.prefix_hit_rate > 0  # agents share the system prompt and resume their own turns


def test_thinking_budget_and_token_ids_are_what_the_engine_used(runs):
    results, _, rec, model = runs
    schemas = [paint.schema()]
    for r in results:
        assert r.spent.thinking_tokens <= 12  # the grace window is carved out of the budget
        first, *_ = [c["reply"] for c in rec.of("model_call", r.trajectory_id)]
        assert first.prompt_ids == model.format.render(r.messages[:2], schemas)  # system + task, rendered once
        for call in rec.of("model_call", r.trajectory_id):
            reply = call["reply"]
            assert len(reply.token_ids) == len(reply.logprobs) == reply.usage.output_tokens
            again = model.format.parse(model.lm.tokenizer.decode(reply.token_ids),
                                       thinking_open=model.engine.opens_thinking(reply.prompt_ids), tools=schemas)
            assert (again.content, [c.arguments for c in again.tool_calls]) == (
                reply.content, [c.arguments for c in reply.tool_calls])


def test_bench_agents_command_runs_both_contestants():
    out = CliRunner().invoke(__import__("agentrt.cli", fromlist=["cli"]).cli,
                             ["bench", "agents", "--agents", "40", "--turns", "3"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line for line in out.output.splitlines() if re.match(r"(agentrt|pydantic-ai) +\d", line)}
    assert set(rows) == {"agentrt", "pydantic-ai"}
    for line in rows.values():
        assert re.search(r"\b40\s+3\s+40\b", line), line  # 40 agents, 3 turns, 40 completed
    assert "event-loop lag p99" in out.output
