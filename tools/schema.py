"""JSON schemas for tools: derived from signatures and docstrings, rendered for the model.

Three jobs, each a few small functions:

- `parse_docstring` reads a summary and per-argument descriptions (Google `Args:` or reST
  `:param x:`).
- `derive_parameters` turns a signature into a pydantic model of the arguments and a clean
  JSON schema of it (`type: object`, no `title` noise, extra arguments forbidden).
- `usage`, `schema_problems` and `pydantic_problems` write what the model reads when a
  call is wrong: one line per problem (``argument `price`: expected number, got 'cheap'``)
  and a compact signature of the tool.

>>> def f(city: str, days: int = 1):
...     '''Forecast.
...
...     Args:
...         city: City name.
...     '''
>>> params, _ = derive_parameters(f, "forecast", parse_docstring(f.__doc__).params)
>>> params["properties"]["city"], params["required"]
({'type': 'string', 'description': 'City name.'}, ['city'])
>>> usage("forecast", params)
'forecast(city: string, days: integer = 1)'
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

# ---------------------------------------------------------------- docstrings

_GOOGLE_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments):\s*$")
_GOOGLE_ENTRY = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_REST_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?\*{0,2}(\w+)\s*:\s*(.*)$")
_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")


@dataclass(slots=True)
class Docstring:
    """A docstring's first paragraph and its argument descriptions."""

    summary: str = ""
    params: dict[str, str] = field(default_factory=dict)


