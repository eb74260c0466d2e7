"""Tools, and the registry that runs the model's tool calls.

A `Tool` is a typed Python function plus the JSON schema of its parameters (derived by
`tool`, or given raw). `ToolRegistry.dispatch` takes one call as the model made it and
always returns a `ToolResult` whose `content` the model can act on; it never raises,
except `asyncio.CancelledError` when the dispatching task itself is cancelled.

>>> import asyncio
>>> @tool
... def add(a: int, b: int) -> int:
...     "Add two integers."
...     return a + b
>>> registry = ToolRegistry([add])
>>> asyncio.run(registry.dispatch({"id": "c1", "name": "add", "arguments": '{"a": 2, "b": 3}'})).content
'5'
>>> print(asyncio.run(registry.dispatch({"id": "c2", "name": "add", "arguments": {"a": "two"}})).content)
invalid arguments for tool `add`:
- argument `a`: expected integer, got 'two'
- missing required argument `b`
Usage: add(a: integer, b: integer)
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import inspect
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from traceback import format_exc
from typing import Any, overload

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from agentrt.tools.schema import (check_parameters, derive_parameters, is_unbound_method,
                                  parse_docstring, pydantic_problems, quick_check, schema_problems, show, usage)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MISSING: Any = object()


class ToolError(Exception):
    """Raise it in a tool to send a clean message to the model (no traceback in the result).

    >>> @tool
    ... def divide(a: float, b: float) -> float:
    ...     "Divide a by b."
    ...     if b == 0:
    ...         raise ToolError("b must not be 0; pick a non-zero divisor")
    ...     return a / b
    >>> print(asyncio.run(ToolRegistry([divide]).dispatch({"id": "c1", "name": "divide",
    ...                                                    "arguments": {"a": 1, "b": 0}})).content)
    tool `divide` reported an error: b must not be 0; pick a non-zero divisor
    Usage: divide(a: number, b: number)
    """


def _check_positive(value: Any, what: str) -> None:
    """Raise ValueError unless `value` is None or a positive number."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"{what} must be a positive number of seconds or None, got {value!r}")


