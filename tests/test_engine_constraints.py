"""Constrained decoding through the engine: every constrained call parses and validates."""

from __future__ import annotations

import asyncio

import jsonschema
import pytest

from agentrt.model import load
from agentrt.model.engine import Engine, EngineConfig
from agentrt.model.request import Constraint, Request, SamplingParams, ThinkingBudget


def tool(name: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool",
            "parameters": {"type": "object", "properties": properties, "required": required,
                           "additionalProperties": False}}}


TOOLS = [
    tool("get_weather", {"city": {"type": "string", "enum": ["Oslo", "Lima", "Pune"]},
                         "unit": {"type": "string", "enum": ["C", "F"]}}, ["city"]),
    tool("add", {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                 "b": {"type": "integer", "minimum": -5, "maximum": 5}}, ["a", "b"]),
    tool("search", {"query": {"type": "string", "maxLength": 10},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 5}}, ["query"]),
    tool("plan", {"stops": {"type": "array", "maxItems": 3, "items": {"type": "string", "enum": ["A", "B", "C"]}},
                  "urgent": {"type": "boolean"}}, ["stops", "urgent"]),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGENTRT_HOME", str(tmp_path_factory.mktemp("home")))
        return load("tiny")


def run(lm, requests):
    async def main():
        async with Engine(lm, EngineConfig(max_running=64)) as engine:
            return await asyncio.gather(*(engine.submit(r).result() for r in requests))

    return asyncio.run(main())


@pytest.mark.slow
def test_two_hundred_constrained_tool_calls_all_parse_and_validate(lm):
    messages = [{"role": "user", "content": "Use a tool."}]
    requests, opened = [], []
    for i in range(200):
        think = i % 4 == 0  # a quarter open a think block, closed by a small budget
        prompt = lm.chat_format.render(messages, tools=TOOLS, enable_thinking=think)
        temperature = [1.0, 0.7, 0.0][i % 3]
        requests.append(Request(prompt, SamplingParams(temperature=temperature, seed=i, max_tokens=200),
                                constraint=Constraint(tools=TOOLS, require_call=True, parallel_calls=False),
                                thinking=ThinkingBudget(6, 2) if think else None))
        opened.append(think)
    results = run(lm, requests)
    calls = 0
    for r, think in zip(results, opened):
        assert r.finish_reason == "stop", (r.finish_reason, r.error, lm.tokenizer.decode(r.token_ids))
        parsed = lm.chat_format.parse(lm.tokenizer.decode(r.token_ids), thinking_open=think, tools=TOOLS)
        assert parsed.errors == [] and len(parsed.tool_calls) == 1
        for call in parsed.tool_calls:
            jsonschema.validate(call.arguments, SCHEMAS[call.name])
            calls += 1
        if think:
            assert parsed.reasoning is not None and r.counts.thinking <= 8
    assert calls == 200


def test_json_schema_output_and_untouched_neighbours(lm):
    schema = {"type": "object", "properties": {"route": {"type": "array", "maxItems": 4,
              "items": {"type": "integer", "minimum": 1, "maximum": 9}}, "ok": {"type": "boolean"}},
              "required": ["route", "ok"], "additionalProperties": False}
    prompt = lm.chat_format.render([{"role": "user", "content": "route?"}], enable_thinking=False)
    free = Request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    (alone,) = run(lm, [free])
    constrained = [Request(prompt, SamplingParams(temperature=0.8, seed=s, max_tokens=60),
                           constraint=Constraint(json_schema=schema)) for s in range(6)]
    mixed = run(lm, constrained[:3] + [Request(prompt, free.sampling)] + constrained[3:])
    assert mixed[3].token_ids == alone.token_ids  # unconstrained output is untouched
    import json

    for r in mixed[:3] + mixed[4:]:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(lm.tokenizer.decode(r.token_ids, skip_special_tokens=True)), schema)


def test_an_engine_restarts_with_constraints(lm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    prompt = lm.chat_format.render([{"role": "user", "content": "ok?"}], enable_thinking=False)
    engine = Engine(lm)

    async def once():
        async with engine:
            return await engine.submit(Request(prompt, SamplingParams(temperature=0, max_tokens=20),
                                               constraint=Constraint(json_schema=schema))).result()

    first, second = asyncio.run(once()), asyncio.run(once())
    assert first.finish_reason == second.finish_reason == "stop" and first.token_ids == second.token_ids


def test_an_uncompilable_constraint_fails_only_its_request(lm):
    bad = [tool("broken", {"x": {"type": "integer"}}, ["x", "y"])]
    prompt = lm.chat_format.render([{"role": "user", "content": "hi"}])
    ok = Request(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    results = run(lm, [Request(prompt, constraint=Constraint(tools=bad)), ok])
    assert results[0].finish_reason == "error" and "required ['y']" in results[0].error
    assert results[1].finish_reason == "length" and len(results[1].token_ids) == 5