def parse_docstring(doc: str | None) -> Docstring:
    """Read the summary (first paragraph) and argument descriptions of a docstring.

    >>> parse_docstring('''Add numbers.
    ...
    ... :param a: first
    ...     number
    ... ''')
    Docstring(summary='Add numbers.', params={'a': 'first number'})
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    params = _google_params(lines)
    params.update({k: v for k, v in _rest_params(lines).items() if k not in params})
    return Docstring(_summary(lines), params)


def _summary(lines: list[str]) -> str:
    """The first paragraph, stopping at a blank line, a section header or a reST field."""
    taken: list[str] = []
    for line in lines:
        text = line.strip()
        if not text or _SECTION.match(text) or text.startswith(":"):
            break
        taken.append(text)
    return " ".join(taken)


def _google_params(lines: list[str]) -> dict[str, str]:
    """Entries of Google-style `Args:` sections; continuation lines are joined."""
    params: dict[str, str] = {}
    header_indent: int | None = None
    current: str | None = None
    entry_indent = 0
    for index, line in enumerate(lines):
        if (m := _GOOGLE_ARGS.match(line)) is not None:
            # cleandoc dedents the lines after the first on their own: entries under a header
            # on the first line may end up at indent 0
            header_indent, current, entry_indent = (len(m[1]) if index else -1), None, 0
            continue
        if header_indent is None or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:
            header_indent = current = None
            continue
        entry_indent = entry_indent or indent
        if indent == entry_indent and (m := _GOOGLE_ENTRY.match(line.strip())) is not None:
            current = m[1]
            params[current] = m[2].strip()
        elif current is not None:
            params[current] = f"{params[current]} {line.strip()}".strip()
    return params


def _rest_params(lines: list[str]) -> dict[str, str]:
    """`:param [type] name: text` fields; indented continuation lines are joined."""
    params: dict[str, str] = {}
    current: str | None = None
    for line in lines:
        if (m := _REST_PARAM.match(line.strip())) is not None:
            current = m[1]
            params[current] = m[2].strip()
        elif current is not None and line[:1].isspace() and line.strip():
            params[current] = f"{params[current]} {line.strip()}"
        else:
            current = None
    return params


# ---------------------------------------------------------------- signatures -> schemas


def derive_parameters(fn: Callable[..., Any], name: str,
                      descriptions: dict[str, str]) -> tuple[dict[str, Any], type[BaseModel]]:
    """The parameters' JSON schema and the pydantic model that coerces arguments for `fn`.

    Fields are named `arg0, arg1, ...` with the parameter names as aliases, so any parameter
    name works (`json`, `schema`, `model_x`); validate and read them by alias.
    """
    fields = {f"arg{i}": _field(p) for i, p in enumerate(_parameters(fn, name))}
    config = ConfigDict(extra="forbid", protected_namespaces=())
    try:
        model = create_model(f"{name}_arguments", __config__=config, **fields)
        schema = model.model_json_schema()
    except Exception as exc:
        raise ValueError(f"tool `{name}`: {_blame(fields, exc)}; use types pydantic can describe "
                         "(str, int, float, bool, list, dict, Enum, Literal, BaseModel, ...) "
                         "or pass schema=") from None
    return _tidy(schema, descriptions), model


def _parameters(fn: Callable[..., Any], name: str) -> list[inspect.Parameter]:
    """The parameters the model fills: `self`/`cls` of a function defined in a class is skipped."""
    params = list(_signature(fn, name).parameters.values())
    if is_unbound_method(fn):
        params = params[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ValueError(f"tool `{name}`: parameter `{p}` cannot be filled from a JSON object; "
                             "use named parameters (or pass schema= for a function taking **kwargs)")
    return params


def _signature(fn: Callable[..., Any], name: str) -> inspect.Signature:
    """The signature with string annotations resolved (module globals, then closure variables)."""
    target = getattr(fn, "func", fn)  # functools.partial keeps its function's globals
    scope = dict(inspect.getclosurevars(target).nonlocals) if inspect.isfunction(target) else None
    try:
        return inspect.signature(fn, eval_str=True, locals=scope)
    except NameError as exc:
        raise ValueError(f"tool `{name}`: cannot resolve a type annotation of {fn!r} ({exc}); "
                         "define the type at module level or pass schema=") from None
    except Exception as exc:  # no signature (some builtins), or an annotation that is not valid Python
        raise ValueError(f"tool `{name}`: cannot read the signature of {fn!r} ({type(exc).__name__}: {exc}); "
                         "wrap it in a def with typed parameters or pass schema=") from None


def is_unbound_method(fn: Callable[..., Any]) -> bool:
    """True for a plain function whose first parameter is `self` or `cls` (a method in a class body)."""
    if not inspect.isfunction(fn):
        return False
    first = next(iter(inspect.signature(fn).parameters), None)
    return first in ("self", "cls")


def _field(p: inspect.Parameter) -> tuple[Any, FieldInfo]:
    """(annotation, FieldInfo) for one parameter; a `= Field(...)` default is honoured."""
    annotation = Any if p.annotation is p.empty else p.annotation
    if isinstance(p.default, FieldInfo):
        return Annotated[annotation, p.default], Field(alias=p.name)
    if p.default is p.empty:
        return annotation, Field(alias=p.name)
    return annotation, Field(p.default, alias=p.name)


def _blame(fields: dict[str, tuple[Any, FieldInfo]], exc: Exception) -> str:
    """Name the parameter whose type pydantic cannot turn into a schema."""
    for annotation, info in fields.values():
        try:
            TypeAdapter(annotation).json_schema()
        except Exception as inner:
            return f"parameter `{info.alias}` has type {annotation!r} with no JSON schema ({type(inner).__name__})"
    return f"cannot build a JSON schema of the parameters ({type(exc).__name__}: {exc})"


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SUBSCHEMA = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then",
              "else", "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUBSCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def strip_titles(schema: Any) -> Any:
    """A copy of `schema` without `title` keywords (properties named "title" are kept)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title":
            continue
        if key in _SUBSCHEMA:
            value = strip_titles(value)
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            value = [strip_titles(v) for v in value]
        elif key in _SUBSCHEMA_MAP and isinstance(value, dict):
            value = {k: strip_titles(v) for k, v in value.items()}
        out[key] = value
    return out


def _tidy(schema: dict[str, Any], descriptions: dict[str, str]) -> dict[str, Any]:
    """Drop titles, add docstring descriptions, and order the top-level keys for reading."""
    schema = strip_titles(schema)
    properties = schema.get("properties", {})
    for prop, text in descriptions.items():
        if prop in properties and "description" not in properties[prop]:
            properties[prop] = {**properties[prop], "description": text}
    tidy: dict[str, Any] = {"type": "object", "properties": properties,
                            "required": schema.get("required", []), "additionalProperties": False}
    if "$defs" in schema:
        tidy["$defs"] = schema["$defs"]
    return tidy


