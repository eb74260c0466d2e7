"""The runtime on a scripted model: tool loop, policies, parallel calls, budgets, cancellation, isolation."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentrt import Agent, Budget, ChatReply, MemoryRecorder, Runtime, ScriptedModel, tool
from agentrt.llm import ToolCallRequest, Usage


@tool
def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


executed: list[str] = []


@tool
async def slow(label: str, seconds: float = 0.3) -> str:
    """Sleep, then echo the label."""
    await asyncio.sleep(seconds)
    executed.append(label)
    return label


def run(items, model, **kwargs):
    return Runtime.run_sync(items, model=model, **kwargs)


def calls(*specs) -> dict:
    return {"tool_calls": [{"name": n, "arguments": a} for n, a in specs]}


def adder_script(messages, tools):
    """Ask for 2 + 3, then answer with the tool's result."""
    last = messages[-1]
    if last["role"] == "tool":
        return f"The sum is {last['content']}"
    return calls(("add", {"a": 2, "b": 3}))


def test_tool_loop_calls_the_tool_and_answers_with_its_result():
    rec = MemoryRecorder()
    agent = Agent(name="calc", instructions="Use the tools.", tools=[add])
    [result] = run([(agent, "What is 2 + 3?")], ScriptedModel(adder_script), recorder=rec)
    assert result.status == "done", result.error
    assert result.output == "The sum is 5.0"
    roles = [m["role"] for m in result.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    call_id = result.messages[2]["tool_calls"][0]["id"]
    assert result.messages[3]["tool_call_id"] == call_id
    assert result.spent.turns == 2 and result.spent.tool_calls == 1
    [record] = rec.of("tool_call", result.trajectory_id)
    assert record["call"]["name"] == "add" and record["result"].ok and record["result"].value == 5.0
    assert [m["role"] for m in rec.of("message", result.trajectory_id)] == roles
    assert [r.kind for r in rec.records if r.trajectory_id == result.trajectory_id][0] == "trajectory_started"
    assert rec.of("trajectory_finished", result.trajectory_id) == [result]


def test_custom_policy_uses_the_context():
    async def policy(ctx):
        r = await ctx.call_tool("add", {"a": 40, "b": 2})
        reply = await ctx.chat(f"The tool said {r.content}. Say it.", tools=False)
        ctx.state["seen"] = r.value
        ctx.reward(0.5)
        ctx.reward(0.25)
        ctx.reward(1.0, name="format")
        return reply.content

    model = ScriptedModel(lambda messages, tools: "answer: " + messages[-1]["content"])
    [result] = run([Agent(name="p", tools=[add], policy=policy)], model)
    assert result.status == "done", result.error
    assert result.output == "answer: The tool said 42.0. Say it."
    assert result.rewards == {"reward": 0.75, "format": 1.0} and result.reward == 1.75
    assert model.calls[0].session == result.trajectory_id  # the engine keys its prefix cache by session


def test_parallel_tool_calls_run_concurrently_and_answer_in_order():
    executed.clear()

    def script(messages, tools):
        if messages[-1]["role"] == "tool":
            return "done"
        return calls(("slow", {"label": "a", "seconds": 0.4}), ("slow", {"label": "b", "seconds": 0.2}),
                     ("slow", {"label": "c", "seconds": 0.3}))

    started = time.monotonic()
    [result] = run([(Agent(name="par", tools=[slow]), "go")], ScriptedModel(script))
    assert time.monotonic() - started < 0.8  # sequentially it would take 0.9 s
    assert result.status == "done", result.error
    assert executed == ["b", "c", "a"]  # finished in order of duration...
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == ['a', 'b', 'c']  # ...answered in call order


def always_add(messages, tools):
    return calls(("add", {"a": 1, "b": 1}))


def test_tool_call_budget_stops_before_the_call_past_the_limit():
    rec = MemoryRecorder()
    agent = Agent(name="b", tools=[add], budget=Budget(tool_calls=2), max_turns=10)
    [result] = run([(agent, "loop")], ScriptedModel(always_add), recorder=rec)
    assert (result.status, result.reason) == ("budget", "budget:tool_calls")
    assert result.spent.tool_calls == 2 and len(rec.of("tool_call")) == 2
    assert result.spent.turns == 3  # the third turn asked for a call that was not executed
    assert rec.of("event", result.trajectory_id)[0]["kind"] == "budget"


def test_parallel_calls_past_the_tool_budget_are_not_executed():
    executed.clear()
    script = lambda m, t: calls(*[("slow", {"label": x, "seconds": 0.01}) for x in "abcde"])  # noqa: E731
    [result] = run([(Agent(name="b", tools=[slow], budget=Budget(tool_calls=3)), "go")], ScriptedModel(script))
    assert result.reason == "budget:tool_calls"
    assert sorted(executed) == ["a", "b", "c"]


def test_turn_budget_allows_exactly_that_many_model_calls():
    model = ScriptedModel(always_add)
    [result] = run([(Agent(name="t", tools=[add], budget=Budget(turns=3)), "loop")], model)
    assert result.reason == "budget:turns"
    assert len(model.calls) == 3 and result.spent.turns == 3 and result.spent.tool_calls == 3


def test_output_and_total_token_budgets_cap_each_request_exactly():
    def script(messages, tools):
        return ChatReply(tool_calls=[ToolCallRequest("c", "add", {"a": 1, "b": 2})],
                         usage=Usage(prompt_tokens=5, output_tokens=10))

    model = ScriptedModel(script)
    [result] = run([(Agent(name="o", tools=[add], budget=Budget(output_tokens=25)), "x")], model)
    assert result.reason == "budget:output_tokens"
    assert [c.max_tokens for c in model.calls] == [25, 15, 5]  # what was left, never more
    assert result.spent.output_tokens == 25

    model = ScriptedModel(script)
    [result] = run([(Agent(name="t", tools=[add], budget=Budget(total_tokens=40)), "x")], model)
    assert result.reason == "budget:total_tokens"
    assert [c.max_tokens for c in model.calls] == [40, 25, 10]
    assert result.spent.total_tokens == 40  # 15 + 15 + (5 prompt + 5 generated, all that was left)


def test_thinking_budget_goes_with_every_request_and_shrinks():
    def script(messages, tools):
        if len([m for m in messages if m["role"] == "assistant"]) >= 3:
            return "done"
        return ChatReply(tool_calls=[ToolCallRequest("c", "add", {"a": 1, "b": 2})],
                         usage=Usage(thinking_tokens=30, output_tokens=40))

    model = ScriptedModel(script)
    [result] = run([(Agent(name="th", tools=[add], budget=Budget(think_tokens=50)), "x")], model)
    assert result.status == "done"
    # what is left goes with each request, the grace window carved out of it: never past the budget
    assert [c.think_tokens + c.think_grace for c in model.calls] == [50, 20, 0, 0]
    assert [c.think_grace for c in model.calls] == [12, 5, 0, 0]  # at 0 the model answers without thinking


def test_seconds_budget_cancels_the_call_in_flight():
    executed.clear()
    script = lambda m, t: calls(("slow", {"label": "late", "seconds": 2.0}))  # noqa: E731
    started = time.monotonic()
    [result] = run([(Agent(name="s", tools=[slow], budget=Budget(seconds=0.3)), "x")], ScriptedModel(script))
    assert result.reason == "budget:seconds"
    assert time.monotonic() - started < 1.5 and executed == []


def test_agent_timeout_and_cancellation_leave_the_others_alone():
    async def main():
        async with Runtime(model=ScriptedModel(adder_script)) as rt:
            sleepy = Agent(name="sleepy", tools=[slow], policy=lambda ctx: ctx.call_tool("slow", {"label": "z", "seconds": 5}))
            timed = Agent(name="timed", tools=[slow], timeout=0.2,
                          policy=lambda ctx: ctx.call_tool("slow", {"label": "y", "seconds": 5}))
            calc = Agent(name="calc", tools=[add])
            job = asyncio.create_task(rt.run([sleepy, timed, (calc, "2+3?")]))
            await asyncio.sleep(0.3)
            [sleeping] = [s for s in rt.snapshot() if s.name == "sleepy"]
            assert sleeping.status == "running"
            assert rt.cancel(sleeping.trajectory_id)
            return await asyncio.wait_for(job, 3)

    results = asyncio.run(main())
    assert [r.status for r in results] == ["cancelled", "timeout", "done"]
    assert results[2].output == "The sum is 5.0"


def test_one_failing_agent_of_a_hundred_is_recorded_and_the_rest_complete():
    async def policy(ctx):
        if ctx.task == 37:
            raise ValueError("agent 37 broke")
        await asyncio.sleep(0.01)
        r = await ctx.call_tool("add", {"a": ctx.task, "b": 1})
        return r.value

    agent = Agent(name="many", tools=[add], policy=policy)
    rec = MemoryRecorder()
    results = run([(agent, i) for i in range(100)], ScriptedModel(adder_script), recorder=rec)
    failed = [r for r in results if r.status == "failed"]
    assert len(failed) == 1 and failed[0].task == 37
    assert "ValueError: agent 37 broke" in failed[0].error and "Traceback" in failed[0].error
    assert [r.output for r in results if r.ok] == [float(i + 1) for i in range(100) if i != 37]
    assert len(rec.of("trajectory_finished")) == 100


def test_bad_tool_calls_become_results_the_model_sees():
    turns = []

    def script(messages, tools):
        turns.append(messages[-1])
        if len(turns) == 1:
            return ChatReply(
                tool_calls=[ToolCallRequest("c1", "multiply", {"a": 1}), ToolCallRequest("c2", "add", {"a": "two", "b": 1}),
                            ToolCallRequest("c3", "add", '{"a": 1, "b":')],
                errors=[ToolCallRequest("c4", "invalid_tool_call", "tool call 4: not JSON")])
        return "gave up"

    [result] = run([(Agent(name="bad", tools=[add]), "x")], ScriptedModel(script))
    assert result.status == "done" and result.output == "gave up"
    tool_msgs = {m["tool_call_id"]: m["content"] for m in result.messages if m["role"] == "tool"}
    assert set(tool_msgs) == {"c1", "c2", "c3", "c4"}
    assert "multiply" in tool_msgs["c1"] and "add" in tool_msgs["c1"]  # unknown tool: names the available ones
    assert "`a`" in tool_msgs["c2"] and "two" in tool_msgs["c2"]  # names the argument and the bad value
    assert "JSON" in tool_msgs["c3"]
    assert tool_msgs["c4"] == "tool call 4: not JSON"
    assert result.tool_failures["add"] == 2 and result.tool_failures["invalid_tool_call"] == 1


def test_agents_name_runtime_tools_and_unknown_names_fail_clearly():
    agent = Agent(name="named", tools=["add"])
    ghost = Agent(name="ghost", tools=["nope"])
    results = run([(agent, "2+3"), (ghost, "x")], ScriptedModel(adder_script), tools=[add])
    assert results[0].output == "The sum is 5.0"
    assert results[1].status == "failed" and "nope" in results[1].reason and "add" in results[1].reason


def test_agent_definition_errors_are_clear():
    with pytest.raises(ValueError, match="neither a Tool"):
        Agent(name="x", tools=[42])
    with pytest.raises(ValueError):
        Agent(name="x", budget=Budget(tool_calls=-1))
    with pytest.raises(TypeError, match="unknown model option 'temprature'"):
        async def policy(ctx):
            await ctx.chat("hi", temprature=0.5)
        [r] = run([Agent(name="typo", policy=policy)], ScriptedModel(lambda m, t: "x"))
        raise TypeError(r.reason)
