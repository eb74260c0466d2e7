"""Schema derivation of `agentrt.tools`: signatures and docstrings -> clean JSON schemas."""

from __future__ import annotations

import asyncio
import doctest
import functools
import warnings
from enum import Enum
from typing import Annotated, Any, Literal

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

import agentrt.tools
import agentrt.tools.registry
import agentrt.tools.schema
from agentrt.tools import Tool, ToolRegistry, tool
from agentrt.tools.schema import parse_docstring, strip_titles


class Opaque:
    """A type without a JSON schema."""


class Unit(str, Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Item(BaseModel):
    """One line of an order."""

    sku: str = Field(description="Stock keeping unit.")
    qty: int = Field(ge=1)


class Address(BaseModel):
    street: str
    city: str


class Order(BaseModel):
    items: list[Item]
    ship_to: Address | None = None


class Node(BaseModel):
    """A tree node."""

    label: str
    children: list[Node] = []


@tool
def get_weather(city: str, unit: Unit = Unit.celsius) -> dict:
    """Current weather for a city.

    Args:
        city: The city name, e.g. "Oslo".
        unit: Temperature unit.

    Returns:
        A dict with the temperature.
    """
    return {"city": city, "unit": unit}


@tool(name="order", description="Place an order.", timeout=5.0, side_effects=True)
def place_order(order: Order, note: str | None = None) -> str:
    """Ignored summary, since description= is given.

    Args:
        order: What to order.
    """
    return "ok"


@tool
def search(query: str, tags: list[str] = [], weights: dict[str, float] | None = None,
           mode: Literal["fast", "exact"] = "fast", limit: Annotated[int, Field(ge=1, le=50, description="Max hits.")] = 10,
           verbose: bool = False) -> list:
    """Search the catalogue
    by keywords.

    More detail that is not the summary.

    Args:
        query (str): Words to look for;
            quoted phrases match exactly.
        limit: Docstring text that loses to the Annotated description.
    """
    return []


@tool
async def fetch(url: str, retries: int = 2) -> str:
    """Fetch a page.

    :param url: Full URL,
        with the scheme.
    :param int retries: How often to retry.
    :returns: the body.
    """
    return url


DERIVED = [get_weather, place_order, search, fetch]


def walk_keys(node: Any, path: str = "") -> list[str]:
    """Every dict key's path, to look for stray schema keywords."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in [f"{path}/{k}", *walk_keys(v, f"{path}/{k}")]]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in walk_keys(v, f"{path}/{i}")]
    return []


# ------------------------------------------------------------------ derived schemas


def test_simple_tool_schema_is_clean_and_complete():
    assert get_weather.name == "get_weather"
    assert get_weather.description == "Current weather for a city."
    assert get_weather.is_async is False and get_weather.timeout is None and get_weather.side_effects is False
    params = get_weather.parameters
    assert params["type"] == "object"
    assert params["required"] == ["city"]
    assert params["additionalProperties"] is False
    assert params["properties"]["city"] == {"type": "string", "description": 'The city name, e.g. "Oslo".'}
    unit = params["properties"]["unit"]
    assert unit["default"] == "celsius" and unit["description"] == "Temperature unit."
    assert params["$defs"]["Unit"] == {"enum": ["celsius", "fahrenheit"], "type": "string"}
    assert unit["$ref"] == "#/$defs/Unit"
    assert not [p for p in walk_keys(params) if p.endswith("/title")]


def test_openai_shape():
    shape = get_weather.schema()
    assert shape["type"] == "function"
    assert shape["function"]["name"] == "get_weather"
    assert shape["function"]["description"] == "Current weather for a city."
    assert shape["function"]["parameters"] == get_weather.parameters
    shape["function"]["parameters"]["properties"].clear()  # a copy: the tool is untouched
    assert "city" in get_weather.parameters["properties"]


def test_nested_models_optional_and_options():
    assert (place_order.name, place_order.description) == ("order", "Place an order.")
    assert place_order.timeout == 5.0 and place_order.side_effects is True
    params = place_order.parameters
    assert params["required"] == ["order"]
    assert params["properties"]["order"] == {"$ref": "#/$defs/Order", "description": "What to order."}
    assert params["properties"]["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    defs = params["$defs"]
    assert set(defs) == {"Order", "Item", "Address"}
    assert defs["Order"]["required"] == ["items"]
    assert defs["Order"]["properties"]["items"] == {"type": "array", "items": {"$ref": "#/$defs/Item"}}
    assert defs["Order"]["properties"]["ship_to"]["anyOf"] == [{"$ref": "#/$defs/Address"}, {"type": "null"}]
    assert defs["Item"]["description"] == "One line of an order."
    assert defs["Item"]["properties"]["sku"] == {"type": "string", "description": "Stock keeping unit."}
    assert defs["Item"]["properties"]["qty"] == {"type": "integer", "minimum": 1}
    assert not [p for p in walk_keys(params) if p.endswith("/title")]


def test_lists_dicts_literal_defaults_and_google_docstring():
    assert search.description == "Search the catalogue by keywords."
    props = search.parameters["properties"]
    assert search.parameters["required"] == ["query"]
    assert props["query"] == {"type": "string", "description": "Words to look for; quoted phrases match exactly."}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert props["weights"]["anyOf"] == [{"type": "object", "additionalProperties": {"type": "number"}},
                                         {"type": "null"}]
    assert props["mode"] == {"type": "string", "enum": ["fast", "exact"], "default": "fast"}
    assert props["limit"] == {"type": "integer", "minimum": 1, "maximum": 50, "default": 10,
                              "description": "Max hits."}  # Annotated beats the docstring
    assert props["verbose"] == {"type": "boolean", "default": False}


def test_async_tool_and_rest_docstring():
    assert fetch.is_async is True
    assert fetch.description == "Fetch a page."
    props = fetch.parameters["properties"]
    assert props["url"] == {"type": "string", "description": "Full URL, with the scheme."}
    assert props["retries"] == {"type": "integer", "default": 2, "description": "How often to retry."}
    assert asyncio.run(fetch(url="https://x.org")) == "https://x.org"  # still callable as a function


def test_tool_is_still_a_plain_function():
    assert isinstance(get_weather, Tool)
    assert get_weather("Oslo") == {"city": "Oslo", "unit": Unit.celsius}
    assert get_weather(city="Bergen", unit=Unit.fahrenheit)["unit"] is Unit.fahrenheit


@pytest.mark.parametrize("t", DERIVED, ids=lambda t: t.name)
def test_every_derived_schema_is_valid_draft_2020_12(t):
    Draft202012Validator.check_schema(t.parameters)
    Draft202012Validator.check_schema(t.schema()["function"]["parameters"])


@pytest.mark.parametrize("t, good, bad", [
    (get_weather, {"city": "Oslo", "unit": "fahrenheit"}, {"city": "Oslo", "unit": "kelvin"}),
    (get_weather, {"city": "Oslo"}, {"unit": "celsius"}),
    (get_weather, {"city": "Oslo"}, {"city": "Oslo", "country": "NO"}),
    (place_order, {"order": {"items": [{"sku": "a1", "qty": 2}], "ship_to": None}},
     {"order": {"items": [{"sku": "a1", "qty": 0}]}}),
    (place_order, {"order": {"items": [], "ship_to": {"street": "Main St 1", "city": "Oslo"}}, "note": "fast"},
     {"order": {"items": [], "ship_to": {"street": "Main St 1"}}}),
    (search, {"query": "tea", "tags": ["green"], "weights": {"price": 0.5}, "mode": "exact", "limit": 50},
     {"query": "tea", "mode": "fuzzy"}),
    (search, {"query": "tea"}, {"query": "tea", "limit": 51}),
    (search, {"query": "tea", "weights": None}, {"query": "tea", "weights": {"price": "low"}}),
    (fetch, {"url": "https://x.org", "retries": 0}, {"url": "https://x.org", "retries": "two"}),
])
def test_instances_validate_against_derived_schema(t, good, bad):
    validator = Draft202012Validator(t.parameters)
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors(bad)) != []


# ------------------------------------------------------------------ docstrings


def test_parse_google_docstring_with_types_continuations_and_other_sections():
    doc = parse_docstring("""Summary line one
    and two.

    Args:
        a (int): First
            number.
        *args: Extra values.
        b: Second.

    Raises:
        c: not a parameter.
    """)
    assert doc.summary == "Summary line one and two."
    assert doc.params == {"a": "First number.", "args": "Extra values.", "b": "Second."}


def test_parse_rest_docstring():
    doc = parse_docstring("""Do it.

    :param str name: The name
        of the thing.
    :type name: str
    :param count: How many.
    :return: nothing
    """)
    assert doc.summary == "Do it."
    assert doc.params == {"name": "The name of the thing.", "count": "How many."}


def test_parse_docstring_without_summary_or_docstring():
    def f(x: int) -> None:
        """Args:
            x: The x.
        """

    assert parse_docstring(f.__doc__).summary == ""
    assert parse_docstring(f.__doc__).params == {"x": "The x."}
    assert parse_docstring(None).summary == "" and parse_docstring(None).params == {}


def test_strip_titles_keeps_properties_named_title():
    schema = {"title": "M", "type": "object", "default": {"title": "kept"},
              "properties": {"title": {"title": "Title", "type": "string"}}}
    assert strip_titles(schema) == {"type": "object", "default": {"title": "kept"},
                                    "properties": {"title": {"type": "string"}}}


# ------------------------------------------------------------------ awkward callables


def test_parameter_names_that_clash_with_pydantic_work_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @tool
        def query(json: str, schema: str = "main", model_name: str = "x", title: str = "t", copy: int = 1) -> str:
            """Query."""
            return json

    assert list(query.parameters["properties"]) == ["json", "schema", "model_name", "title", "copy"]
    assert query.parameters["properties"]["title"] == {"type": "string", "default": "t"}
    kwargs, problems = query.check_arguments({"json": "{}", "schema": "s", "model_name": "m"})
    assert problems == [] and kwargs == {"json": "{}", "schema": "s", "model_name": "m", "title": "t", "copy": 1}


class Shop:
    """A class whose methods are tools."""

    def __init__(self, stock: int):
        self.stock = stock

    @tool
    def buy(self, qty: int) -> int:
        """Buy some.

        Args:
            qty: How many.
        """
        self.stock -= qty
        return self.stock


def test_methods_bound_callables_partials_and_callable_objects():
    assert list(Shop.buy.parameters["properties"]) == ["qty"]  # `self` is not a parameter
    shop = Shop(10)
    bound = shop.buy
    assert isinstance(bound, Tool) and bound.name == "buy" and bound(qty=3) == 7
    assert ToolRegistry([shop.buy])["buy"].fn.__self__ is shop
    with pytest.raises(ValueError, match=r"register it from an instance.*obj\.buy"):
        ToolRegistry([Shop.buy])

    class Counter:
        """Count things."""

        def __call__(self, step: int = 1) -> int:
            return step

    counter = tool(Counter(), name="count")
    assert counter.description == "Count things."
    assert counter.parameters["properties"] == {"step": {"type": "integer", "default": 1}}

    def power(base: float, exp: int) -> float:
        """Raise base to exp."""
        return base**exp

    square = tool(functools.partial(power, exp=2), name="square")
    assert square.description == "Raise base to exp."
    assert square.parameters["required"] == ["base"] and square(base=3.0) == 9.0

    other = tool(get_weather, name="weather")  # re-wrapping renames, keeps the schema
    assert other.name == "weather" and other.parameters is get_weather.parameters


def test_unsupported_signatures_raise_clear_errors():
    def many(*values: int) -> int:
        return 0

    with pytest.raises(ValueError, match=r"tool `many`: parameter `\*values: int` cannot be filled from a JSON"):
        tool(many)

    def locked(lock: Opaque) -> None:
        """Uses an object pydantic cannot describe."""

    with pytest.raises(ValueError, match=r"tool `locked`: parameter `lock` has type .*Opaque.* no JSON schema"):
        tool(locked)

    class Local(BaseModel):
        x: int

    def uses_local(value: Local) -> None:  # a string annotation that cannot be resolved
        """Uses a local class."""

    with pytest.raises(ValueError, match=r"cannot resolve a type annotation.*Local.*module level"):
        tool(uses_local)

    with pytest.raises(ValueError, match=r"tool name '<lambda>' is invalid.*name="):
        tool(lambda x: x)

    with pytest.raises(ValueError, match=r"timeout of tool `get_weather2` must be a positive number.*-1"):
        tool(get_weather.fn, name="get_weather2", timeout=-1)


# ------------------------------------------------------------------ raw schemas

RAW = {"type": "object", "properties": {"sql": {"type": "string", "minLength": 1}}, "required": ["sql"]}


def test_raw_schema_tool_is_used_as_given():
    raw = {**RAW, "properties": dict(RAW["properties"])}

    @tool(schema=raw)
    def run_sql(**kwargs: Any) -> str:
        """Run SQL."""
        return kwargs["sql"]

    raw["properties"]["extra"] = {"type": "integer"}  # later edits to the caller's dict do not leak in
    assert run_sql.parameters == RAW
    assert run_sql.args_model is None and run_sql.description == "Run SQL."
    Draft202012Validator.check_schema(run_sql.parameters)
    assert run_sql.check_arguments({"sql": "select 1"}) == ({"sql": "select 1"}, [])
    assert run_sql.check_arguments({"sql": ""})[1] == ["argument `sql`: expected at least 1 characters, got ''"]


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"x": {"type": "strin"}}},
     r"tool `bad`: invalid parameters schema at properties/x/type: 'strin' is not valid"),
    ({"type": "object", "required": "x"}, r"tool `bad`: invalid parameters schema at required: 'x' is not of type 'array'"),
    ({"type": "array", "items": {}}, r"tool `bad`: the parameters schema must be a dict with \"type\": \"object\", got 'array'"),
    (["not", "a", "dict"], r"tool `bad`: the parameters schema must be a dict .* got 'list'"),
])
def test_invalid_raw_schema_raises_value_error_naming_tool_and_problem(schema, message):
    with pytest.raises(ValueError, match=message):
        tool(lambda **kw: None, name="bad", schema=schema)


def test_raw_schema_properties_must_be_parameters():
    def run(sql: str) -> str:
        return sql

    with pytest.raises(ValueError, match=r"schema properties \['query'\] are not parameters.*takes \['sql'\]"):
        tool(run, schema={"type": "object", "properties": {"query": {"type": "string"}}})
    assert tool(run, schema={"type": "object", "properties": {"sql": {"type": "string"}}}).name == "run"


def test_usage_renders_a_compact_signature():
    assert get_weather.usage() == "get_weather(city: string, unit: 'celsius' | 'fahrenheit' = 'celsius')"
    assert place_order.usage() == ("order(order: {items: list[{sku: string, qty: integer}], "
                                   "ship_to?: {street: string, city: string} | null}, note: string | null = null)")
    assert search.usage().startswith("search(query: string, tags: list[string] = [], "
                                     "weights: dict[string, number] | null = null, mode: 'fast' | 'exact' = 'fast'")


def test_recursive_model_schema_and_usage_terminate():
    @tool
    def draw(tree: Node) -> str:
        """Draw a tree."""
        return tree.label

    node = draw.parameters["$defs"]["Node"]
    assert node["properties"]["children"] == {"type": "array", "items": {"$ref": "#/$defs/Node"}, "default": []}
    Draft202012Validator.check_schema(draw.parameters)
    assert Draft202012Validator(draw.parameters).is_valid({"tree": {"label": "a", "children": [{"label": "b"}]}})
    assert draw.usage() == "draw(tree: {label: string, children?: list[{label: string, children?: list[Node]}]})"


@pytest.mark.parametrize("module", [agentrt.tools, agentrt.tools.registry, agentrt.tools.schema],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


def test_the_quick_check_never_accepts_what_the_validator_rejects():
    """`quick_check` takes the valid calls of plain tool schemas without jsonschema: over random
    schemas and arguments, whatever it accepts the validator accepts, and it does accept most
    valid calls (else it would only cost time)."""
    import random

    from agentrt.tools.schema import quick_check

    rng = random.Random(11)
    kinds = ["string", "integer", "number", "boolean", "null"]
    values = ["x", "", 3, -7, 2.5, 1.0, True, False, None, [1], {"a": 1}, 10**20]
    accepted = valid = 0
    for _ in range(400):
        names = rng.sample(["a", "b", "c", "d"], rng.randint(0, 4))
        schema = {"type": "object", "properties": {n: {"type": rng.choice(kinds), "description": "d"} for n in names},
                  "required": rng.sample(names, rng.randint(0, len(names)))}
        if rng.random() < 0.5:
            schema["additionalProperties"] = rng.random() < 0.5
        check = quick_check(schema)
        assert check is not None
        validator = Draft202012Validator(schema)
        for _ in range(20):
            args = {n: rng.choice(values) for n in rng.sample(["a", "b", "c", "d", "e"], rng.randint(0, 5))}
            ok = validator.is_valid(args)
            valid += ok
            if check(args):
                accepted += 1
                assert ok, (schema, args)
    assert accepted >= 0.9 * valid > 0
    for not_plain in ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}},
                      {"type": "object", "properties": {"a": {"type": ["string", "null"]}}},
                      {"type": "object", "properties": {"a": {"type": "string", "format": "date"}}},
                      {"type": "object", "additionalProperties": {"type": "string"}},
                      {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {}}},
                      {"type": "array"}):
        assert quick_check(not_plain) is None, not_plain
