"""Dispatch of tool calls by `agentrt.tools.ToolRegistry`: results, errors, timeouts, counters."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import re
import time
from collections import Counter
from enum import Enum
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field, field_validator

from agentrt.tools import Tool, ToolError, ToolRegistry, ToolResult, tool


class Unit(str, Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Item(BaseModel):
    sku: str
    qty: int = Field(ge=1)


class Order(BaseModel):
    items: list[Item]
    rush: bool = False


class City(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def capitalized(cls, value: str) -> str:
        if not value[:1].isupper():
            raise ValueError("city names start with a capital letter")
        return value


@tool
def get_weather(city: str, unit: Unit = Unit.celsius) -> dict:
    """Current weather for a city.

    Args:
        city: The city name.
        unit: Temperature unit.
    """
    return {"city": city, "unit": unit.value, "unit_type": type(unit).__name__}


@tool
def place_order(order: Order) -> dict:
    """Place an order."""
    return {"order_type": type(order).__name__, "item_type": order.items and type(order.items[0]).__name__,
            "total": sum(i.qty for i in order.items)}


@tool
def set_price(sku: str, price: float) -> str:
    """Set a price."""
    return f"{sku}={price}"


@tool
def visit(city: City) -> str:
    """Visit a city."""
    return city.name


@tool
async def shout(text: str) -> str:
    """Shout the text."""
    await asyncio.sleep(0)
    return text.upper() + "!"


@tool
async def nap(seconds: float) -> float:
    """Sleep asynchronously."""
    await asyncio.sleep(seconds)
    return seconds


@tool
def doze(seconds: float) -> float:
    """Sleep in a thread."""
    time.sleep(seconds)
    return seconds


@tool
def fail(how: str) -> None:
    """Fail in the way asked."""
    if how == "tool_error":
        raise ToolError("the warehouse is closed; try again tomorrow")
    if how == "timeout_error":
        raise TimeoutError("upstream socket timed out")
    raise ValueError("bad thing")


@tool
def big(n: int) -> str:
    """Return n characters."""
    return "x" * n


@dataclasses.dataclass
class Reading:
    at: dt.date
    value: float


@tool
def readings() -> list:
    """Structured values that json.dumps alone cannot handle."""
    return [Reading(dt.date(2024, 5, 1), 1.5), {"tags": {"a"}}]


@tool
def report() -> Item:
    """A pydantic model as the result."""
    return Item(sku="a1", qty=2)


ALL = [get_weather, place_order, set_price, visit, shout, nap, doze, fail, big, readings, report]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def registry(**kwargs: Any) -> ToolRegistry:
    return ToolRegistry(ALL, **kwargs)


def call(name: Any, arguments: Any, call_id: str = "c1") -> dict:
    return {"id": call_id, "name": name, "arguments": arguments}


# ------------------------------------------------------------------ successful calls


def test_sync_tool_result_and_message():
    result = run(registry().dispatch(call("get_weather", {"city": "Oslo"})))
    assert isinstance(result, ToolResult)
    assert result.ok and result.error is None and result.traceback is None
    assert result.value == {"city": "Oslo", "unit": "celsius", "unit_type": "Unit"}
    assert json.loads(result.content) == result.value
    assert result.seconds >= 0
    assert result.to_message() == {"role": "tool", "tool_call_id": "c1", "name": "get_weather",
                                   "content": result.content}


def test_async_tool():
    result = run(registry().dispatch(call("shout", {"text": "hi"})))
    assert (result.ok, result.content, result.value) == (True, "HI!", "HI!")


def test_pydantic_coercion_gives_model_instances_and_enum_members():
    weather = run(registry().dispatch(call("get_weather", {"city": "Oslo", "unit": "fahrenheit"})))
    assert weather.value["unit_type"] == "Unit" and weather.value["unit"] == "fahrenheit"
    order = run(registry().dispatch(call("place_order", {"order": {"items": [{"sku": "a", "qty": 2},
                                                                             {"sku": "b", "qty": 3}]}})))
    assert order.value == {"order_type": "Order", "item_type": "Item", "total": 5}


@pytest.mark.parametrize("payload", [
    {"id": "c9", "name": "set_price", "arguments": '{"sku": "a1", "price": 2.5}'},
    {"id": "c9", "type": "function", "function": {"name": "set_price", "arguments": '{"sku": "a1", "price": 2.5}'}},
    {"id": "c9", "type": "function", "function": {"name": "set_price", "arguments": {"sku": "a1", "price": 2.5}}},
    SimpleNamespace(id="c9", name="set_price", arguments={"sku": "a1", "price": 2.5}),
    SimpleNamespace(id="c9", type="function", function=SimpleNamespace(name="set_price", arguments='{"sku": "a1", "price": 2.5}')),
    {"id": "c9", "name": "set_price", "arguments": b'{"sku": "a1", "price": 2.5}'},
], ids=["flat-json", "openai-json", "openai-dict", "object", "openai-object", "bytes"])
def test_call_shapes_and_json_string_arguments(payload):
    result = run(registry().dispatch(payload))
    assert (result.ok, result.call_id, result.name, result.content) == (True, "c9", "set_price", "a1=2.5")


def test_rendering_of_return_values():
    reg = registry()
    assert run(reg.dispatch(call("report", {}))).content == '{"sku":"a1","qty":2}'
    assert json.loads(run(reg.dispatch(call("readings", "{}"))).content) == [
        {"at": "2024-05-01", "value": 1.5}, {"tags": ["a"]}]
    assert run(reg.dispatch(call("shout", {"text": "ø"}))).content == "Ø!"  # not escaped


def test_raw_schema_tool_gets_validated_json_values():
    @tool(schema={"type": "object", "properties": {"rows": {"type": "array", "items": {"type": "integer"}}},
                  "required": ["rows"], "additionalProperties": False})
    def total(**kwargs: Any) -> int:
        """Sum rows."""
        return sum(kwargs["rows"])

    reg = ToolRegistry([total])
    assert run(reg.dispatch(call("total", '{"rows": [1, 2, 3]}'))).value == 6
    bad = run(reg.dispatch(call("total", {"rows": [1, "2"]})))
    assert bad.error == "invalid_arguments"
    assert "argument `rows[1]`: expected integer, got '2'" in bad.content


# ------------------------------------------------------------------ error kinds


def lines(result: ToolResult) -> list[str]:
    return result.content.splitlines()


def test_unknown_tool_suggests_close_match_and_lists_tools():
    result = run(registry().dispatch(call("get_wether", {"city": "Oslo"}, "c7")))
    assert (result.ok, result.error, result.call_id, result.name) == (False, "unknown_tool", "c7", "get_wether")
    assert result.content.startswith("unknown tool `get_wether`. Did you mean `get_weather`?")
    assert "Available tools: get_weather, place_order, set_price," in result.content
    assert lines(result)[-1] == "Usage: get_weather(city: string, unit: 'celsius' | 'fahrenheit' = 'celsius')"
    far = run(registry().dispatch(call("zzz", {})))
    assert "Did you mean" not in far.content and far.content.endswith("report.")
    empty = run(ToolRegistry().dispatch(call("x", {})))
    assert empty.content == "unknown tool `x`. No tools are available."


def test_invalid_json_names_position_and_expectation():
    result = run(registry().dispatch(call("set_price", '{"sku": "a1" "price": 2}', "c3")))
    assert (result.error, result.call_id) == ("invalid_json", "c3")
    first = lines(result)[0]
    assert first.startswith("arguments for tool `set_price` are not valid JSON: Expecting ',' delimiter "
                            "at line 1, column 14 (near ")
    assert "send one JSON object that matches the parameters" in first
    assert lines(result)[-1] == "Usage: set_price(sku: string, price: number)"


@pytest.mark.parametrize("arguments, expected", [
    ('{"sku": "a1", "price": "cheap"}', "- argument `price`: expected number, got 'cheap'"),
    ({"price": 2}, "- missing required argument `sku`"),
    ({"sku": "a1", "price": 2, "prize": 3}, "- unexpected argument `prize` (did you mean `price`?)"),
    ({"sku": None, "price": 2}, "- argument `sku`: expected string, got null"),
    ({"sku": "a1", "price": True}, "- argument `price`: expected number, got true"),
])
def test_invalid_arguments_name_argument_value_and_expectation(arguments, expected):
    result = run(registry().dispatch(call("set_price", arguments, "c4")))
    assert (result.ok, result.error, result.call_id) == (False, "invalid_arguments", "c4")
    assert lines(result)[0] == "invalid arguments for tool `set_price`:"
    assert expected in lines(result)
    assert lines(result)[-1] == "Usage: set_price(sku: string, price: number)"


def test_all_problems_are_reported_with_nested_paths_and_enums():
    reg = registry()
    weather = run(reg.dispatch(call("get_weather", {"unit": "kelvin", "country": "NO"})))
    assert lines(weather)[1:4] == ["- argument `unit`: expected one of 'celsius', 'fahrenheit', got 'kelvin'",
                                   "- missing required argument `city`",
                                   "- unexpected argument `country`"]
    order = run(reg.dispatch(call("place_order", {"order": {"items": [
        {"sku": "a", "qty": 1}, {"sku": "b"}, {"sku": "c", "qty": "two"}, {"sku": 4, "qty": 0}]}})))
    assert set(lines(order)[1:-1]) == {
        "- missing required argument `order.items[1].qty`",
        "- argument `order.items[2].qty`: expected integer, got 'two'",
        "- argument `order.items[3].sku`: expected string, got 4",
        "- argument `order.items[3].qty`: expected a number >= 1, got 0",
    }


def test_pydantic_only_errors_use_the_same_format():
    result = run(registry().dispatch(call("visit", {"city": {"name": "oslo"}})))
    assert result.error == "invalid_arguments"
    assert lines(result)[1] == ("- argument `city.name`: value error, city names start with a capital letter, "
                                "got 'oslo'")
    assert run(registry().dispatch(call("visit", {"city": {"name": "Oslo"}}))).value == "Oslo"


@pytest.mark.parametrize("arguments, expected", [
    ([1, 2], "arguments for tool `set_price` must be a JSON object, got list [1, 2]"),
    ("[1, 2]", "arguments for tool `set_price` must be a JSON object, got list [1, 2]"),
    (3, "arguments for tool `set_price` must be a JSON object, got int 3"),
    (None, "arguments for tool `set_price` must be a JSON object, got null null"),
    ({1: 2}, "arguments for tool `set_price` must have string keys, got 1"),
])
def test_arguments_that_are_not_an_object(arguments, expected):
    result = run(registry().dispatch(call("set_price", arguments)))
    assert (result.error, lines(result)[0]) == ("invalid_arguments", expected)


def test_missing_arguments_and_invalid_calls():
    reg = registry()
    missing = run(reg.dispatch({"id": "c1", "name": "shout"}))
    assert missing.error == "invalid_arguments" and "are missing; send a JSON object" in missing.content
    no_name = run(reg.dispatch({"id": "c2", "arguments": {}}))
    assert (no_name.error, no_name.call_id, no_name.name) == ("invalid_call", "c2", "")
    assert no_name.content.startswith("invalid tool call: expected `name` and `arguments`")
    assert no_name.content.endswith("Available tools: " + ", ".join(reg.names) + ".")
    bad_name = run(reg.dispatch({"id": "c3", "name": 42, "arguments": {}}))
    assert bad_name.content.startswith("invalid tool call: the tool name must be a non-empty string, got 42.")
    for junk in (None, 5, "shout", [1], {"function": "shout"}):
        result = run(reg.dispatch(junk))
        assert result.error == "invalid_call" and re.fullmatch(r"call_\d+", result.call_id)


def test_missing_ids_get_distinct_generated_ids():
    reg = registry()
    results = run(reg.dispatch_many([{"name": "shout", "arguments": {"text": "a"}},
                                     {"id": 7, "name": "shout", "arguments": {"text": "b"}},
                                     {"id": "", "name": "shout", "arguments": {"text": "c"}}]))
    ids = [r.call_id for r in results]
    assert all(re.fullmatch(r"call_\d+", i) for i in ids) and len(set(ids)) == 3


def test_tool_error_is_clean_and_other_exceptions_keep_a_traceback():
    reg = registry()
    clean = run(reg.dispatch(call("fail", {"how": "tool_error"}, "c5")))
    assert (clean.ok, clean.error, clean.call_id, clean.traceback) == (False, "tool_error", "c5", None)
    assert lines(clean) == ["tool `fail` reported an error: the warehouse is closed; try again tomorrow",
                            "Usage: fail(how: string)"]
    crash = run(reg.dispatch(call("fail", {"how": "value_error"}, "c6")))
    assert (crash.error, crash.call_id) == ("exception", "c6")
    assert lines(crash) == ["tool `fail` failed: ValueError: bad thing", "Usage: fail(how: string)"]
    assert "Traceback" in crash.traceback and "raise ValueError" in crash.traceback
    assert "Traceback" not in crash.content


def test_a_tool_raising_timeout_error_itself_is_an_exception_not_a_timeout():
    result = run(registry().dispatch(call("fail", {"how": "timeout_error"})))
    assert result.error == "exception"
    assert lines(result)[0] == "tool `fail` failed: TimeoutError: upstream socket timed out"


# ------------------------------------------------------------------ timeouts and concurrency


@pytest.mark.parametrize("name", ["nap", "doze"])
def test_timeouts_for_async_and_sync_tools(name):
    start = time.perf_counter()
    result = run(registry().dispatch(call(name, {"seconds": 0.6}, "c8"), timeout=0.2))
    assert (result.ok, result.error, result.call_id) == (False, "timeout", "c8")
    assert lines(result)[0].startswith(f"tool `{name}` timed out after 0.2 s and was abandoned; try")
    assert lines(result)[-1] == f"Usage: {name}(seconds: number)"
    assert 0.18 < result.seconds < 0.45
    assert time.perf_counter() - start < 1.5


def test_timeout_precedence_call_then_tool_then_registry():
    reg = ToolRegistry([tool(nap.fn, name="limited", timeout=0.1), nap], default_timeout=0.15)
    assert "after 0.1 s" in run(reg.dispatch(call("limited", {"seconds": 0.5}))).content
    assert "after 0.15 s" in run(reg.dispatch(call("nap", {"seconds": 0.5}))).content
    assert run(reg.dispatch(call("limited", {"seconds": 0.15}), timeout=0.5)).ok
    assert run(ToolRegistry([nap], default_timeout=None).dispatch(call("nap", {"seconds": 0.01}))).ok


def test_dispatch_many_runs_concurrently_and_keeps_order():
    reg = registry()
    calls = [call("nap", {"seconds": 0.3}, "a"), call("shout", {"text": "x"}, "b"),
             call("nap", {"seconds": 0.3}, "c"), call("nope", {}, "d"), call("nap", {"seconds": 0.3}, "e")]
    start = time.perf_counter()
    results = run(reg.dispatch_many(calls))
    assert time.perf_counter() - start < 0.6
    assert [r.call_id for r in results] == ["a", "b", "c", "d", "e"]
    assert [r.error for r in results] == [None, None, None, "unknown_tool", None]


def test_cancelling_the_dispatching_task_propagates():
    reg = registry()

    async def main() -> None:
        task = asyncio.create_task(reg.dispatch(call("nap", {"seconds": 5})))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        many = asyncio.create_task(reg.dispatch_many([call("nap", {"seconds": 5}), call("doze", {"seconds": 0.1})]))
        await asyncio.sleep(0.05)
        many.cancel()
        with pytest.raises(asyncio.CancelledError):
            await many

    start = time.perf_counter()
    run(main())
    assert time.perf_counter() - start < 1.0


def test_a_tool_raising_cancelled_error_on_its_own_is_an_exception():
    @tool
    async def quits() -> None:
        """Raises CancelledError without being cancelled."""
        raise asyncio.CancelledError()

    result = run(ToolRegistry([quits]).dispatch(call("quits", {})))
    assert result.error == "exception" and lines(result)[0] == "tool `quits` failed: CancelledError"


# ------------------------------------------------------------------ counters, truncation, the collection


def test_call_and_failure_counters():
    reg = registry()
    payloads = [call("shout", {"text": "a"}), call("shout", {}), call("shout", "{"), call("fail", {"how": "x"}),
                call("ghost", {}), {"id": "z", "arguments": {}}]
    run(reg.dispatch_many(payloads))
    assert reg.calls == {"shout": 3, "fail": 1, "ghost": 1, "": 1}
    assert reg.failures == {"shout": 2, "fail": 1, "ghost": 1, "": 1}
    assert reg.subset(["shout"]).calls == {}  # a subset counts on its own


def test_results_are_truncated_with_a_marker():
    reg = registry(max_result_chars=100)
    result = run(reg.dispatch(call("big", {"n": 250})))
    assert result.ok and result.value == "x" * 250
    assert result.content == "x" * 100 + "\n[truncated: 150 more characters]"
    assert run(reg.dispatch(call("big", {"n": 100}))).content == "x" * 100
    assert run(registry(max_result_chars=None).dispatch(call("big", {"n": 30_000}))).content == "x" * 30_000


def test_registry_collection_api():
    reg = ToolRegistry([get_weather, shout])
    assert reg.names == ["get_weather", "shout"] and len(reg) == 2
    assert "shout" in reg and "nope" not in reg and 3 not in reg
    assert list(reg) == [get_weather, shout]
    assert reg.get("shout") is shout and reg.get("nope") is None and reg["shout"] is shout
    with pytest.raises(KeyError, match="no tool named 'nope'; available: get_weather, shout"):
        reg["nope"]

    def plain(x: int) -> int:
        """Plain function."""
        return x

    assert isinstance(reg.register(plain), Tool) and reg.names[-1] == "plain"
    with pytest.raises(ValueError, match="a tool named `shout` is already registered.*name="):
        reg.register(shout)

    assert [s["function"]["name"] for s in reg.schemas()] == ["get_weather", "shout", "plain"]
    assert [s["function"]["name"] for s in reg.schemas(["plain", "get_weather"])] == ["get_weather", "plain"]
    assert reg.schemas()[0] == get_weather.schema()
    with pytest.raises(KeyError, match=r"unknown tool name\(s\) 'nope'; available: get_weather, shout, plain"):
        reg.schemas(["nope", "shout"])

    sub = reg.subset(["shout"])
    assert sub.names == ["shout"] and sub["shout"] is shout
    assert run(sub.dispatch(call("get_weather", {"city": "Oslo"}))).error == "unknown_tool"


def test_invalid_registry_options():
    with pytest.raises(ValueError, match="default_timeout must be a positive number of seconds or None, got 0"):
        ToolRegistry(default_timeout=0)
    with pytest.raises(ValueError, match="max_result_chars must be a positive int or None, got -5"):
        ToolRegistry(max_result_chars=-5)


# ------------------------------------------------------------------ malformed payloads, at scale

FUZZ = ToolRegistry([get_weather, place_order, set_price, shout], default_timeout=5.0)
FUZZ_VALIDATORS = {t.name: Draft202012Validator(t.parameters) for t in FUZZ}
FIELDS = ("id", "name", "arguments")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
plausible_values = st.one_of(
    json_values, st.sampled_from(["Oslo", "celsius", "kelvin", "a1", 2, 2.5, -1, "cheap"]),
    st.fixed_dictionaries({"items": st.lists(st.fixed_dictionaries(
        {"sku": st.text(max_size=3) | st.integers(), "qty": st.integers(-1, 3) | st.text(max_size=2)}), max_size=3)}))
argument_dicts = st.dictionaries(
    st.sampled_from(["city", "unit", "order", "sku", "price", "text", "prize"]) | st.text(max_size=5),
    plausible_values, max_size=3)
arguments = st.one_of(
    argument_dicts, argument_dicts.map(json.dumps), argument_dicts.map(lambda d: json.dumps(d)[:-1]),
    json_values, json_values.map(json.dumps), st.text(max_size=20))
names = st.one_of(st.sampled_from([*FUZZ.names, "get_wether", "", "SHOUT"]), st.text(max_size=10), json_values)
ids = st.one_of(st.text(max_size=8), json_values)
numbers = st.integers() | st.floats()
good_arguments = {
    "get_weather": st.fixed_dictionaries({"city": st.text(max_size=8)},
                                         optional={"unit": st.sampled_from(["celsius", "fahrenheit"])}),
    "place_order": st.fixed_dictionaries({"order": st.fixed_dictionaries(
        {"items": st.lists(st.fixed_dictionaries({"sku": st.text(max_size=3), "qty": st.integers(1, 9)}),
                           max_size=3)}, optional={"rush": st.booleans()})}),
    "set_price": st.fixed_dictionaries({"sku": st.text(max_size=4), "price": numbers}),
    "shout": st.fixed_dictionaries({"text": st.text(max_size=8)}),
}
good_calls = st.sampled_from(sorted(good_arguments)).flatmap(
    lambda name: st.tuples(st.just(name), good_arguments[name] | good_arguments[name].map(json.dumps)))


@st.composite
def payloads(draw: st.DrawFn) -> tuple[Any, dict[str, Any], str]:
    """(payload, the fields it carries, its shape); fields may be missing."""
    name, args = draw(good_calls | st.tuples(names, arguments))
    values = {"id": draw(ids), "name": name, "arguments": args}
    kept_keys = draw(st.just(set(FIELDS)) | st.sets(st.sampled_from(FIELDS)))
    kept = {k: v for k, v in values.items() if k in kept_keys}
    inner = {k: v for k, v in kept.items() if k != "id"}
    outer = {"id": kept["id"]} if "id" in kept else {}
    shape = draw(st.sampled_from(["flat", "openai", "object", "openai-object", "junk"]))
    if shape == "flat":
        return kept, kept, shape
    if shape == "openai":
        return {**outer, "type": "function", "function": inner}, kept, shape
    if shape == "object":
        return SimpleNamespace(**kept), kept, shape
    if shape == "openai-object":
        return SimpleNamespace(**outer, type="function", function=SimpleNamespace(**inner)), kept, shape
    junk = draw(json_values | st.text(max_size=10) | st.builds(object))
    return junk, {}, shape


def valid(fields: dict[str, Any]) -> bool:
    """Whether a call with these fields should succeed: judged here, independently of dispatch."""
    name, raw = fields.get("name"), fields.get("arguments")
    if not isinstance(name, str) or name not in FUZZ_VALIDATORS:
        return False
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return False
    return isinstance(raw, dict) and FUZZ_VALIDATORS[name].is_valid(raw)


def test_malformed_payloads_never_escape_dispatch():
    seen: Counter[str] = Counter()
    with asyncio.Runner() as runner:

        @settings(max_examples=2000, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(payloads())
        def check(example: tuple[Any, dict[str, Any], str]) -> None:
            payload, fields, shape = example
            result = runner.run(FUZZ.dispatch(payload))
            assert isinstance(result, ToolResult)
            assert isinstance(result.content, str) and result.content
            assert isinstance(result.call_id, str) and isinstance(result.name, str)
            if shape == "junk":
                if not (isinstance(payload, dict) and ("name" in payload or "function" in payload)):
                    assert not result.ok
            else:
                assert result.ok == valid(fields), result.content
            if not result.ok:
                assert result.error in {"invalid_call", "unknown_tool", "invalid_json", "invalid_arguments"}
            given_id = fields.get("id")
            if isinstance(given_id, str) and given_id:
                assert result.call_id == given_id
            else:
                assert re.fullmatch(r"call_\d+", result.call_id)
            seen[result.error or "ok"] += 1

        check()
    # the generator reaches every outcome, valid calls included
    assert seen["ok"] > 100, seen
    assert min(seen[k] for k in ("invalid_call", "unknown_tool", "invalid_json", "invalid_arguments")) > 10, seen