def check_parameters(name: str, schema: Any) -> None:
    """Raise ValueError unless `schema` is a valid draft 2020-12 schema of `type: object`."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        shown = schema.get("type") if isinstance(schema, dict) else type(schema).__name__
        raise ValueError(f"tool `{name}`: the parameters schema must be a dict with \"type\": \"object\", "
                         f"got {shown!r}; e.g. {{\"type\": \"object\", \"properties\": "
                         f"{{\"city\": {{\"type\": \"string\"}}}}, \"required\": [\"city\"]}}")
    try:
        Draft202012Validator.check_schema(schema)
    except Exception as exc:  # jsonschema.SchemaError, or a bad $ref / regex inside the schema
        where = "/".join(str(p) for p in getattr(exc, "absolute_path", ())) or "(top level)"
        problem = getattr(exc, "message", str(exc))
        raise ValueError(f"tool `{name}`: invalid parameters schema at {where}: {problem}; "
                         "fix it to be a JSON Schema (draft 2020-12) object") from None


# ---------------------------------------------------------------- what the model reads


def show(value: Any, limit: int = 60) -> str:
    """A short rendering of a value: strings quoted like 'this', everything else as JSON."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def usage(name: str, parameters: dict[str, Any], limit: int = 500) -> str:
    """A compact signature of a tool: `name(city: string, unit: 'c' | 'f' = 'c', note?: string)`."""
    required = set(parameters.get("required", []))
    defs = parameters.get("$defs", {})
    parts = []
    for prop, sub in (parameters.get("properties") or {}).items():
        has_default = isinstance(sub, dict) and "default" in sub
        text = f"{prop}{'' if prop in required or has_default else '?'}: {_type(sub, defs, 0)}"
        if has_default:
            text += f" = {show(sub['default'], 40)}"
        parts.append(text)
    text = f"{name}({', '.join(parts)})"
    return text if len(text) <= limit else text[: limit - 4] + "...)"