@dataclass(eq=False)
class Tool:
    """A function the model can call, with the JSON schema of its parameters.

    Build one with `tool`. `args_model` is the pydantic model that coerces validated
    arguments (None for raw-schema tools, whose function gets the JSON values as they are).
    A Tool stays callable as the plain function.

    >>> @tool(timeout=5.0)
    ... def greet(name: str) -> str:
    ...     "Say hello."
    ...     return f"hello {name}"
    >>> greet("Ada"), greet.timeout
    ('hello Ada', 5.0)
    >>> greet.schema()["function"]["parameters"]["required"]
    ['name']
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    is_async: bool = False
    timeout: float | None = None
    side_effects: bool = False
    args_model: type[BaseModel] | None = field(default=None, repr=False)
    validator: Draft202012Validator = field(init=False, repr=False)
    _quick: Callable[[Any], bool] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r} is invalid: use 1-64 letters, digits, '_' or '-' "
                             "(pass name=... to tool())")
        check_parameters(self.name, self.parameters)
        _check_positive(self.timeout, f"timeout of tool `{self.name}`")
        self.validator = Draft202012Validator(self.parameters,
                                              format_checker=Draft202012Validator.FORMAT_CHECKER)
        self._quick = quick_check(self.parameters)

    def schema(self) -> dict[str, Any]:
        """The OpenAI tool shape: `{"type": "function", "function": {name, description, parameters}}`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": copy.deepcopy(self.parameters)}}

    def usage(self) -> str:
        """A compact signature, e.g. `get_weather(city: string, unit: 'celsius' | 'fahrenheit' = 'celsius')`."""
        return usage(self.name, self.parameters)

    def check_arguments(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Keyword arguments for `fn` and the problems found (one readable line each; empty if valid).

        Arguments are validated against `parameters`, then coerced by `args_model` (nested
        models become instances, enum values Enum members).
        """
        valid = self._quick is not None and self._quick(arguments)
        problems = [] if valid else schema_problems(self.validator, arguments)
        if problems or self.args_model is None:
            return dict(arguments), problems
        try:
            values = self.args_model.model_validate(arguments)
        except ValidationError as exc:
            return {}, pydantic_problems(exc)
        return {info.alias: getattr(values, key) for key, info in self.args_model.model_fields.items()}, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __get__(self, instance: Any, owner: type | None = None) -> Tool:
        """`@tool` on a method: reading it from an instance gives a Tool bound to that instance."""
        if instance is None or not is_unbound_method(self.fn):
            return self
        bound = copy.copy(self)
        bound.fn = self.fn.__get__(instance, owner)
        return bound


@overload
def tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
         timeout: float | None = None, side_effects: bool = False,
         schema: dict[str, Any] | None = None) -> Tool: ...
@overload
def tool(fn: None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None, side_effects: bool = False,
         schema: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None, side_effects: bool = False,
         schema: dict[str, Any] | None = None) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a `Tool` of a sync or async function, bare (`@tool`) or with options (`@tool(...)`).

    The parameters' schema comes from the signature (via pydantic) and the argument
    descriptions from the docstring (Google `Args:` or reST `:param x:`); the description
    is the docstring's first paragraph. `schema=` gives a raw JSON schema instead, checked
    here; the function then receives the validated JSON values as keyword arguments.
    `timeout` (seconds) overrides the registry's default; `side_effects` is a flag for the
    runtime (e.g. not to retry such calls blindly).

    >>> @tool(name="lookup", schema={"type": "object", "properties": {"q": {"type": "string"}},
    ...                              "required": ["q"]})
    ... def find(**kwargs):
    ...     "Look something up."
    ...     return kwargs["q"].upper()
    >>> find.name, find.description, find(q="x")
    ('lookup', 'Look something up.', 'X')
    """
    options = dict(name=name, description=description, timeout=timeout, side_effects=side_effects, schema=schema)
    if fn is None:
        return lambda f: _build(f, **options)
    return _build(fn, **options)


def _build(fn: Callable[..., Any], *, name: str | None, description: str | None, timeout: float | None,
           side_effects: bool, schema: dict[str, Any] | None) -> Tool:
    """The Tool for `fn` (see `tool`)."""
    if isinstance(fn, Tool):  # re-wrapping: rename or re-describe an existing tool
        changes = {k: v for k, v in (("name", name), ("description", description), ("timeout", timeout))
                   if v is not None}
        return replace(fn, **changes, side_effects=side_effects or fn.side_effects)
    if not callable(fn):
        raise TypeError(f"tool() needs a function or other callable, got {fn!r}")
    tool_name = name or _default_name(fn)
    doc = parse_docstring(inspect.getdoc(_doc_source(fn)))
    if schema is None:
        parameters, model = derive_parameters(fn, tool_name, doc.params)
    else:
        check_parameters(tool_name, schema)
        parameters, model = copy.deepcopy(schema), None
        _check_accepts(fn, tool_name, parameters)
    return Tool(name=tool_name, description=doc.summary if description is None else description,
                parameters=parameters, fn=fn, is_async=_is_async(fn), timeout=timeout,
                side_effects=side_effects, args_model=model)


def _default_name(fn: Callable[..., Any]) -> str:
    """`fn.__name__`, the wrapped function's name for a partial, else the class name."""
    for obj in (fn, getattr(fn, "func", None)):
        if isinstance(name := getattr(obj, "__name__", None), str):
            return name
    return type(fn).__name__


def _doc_source(fn: Callable[..., Any]) -> Any:
    """Where the docstring lives: the function, a partial's function, or a callable's __call__/class."""
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return fn
    if inspect.isfunction(getattr(fn, "func", None)):
        return fn.func  # functools.partial
    call = getattr(type(fn), "__call__", None)
    return call if getattr(call, "__doc__", None) else type(fn)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _check_accepts(fn: Callable[..., Any], name: str, parameters: dict[str, Any]) -> None:
    """A raw schema's properties must be parameters of `fn`, unless it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: trust the schema
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [p for p in parameters.get("properties", {}) if p not in params]
    if unknown:
        raise ValueError(f"tool `{name}`: schema properties {unknown} are not parameters of {fn!r} "
                         f"(it takes {list(params)}); rename them or give the function **kwargs")


@dataclass(slots=True)
class ToolResult:
    """The outcome of one tool call; `content` is exactly what the model will see.

    `error` is None when `ok`, else one of "invalid_call", "unknown_tool", "invalid_json",
    "invalid_arguments", "tool_error", "timeout", "exception". `value` is the function's
    return value when ok; `traceback` is kept for "exception" (for logs, not for the model).

    >>> ToolResult("c1", "add", "5", ok=True, value=5).to_message()
    {'role': 'tool', 'tool_call_id': 'c1', 'name': 'add', 'content': '5'}
    """

    call_id: str
    name: str
    content: str
    ok: bool
    error: str | None = None
    value: Any = None
    seconds: float = 0.0
    traceback: str | None = None

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style tool message for the conversation."""
        return {"role": "tool", "tool_call_id": self.call_id, "name": self.name, "content": self.content}


def render(value: Any) -> str:
    """The text of a return value: str as is, pydantic models as JSON, the rest via json.dumps."""
    try:
        if isinstance(value, str):
            return value
        if isinstance(value, BaseModel):
            return value.model_dump_json()
        return json.dumps(value, ensure_ascii=False, default=lambda o: to_jsonable_python(o, fallback=str))
    except Exception:  # unserializable or circular: the repr still tells the model something
        return repr(value)


def _message(exc: BaseException) -> str:
    """str(exc), or "" when even that fails."""
    try:
        return str(exc)
    except Exception:
        return ""


def _describe_exception(exc: BaseException) -> str:
    """`ValueError: bad thing`, or just `ValueError` when the message is empty."""
    message = _message(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _being_cancelled() -> bool:
    """True when someone cancelled the task we run in (not a tool raising CancelledError itself)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _get(obj: Any, key: str) -> Any:
    """`obj[key]` for mappings, `obj.key` for other objects; `_MISSING` when absent."""
    if isinstance(obj, Mapping):
        return obj.get(key, _MISSING)
    return getattr(obj, key, _MISSING)


def _parse_arguments(raw: Any) -> tuple[dict[str, Any] | None, str | None, str]:
    """(arguments, error kind, problem): JSON text is parsed; the result must be an object."""
    if isinstance(raw, (str, bytes, bytearray)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            near = exc.doc[max(0, exc.pos - 20): exc.pos + 20]
            return None, "invalid_json", (f"are not valid JSON: {exc.msg} at line {exc.lineno}, column "
                                          f"{exc.colno} (near {near!r}); send one JSON object that "
                                          "matches the parameters")
        except (ValueError, RecursionError) as exc:  # bad UTF-8 bytes, absurd nesting
            return None, "invalid_json", f"are not valid JSON ({_describe_exception(exc)}); send one JSON object"
    if raw is _MISSING:
        return None, "invalid_arguments", "are missing; send a JSON object ({} when there are no parameters)"
    if not isinstance(raw, Mapping):
        kind = "null" if raw is None else type(raw).__name__
        return None, "invalid_arguments", f"must be a JSON object, got {kind} {show(raw)}"
    if bad := [k for k in raw if not isinstance(k, str)]:
        return None, "invalid_arguments", f"must have string keys, got {show(bad[0])}"
    return dict(raw), None, ""


class ToolRegistry:
    """The tools an agent may call, and the dispatcher of its calls.

    `default_timeout` applies to tools without their own timeout (None: no limit);
    `max_result_chars` caps every result's content (None: no cap). Counters, per tool name
    as the model gave it (`""` when it gave none): `calls` counts every dispatched call,
    `failures` the results that were not ok; clear them with `.clear()`.

    >>> @tool
    ... def echo(text: str) -> str:
    ...     "Echo the text."
    ...     return text
    >>> registry = ToolRegistry([echo], default_timeout=10.0)
    >>> registry.names, "echo" in registry, len(registry)
    (['echo'], True, 1)
    >>> results = asyncio.run(registry.dispatch_many([
    ...     {"id": "a", "type": "function", "function": {"name": "echo", "arguments": '{"text": "hi"}'}},
    ...     {"id": "b", "name": "ecko", "arguments": {}}]))
    >>> [(r.call_id, r.ok, r.error) for r in results], registry.failures
    ([('a', True, None), ('b', False, 'unknown_tool')], Counter({'ecko': 1}))
    """

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), *,
                 default_timeout: float | None = 30.0, max_result_chars: int | None = 20_000) -> None:
        _check_positive(default_timeout, "default_timeout")
        if max_result_chars is not None and (not isinstance(max_result_chars, int) or max_result_chars < 1):
            raise ValueError(f"max_result_chars must be a positive int or None, got {max_result_chars!r}")
        self.default_timeout = default_timeout
        self.max_result_chars = max_result_chars
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._tools: dict[str, Tool] = {}
        self._ids = itertools.count(1)
        for t in tools:
            self.register(t)

    # ------------------------------------------------------------ the collection

    def register(self, tool_or_fn: Tool | Callable[..., Any]) -> Tool:
        """Add a Tool (a plain callable is wrapped with `tool`); also usable as a decorator."""
        t = tool_or_fn if isinstance(tool_or_fn, Tool) else tool(tool_or_fn)
        if is_unbound_method(t.fn):
            raise ValueError(f"tool `{t.name}` is a method read from its class; register it from an "
                             f"instance, e.g. registry.register(obj.{t.fn.__name__})")
        if t.name in self._tools:
            raise ValueError(f"a tool named `{t.name}` is already registered; give the new one another "
                             "name with tool(fn, name=...)")
        self._tools[t.name] = t
        return t

    def get(self, name: str, default: Tool | None = None) -> Tool | None:
        """The tool called `name`, or `default`."""
        return self._tools.get(name, default) if isinstance(name, str) else default

    def __getitem__(self, name: str) -> Tool:
        if (t := self.get(name)) is None:
            raise KeyError(f"no tool named {name!r}; available: {', '.join(self._tools) or '(none)'}")
        return t

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        """The Tools, in registration order."""
        return iter(list(self._tools.values()))

    @property
    def names(self) -> list[str]:
        """Tool names in registration order."""
        return list(self._tools)

    def schemas(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI tool shapes of all tools, or of `names`, in registration order."""
        return [t.schema() for t in self._select(names)]

    def subset(self, names: Iterable[str]) -> ToolRegistry:
        """A registry of some of these tools (the same Tool objects, fresh counters)."""
        return ToolRegistry(self._select(names), default_timeout=self.default_timeout,
                            max_result_chars=self.max_result_chars)

    def _select(self, names: Iterable[str] | None) -> list[Tool]:
        """Tools named in `names` (all when None) in registration order; KeyError for unknown names."""
        if names is None:
            return list(self._tools.values())
        wanted = {names} if isinstance(names, str) else set(names)
        if unknown := sorted(map(repr, wanted - set(self._tools))):
            raise KeyError(f"unknown tool name(s) {', '.join(unknown)}; available: "
                           f"{', '.join(self._tools) or '(none)'}")
        return [t for name, t in self._tools.items() if name in wanted]

    # ------------------------------------------------------------ dispatch

    async def dispatch(self, call: Any, *, timeout: float | None = None) -> ToolResult:
        """Run one tool call and return its result; never raises (but cancellation propagates).

        `call` has `id`, `name` and `arguments` (attributes or dict keys), or is OpenAI-shaped
        (`{"id", "type": "function", "function": {"name", "arguments"}}`); `arguments` is a dict
        or JSON text. A missing id becomes `call_<n>`. The call is checked (tool name, JSON,
        schema, pydantic coercion), then run: async tools in the loop, sync tools in a thread,
        within `timeout` (else the tool's, else the registry's). A sync tool that times out is
        abandoned but its thread runs to its end.
        """
        start = time.perf_counter()
        try:
            result = await self._dispatch(call, timeout)
        except Exception as exc:  # a bug here, or a hostile call object: still an answer
            result = ToolResult(f"call_{next(self._ids)}", "", f"tool call failed in the runtime: "
                                f"{_describe_exception(exc)}", ok=False, error="exception", traceback=format_exc())
        result.seconds = time.perf_counter() - start
        result.content = self._cap(result.content)
        self.calls[result.name] += 1
        if not result.ok:
            self.failures[result.name] += 1
        return result

    async def dispatch_many(self, calls: Iterable[Any], *, timeout: float | None = None) -> list[ToolResult]:
        """Dispatch all `calls` concurrently; the results are in call order."""
        calls = list(calls)
        if len(calls) == 1:  # the common turn: no task (and loop round trip) for one call
            return [await self.dispatch(calls[0], timeout=timeout)]
        return list(await asyncio.gather(*(self.dispatch(c, timeout=timeout) for c in calls)))

    async def _dispatch(self, call: Any, timeout: float | None) -> ToolResult:
        call_id, name, raw_arguments, problem = self._read(call)
        if problem:
            return ToolResult(call_id, name, f"invalid tool call: {problem}. {self._available()}",
                              ok=False, error="invalid_call")
        t = self._tools.get(name)
        if t is None:
            return ToolResult(call_id, name, self._unknown(name), ok=False, error="unknown_tool")
        arguments, kind, problem = _parse_arguments(raw_arguments)
        if arguments is None:
            return self._failed(t, call_id, kind or "invalid_arguments", f"arguments for tool `{name}` {problem}")
        kwargs, problems = t.check_arguments(arguments)
        if problems:
            return self._failed(t, call_id, "invalid_arguments", f"invalid arguments for tool `{name}`:\n"
                                + "\n".join(f"- {p}" for p in problems))
        return await self._run(t, call_id, kwargs, timeout)

    def _read(self, call: Any) -> tuple[str, str, Any, str]:
        """(call id, tool name, raw arguments, problem); the problem is "" for a readable call."""
        try:
            function = _get(call, "function")
            source = call if function is _MISSING or function is None else function
            raw_id, name, arguments = _get(call, "id"), _get(source, "name"), _get(source, "arguments")
        except Exception as exc:
            return f"call_{next(self._ids)}", "", None, f"could not read it ({_describe_exception(exc)})"
        call_id = raw_id if isinstance(raw_id, str) and raw_id else f"call_{next(self._ids)}"
        if name is _MISSING:
            return call_id, "", arguments, (f"expected `name` and `arguments` (or an OpenAI-style `function` "
                                            f"holding them), got {show(call)}")
        if not isinstance(name, str) or not name:
            return call_id, "", arguments, f"the tool name must be a non-empty string, got {show(name)}"
        return call_id, name, arguments, ""

    async def _run(self, t: Tool, call_id: str, kwargs: dict[str, Any], timeout: float | None) -> ToolResult:
        """Call the function within its time limit and turn the outcome into a result."""
        seconds = next((s for s in (timeout, t.timeout, self.default_timeout) if s is not None), None)
        scope = asyncio.timeout(seconds)
        try:
            async with scope:
                value = await _invoke(t, kwargs)
        except ToolError as exc:
            message = _message(exc)
            return self._failed(t, call_id, "tool_error", f"tool `{t.name}` reported an error"
                                + (f": {message}" if message else ""))
        except TimeoutError as exc:
            if scope.expired():
                return self._failed(t, call_id, "timeout", f"tool `{t.name}` timed out after {round(seconds, 3)} s "
                                    "and was abandoned; try smaller or simpler arguments, or another approach")
            return self._crashed(t, call_id, exc)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            return self._crashed(t, call_id, exc)
        except Exception as exc:
            return self._crashed(t, call_id, exc)
        return ToolResult(call_id, t.name, render(value), ok=True, value=value)

    def _failed(self, t: Tool, call_id: str, kind: str, message: str) -> ToolResult:
        """An error result about tool `t`, ending with how to call it."""
        return ToolResult(call_id, t.name, f"{message}\nUsage: {t.usage()}", ok=False, error=kind)

    def _crashed(self, t: Tool, call_id: str, exc: BaseException) -> ToolResult:
        result = self._failed(t, call_id, "exception", f"tool `{t.name}` failed: {_describe_exception(exc)}")
        result.traceback = format_exc()
        return result

    def _unknown(self, name: str) -> str:
        """The unknown-tool message: a close match (with its usage) and the available names."""
        close = difflib.get_close_matches(name, list(self._tools), n=1)
        text = f"unknown tool `{name[:80]}`."
        if close:
            text += f" Did you mean `{close[0]}`?"
        text += f" {self._available()}"
        return text + (f"\nUsage: {self._tools[close[0]].usage()}" if close else "")

    def _available(self) -> str:
        return f"Available tools: {', '.join(self._tools)}." if self._tools else "No tools are available."

    def _cap(self, text: str) -> str:
        """`text` cut to `max_result_chars`, with a marker saying how much was cut."""
        limit = self.max_result_chars
        if limit is None or len(text) <= limit:
            return text
        return f"{text[:limit]}\n[truncated: {len(text) - limit} more characters]"


async def _invoke(t: Tool, kwargs: dict[str, Any]) -> Any:
    """Await an async tool in the loop; run a sync one in a thread (awaiting what it returns if awaitable)."""
    value = await t.fn(**kwargs) if t.is_async else await asyncio.to_thread(t.fn, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value
