"""JSONL export: one line per root-to-leaf branch, exact token ids and logprobs from the store, a
loss mask on exactly the generated tokens, rewards; every line valid against the documented schema."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import pytest

from agentrt import Agent, Budget, ChatReply, Runtime, Sampling, ScriptedModel, tool
from agentrt.agent import tool_loop
from agentrt.export import LINE_SCHEMA, export_jsonl
from agentrt.llm import ToolCallRequest
from agentrt.replay import fork
from agentrt.store import Store

DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def encode(message: dict, position: int) -> list[int]:
    """A toy chat format: an assistant message is the header token 7 and the ids it was generated as."""
    if message["role"] == "assistant":
        return [7, *generated(position)]
    return [{"system": 1, "user": 2, "tool": 3}[message["role"]], len(str(message.get("content")))]


def generated(position: int) -> list[int]:
    return [1000 + 10 * position + j for j in range(3)]


def toy_model(b: int) -> ScriptedModel:
    """Calls add(2, b) once, then answers; its prompts always extend the previous prompt + completion."""
    def script(messages, tools):
        ids = dict(prompt_ids=[i for p, m in enumerate(messages) for i in encode(m, p)] + [7],
                   token_ids=generated(len(messages)), logprobs=[-0.5, -0.25, -0.125])
        if messages[-1]["role"] == "tool":
            return ChatReply(content=f"it is {messages[-1]['content']}", **ids)
        return ChatReply(tool_calls=[ToolCallRequest("call_0", "add", {"a": 2, "b": b})], finish_reason="tool_calls",
                         **ids)
    return ScriptedModel(script)


def rewarded(score: float):
    async def policy(ctx):
        out = await tool_loop(ctx)
        ctx.reward(score, name="correct")
        ctx.reward(0.5, name="style")
        ctx.reward(0.25, name="style")
        return out
    return policy


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A toy run (flat token views) forked at its user message, and a tiny-model run forked too."""
    tmp = tmp_path_factory.mktemp("export")
    store = Store(tmp / "runs.db")
    calc = Agent(name="calc", instructions="Add.", tools=[add], policy=rewarded(1.0))

    async def painter_turns(ctx):
        reply = await ctx.chat(require_call=True, parallel_calls=False)
        ctx.reject_calls(reply.errors)
        await ctx.call_tools(reply.tool_calls)
        return (await ctx.chat(tools=False, max_tokens=8)).content

    tiny_agent = Agent(name="tiny", instructions="Add numbers.", tools=[add], policy=painter_turns,
                       budget=Budget(think_tokens=4), sampling=Sampling(temperature=0.7, max_tokens=60, seed=3))

    async def main():
        async with Runtime(model=toy_model(3), recorder=store) as rt:
            [toy] = await rt.run([(calc, "2 + 3?")])
        await store.aflush()
        user = store.messages(toy.trajectory_id)[1]
        async with Runtime(model=toy_model(4), recorder=store) as rt:
            toy_fork = await fork(rt, store, user.id, agent=calc, policy=rewarded(0.0))
        async with Runtime(model="tiny", recorder=store) as rt:
            [real] = await rt.run([(tiny_agent, "2 + 3?")])
            await store.aflush()
            real_fork = await fork(rt, store, store.messages(real.trajectory_id)[1].id, agent=tiny_agent,
                                   sampling={"seed": 4})
        await store.aflush()
        return toy, toy_fork, real, real_fork

    toy, toy_fork, real, real_fork = asyncio.run(main())
    out = tmp / "all.jsonl"
    n = export_jsonl(store, out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    yield store, n, {line["trajectory_id"]: line for line in lines}, (toy, toy_fork, real, real_fork), tmp
    store.close()


def test_one_line_per_leaf_with_the_shared_prefix(exported):
    store, n, lines, (toy, toy_fork, real, real_fork), _ = exported
    leaves = sum(len(store.branches(store.messages(t.trajectory_id)[0].id)) for t in (toy, real))
    assert n == len(lines) == leaves == 4
    for original, forked in ((toy, toy_fork), (real, real_fork)):
        a, b = lines[original.trajectory_id], lines[forked.trajectory_id]
        assert a["messages"][:2] == b["messages"][:2] and a["messages"] != b["messages"]
        assert a["root_node_id"] == b["root_node_id"] and a["leaf_node_id"] != b["leaf_node_id"]
        assert a["messages"] == [node.message for node in store.messages(original.trajectory_id)]
        assert b["messages"] == [node.message for node in store.messages(forked.trajectory_id)]
        assert b["fork_of"] == original.trajectory_id and b["trajectory_ids"] == [original.trajectory_id,
                                                                                  forked.trajectory_id]
        assert (a["fork_of"], a["trajectory_ids"]) == (None, [original.trajectory_id])


def test_completions_are_the_stores_ids_and_logprobs(exported):
    store, _, lines, results, _ = exported
    for r in results:
        line = lines[r.trajectory_id]
        calls = store.model_calls(r.trajectory_id)
        assert len(calls) == 2 and len(line["completions"]) == 2
        for c, rec in zip(line["completions"], calls):
            assert (c["model_call_id"], c["prompt_ids"], c["token_ids"], c["logprobs"], c["finish_reason"]) == (
                rec.id, rec.prompt_ids, rec.token_ids, rec.logprobs, rec.finish_reason)
            assert line["messages"][c["message_index"]] == rec.reply
        assert [t["function"]["name"] for t in line["tools"]] == ["add"]  # the schemas the model was offered


def test_the_flat_view_masks_exactly_the_generated_tokens(exported):
    store, _, lines, (toy, toy_fork, real, real_fork), _ = exported
    for r in (toy, toy_fork):
        line = lines[r.trajectory_id]
        assert line["flat"] is True
        calls = line["completions"]
        ids, mask, lps = line["input_ids"], line["loss_mask"], line["logprobs"]
        assert ids == calls[-1]["prompt_ids"] + calls[-1]["token_ids"]
        assert len(ids) == len(mask) == len(lps)
        generated = {len(c["prompt_ids"]) + j for c in calls for j in range(len(c["token_ids"]))}
        assert {i for i, m in enumerate(mask) if m} == generated
        assert [ids[i] for i in sorted(generated)] == [t for c in calls for t in c["token_ids"]]
        assert [lps[i] for i in sorted(generated)] == [p for c in calls for p in c["logprobs"]]
        assert all(lps[i] is None for i in range(len(ids)) if i not in generated)
    for r in (real, real_fork):  # the embedded chat format re-renders past turns: per-call segments only
        line = lines[r.trajectory_id]
        assert (line["flat"], line["input_ids"], line["loss_mask"], line["logprobs"]) == (False, None, None, None)


def test_rewards_ids_and_status_are_included(exported):
    store, _, lines, (toy, toy_fork, real, real_fork), _ = exported
    assert lines[toy.trajectory_id]["rewards"] == {"correct": 1.0, "style": 0.75}
    assert lines[toy.trajectory_id]["reward"] == 1.75
    assert lines[toy_fork.trajectory_id]["rewards"] == {"correct": 0.0, "style": 0.75}
    assert lines[real.trajectory_id]["reward"] is None and lines[real.trajectory_id]["rewards"] == {}
    for r in (toy, toy_fork, real, real_fork):
        line = lines[r.trajectory_id]
        t = store.trajectory(r.trajectory_id)
        assert (line["run_id"], line["agent"], line["status"], line["reason"]) == (t.run_id, t.agent, t.status,
                                                                                    t.reason)
        assert line["leaf_node_id"] == store.messages(r.trajectory_id)[-1].id


def test_a_run_exports_the_branches_whose_leaf_it_recorded(exported):
    store, _, _, (toy, toy_fork, _, _), tmp = exported
    for r in (toy, toy_fork):
        out = tmp / f"{r.trajectory_id}.jsonl"
        run_id = store.trajectory(r.trajectory_id).run_id
        assert export_jsonl(store, out, run_id=run_id) == 1
        assert json.loads(out.read_text())["trajectory_id"] == r.trajectory_id


def test_lines_match_the_schema_documented_in_docs(exported):
    _, _, lines, _, _ = exported
    block = re.search(r"<!-- line-schema -->\s*```json\n(.*?)```", DOCS.read_text(), re.S)
    assert block, "docs/export.md lost its line schema block"
    assert json.loads(block.group(1)) == LINE_SCHEMA
    jsonschema.Draft202012Validator.check_schema(LINE_SCHEMA)
    for line in lines.values():
        jsonschema.validate(line, LINE_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**next(iter(lines.values())), "loss_mask": [2]}, LINE_SCHEMA)