def _type(schema: Any, defs: dict[str, Any], depth: int) -> str:
    """A short type expression for one schema; nested objects are expanded two levels deep."""
    if not isinstance(schema, dict) or not schema:
        return "any"
    if isinstance(ref := schema.get("$ref"), str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        if target is None or (depth >= 2 and "enum" not in target):
            return ref.rsplit("/", 1)[-1]
        return _type(target, defs, depth)
    if "enum" in schema:
        return " | ".join(show(v, 40) for v in schema["enum"])
    if "const" in schema:
        return show(schema["const"], 40)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(_type(s, defs, depth) for s in schema[key])
    kind = schema.get("type")
    if kind == "array":
        return f"list[{_type(schema.get('items'), defs, depth)}]"
    if kind == "object":
        return _object_type(schema, defs, depth)
    if isinstance(kind, list):
        return " | ".join(map(str, kind))
    return str(kind) if kind else "any"


def _object_type(schema: dict[str, Any], defs: dict[str, Any], depth: int) -> str:
    """`{a: string, b?: integer}` for objects with properties, `dict[string, X]` for maps."""
    props = schema.get("properties")
    if props and depth < 2:
        required = set(schema.get("required", []))
        inner = ", ".join(f"{k}{'' if k in required else '?'}: {_type(v, defs, depth + 1)}"
                          for k, v in props.items())
        return "{" + inner + "}"
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra and not props:
        return f"dict[string, {_type(extra, defs, depth + 1)}]"
    return "object"


def _path(parts: Iterable[Any]) -> str:
    """`order.items[2].qty` from ("order", "items", 2, "qty")."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _subject(where: str) -> str:
    return f"argument `{where}`" if where else "arguments"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean `{match[0]}`?)" if match else ""


# Keywords that annotate and never reject (JSON Schema 2020-12, meta-data and core vocabularies).
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
                          "$comment"})
_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: type(v) is str,
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) is int or type(v) is float,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


def quick_check(schema: Any) -> Callable[[Any], bool] | None:
    """For the common shape of tool schemas (an object whose properties each have one plain type,
    `required`, `additionalProperties` true or false, annotations), a check that returns True
    only for arguments the full validator accepts; None for any other schema.

    False proves nothing (a subclass of str, 1.0 for an integer): the caller then asks the
    validator, which also words the problems. The point is the valid call, the common one, at a
    fraction of jsonschema's cost, on the event loop's thread.
    """
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return None
    if set(schema) - {"type", "properties", "required", "additionalProperties"} - _ANNOTATIONS:
        return None
    props, required = schema.get("properties", {}), schema.get("required", [])
    extra = schema.get("additionalProperties", True)
    if not isinstance(props, dict) or not isinstance(required, list) or extra not in (True, False):
        return None
    if not all(isinstance(r, str) for r in required):
        return None
    checks: dict[str, Callable[[Any], bool]] = {}
    for name, sub in props.items():
        kind = sub.get("type") if isinstance(sub, dict) else None
        if not isinstance(kind, str) or kind not in _TYPE_CHECKS or set(sub) - {"type"} - _ANNOTATIONS:
            return None
        checks[name] = _TYPE_CHECKS[kind]
    closed = extra is False

    def check(arguments: Any) -> bool:
        if type(arguments) is not dict or any(r not in arguments for r in required):
            return False
        for key, value in arguments.items():
            test = checks.get(key)
            if test is None:
                if closed:
                    return False
            elif not test(value):
                return False
        return True

    return check


def schema_problems(validator: Draft202012Validator, arguments: Any) -> list[str]:
    """Every way `arguments` breaks the schema, one model-readable line each (deduplicated)."""
    errors = validator.iter_errors(arguments)  # in schema order: properties, required, extras
    return list(dict.fromkeys(line for e in errors for line in _describe(e)))


def _describe(error: SchemaValidationError) -> list[str]:
    """Lines for one jsonschema error."""
    where, instance = _path(error.absolute_path), error.instance
    if error.validator == "required" and isinstance(instance, dict):
        return [f"missing required argument `{_join(where, k)}`"
                for k in error.validator_value if k not in instance]
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        return [f"unexpected argument `{_join(where, str(k))}`{_did_you_mean(str(k), known)}"
                for k in instance if k not in known and not any(re.search(p, str(k)) for p in patterns)]
    if error.validator in ("anyOf", "oneOf") and error.context:
        return _describe_union(error, where)
    expected = _expected(error.validator, error.validator_value)
    if expected is None:
        return [f"{_subject(where)}: {error.message}"]
    return [f"{_subject(where)}: {expected}, got {show(instance)}"]


def _describe_union(error: SchemaValidationError, where: str) -> list[str]:
    """An anyOf/oneOf failure: the allowed types, or the closest branch's own problems."""
    context = list(error.context or ())
    wrong_type = [c for c in context if c.validator == "type" and not c.relative_path]
    if len(wrong_type) == len(context):
        kinds = [k for c in wrong_type for k in ([c.validator_value] if isinstance(c.validator_value, str)
                                                 else c.validator_value)]
        return [f"{_subject(where)}: expected {' or '.join(dict.fromkeys(kinds))}, got {show(error.instance)}"]
    branches: dict[Any, list[SchemaValidationError]] = {}
    for c in context:
        if c not in wrong_type:
            branches.setdefault(c.relative_schema_path[0], []).append(c)
    closest = min(branches.values(), key=len)
    return [line for c in closest for line in _describe(c)]


_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
_COUNTS = {"minLength": ("at least", "characters"), "maxLength": ("at most", "characters"),
           "minItems": ("at least", "items"), "maxItems": ("at most", "items"),
           "minProperties": ("at least", "entries"), "maxProperties": ("at most", "entries")}


def _expected(keyword: str | None, value: Any) -> str | None:
    """'expected ...' for the common keywords; None lets jsonschema's own message through."""
    if keyword == "type":
        return f"expected {' or '.join([value] if isinstance(value, str) else value)}"
    if keyword == "enum":
        return f"expected one of {', '.join(show(v, 40) for v in value)}"
    if keyword == "const":
        return f"expected {show(value, 40)}"
    if keyword in _BOUNDS:
        return f"expected a number {_BOUNDS[keyword]} {value}"
    if keyword in _COUNTS:
        bound, unit = _COUNTS[keyword]
        return f"expected {bound} {value} {unit}"
    if keyword == "multipleOf":
        return f"expected a multiple of {value}"
    if keyword == "pattern":
        return f"expected a string matching the pattern {value!r}"
    if keyword == "format":
        return f"expected a string in {value} format"
    if keyword == "uniqueItems":
        return "expected unique items"
    return None


def pydantic_problems(exc: ValidationError) -> list[str]:
    """pydantic's errors in the same shape as `schema_problems`."""
    lines = []
    for err in exc.errors(include_url=False):
        where = _path(err["loc"])
        if err["type"] == "missing":
            lines.append(f"missing required argument `{where}`")
        elif err["type"] == "extra_forbidden":
            lines.append(f"unexpected argument `{where}`")
        else:
            msg = err["msg"][:1].lower() + err["msg"][1:]
            lines.append(f"{_subject(where)}: {msg}, got {show(err.get('input'))}")
    return list(dict.fromkeys(lines))
