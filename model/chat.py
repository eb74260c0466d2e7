"""Chat formats: render conversations to prompt tokens and parse model output into reasoning, content and tool calls.

Parsing never raises on model output: a malformed tool call becomes a `ToolCallError` the model can be shown.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import Tokenizer

JSON_CALL_SHAPE = '{"name": ..., "arguments": {...}}'
XML_CALL_SHAPE = "<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>"


@dataclass(slots=True)
class ToolCall:
    """One parsed tool call; `id` is `call_<index>` unless the model gave one."""

    id: str
    name: str
    arguments: dict


@dataclass(slots=True)
class ToolCallError:
    """A tool call that could not be parsed: what was wrong, the raw call text, and its offset in the output."""

    message: str
    raw: str
    offset: int


@dataclass(slots=True)
class ParsedMessage:
    """An assistant turn split into reasoning (None when there was no think block), content and tool calls."""

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)

    def to_message(self) -> dict:
        """The OpenAI-style assistant message, ready to append to the conversation and render again."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]
        return msg


class _CallError(Exception):
    """Raised inside `_parse_call` only; `parse` turns it into a `ToolCallError`."""


class ChatFormat(ABC):
    """Turns messages into prompt ids (via the tokenizer's chat template) and model output back into a message.

    >>> fmt = ChatFormat.for_tokenizer(tok)
    >>> ids = fmt.render([{"role": "user", "content": "Weather in Oslo?"}], tools=[weather_schema])
    >>> fmt.parse('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>').tool_calls
    [ToolCall(id='call_0', name='get_weather', arguments={'city': 'Oslo'})]
    """

    think_start = "<think>"
    think_end = "</think>"
    tool_call_start = "<tool_call>"
    tool_call_end = "</tool_call>"
    end_of_turn = ("<|im_end|>", "</s>")  # stop tokens a completion may end with; `parse` drops them
    call_shape = ""  # what goes between the tool-call markers, quoted in error messages

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer

    @staticmethod
    def for_tokenizer(tokenizer: Tokenizer) -> ChatFormat:
        """The format a checkpoint asks for (`agentrt_chat_format` in tokenizer_config.json), else guessed
        from its chat template: `<function=` means Nemotron's XML tool calls, anything else JSON."""
        name = tokenizer.config.get("agentrt_chat_format")
        if name is None:
            name = "nemotron" if "<function=" in (tokenizer.chat_template or "") else "json"
        formats = {"nemotron": NemotronChatFormat, "json": JsonChatFormat}
        if name not in formats:
            raise ValueError(f"tokenizer_config.json agentrt_chat_format is {name!r}; expected one of {sorted(formats)}")
        return formats[name](tokenizer)

    def render(self, messages: list[dict], tools: list[dict] | None = None, *,
               add_generation_prompt: bool = True, enable_thinking: bool = True) -> list[int]:
        """Prompt token ids for `messages` and the tools' JSON schemas."""
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} was made without a tokenizer; use ChatFormat.for_tokenizer(tok)")
        return self.tokenizer.apply_chat_template(
            [_normalize_message(i, m) for i, m in enumerate(messages)], tools,
            add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, tokenize=True)

    def parse(self, text: str, *, thinking_open: bool = False, tools: list[dict] | None = None) -> ParsedMessage:
        """Split generated `text` into reasoning, content and tool calls; never raises.

        `thinking_open`: the prompt ended inside a think block, so `text` starts with reasoning.
        `tools`: JSON schemas used to coerce argument values (Nemotron format only).
        """
        while text.endswith(self.end_of_turn):
            text = text[: -len(next(e for e in self.end_of_turn if text.endswith(e)))]
        reasoning, pos = self._split_reasoning(text, thinking_open)
        schemas = _schemas_by_name(tools)
        content, calls, errors = [], [], []
        index = 0
        while (start := text.find(self.tool_call_start, pos)) >= 0:
            content.append(text[pos:start])
            inner = start + len(self.tool_call_start)
            close = text.find(self.tool_call_end, inner)
            reopen = text.find(self.tool_call_start, inner)
            if close < 0 or 0 <= reopen < close:  # unclosed: report it and go on from the next call, if any
                pos = len(text) if reopen < 0 else reopen
                errors.append(ToolCallError(
                    f"tool call {index + 1}: {self.tool_call_start} is not closed; expected "
                    f"{self.tool_call_start}{self.call_shape}{self.tool_call_end}", text[start:pos], start))
            else:
                pos = close + len(self.tool_call_end)
                try:
                    calls.append(self._parse_call(text[inner:close], f"call_{index}", schemas))
                except _CallError as e:
                    errors.append(ToolCallError(f"tool call {index + 1}: {e}", text[start:pos], start))
            index += 1
        content.append(text[pos:])
        return ParsedMessage(reasoning, "\n".join(s.strip() for s in content if s.strip()), calls, errors)

    def _split_reasoning(self, text: str, thinking_open: bool) -> tuple[str | None, int]:
        """The reasoning (None without a think block) and where the rest of `text` starts."""
        start = len(text) - len(text.lstrip())
        if not thinking_open and text.startswith(self.think_start, start):
            thinking_open, start = True, start + len(self.think_start)
        elif not thinking_open:
            start = 0
        end = text.find(self.think_end, start)
        if thinking_open:  # reasoning runs to </think>, or to the end when generation stopped inside it
            end = len(text) if end < 0 else end
        elif end < 0 or self.think_start in text[:end]:
            return None, 0
        # Without an opening tag, a leading "...</think>" is reasoning from a prompt that opened the block.
        return text[start:end].strip(), min(len(text), end + len(self.think_end))

    @abstractmethod
    def _parse_call(self, body: str, call_id: str, schemas: dict[str, dict]) -> ToolCall:
        """Parse the text between the tool-call markers; raise `_CallError` saying what is wrong and what is expected."""


class JsonChatFormat(ChatFormat):
    """Tool calls as ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` (the embedded model's format)."""

    call_shape = JSON_CALL_SHAPE

    def _parse_call(self, body: str, call_id: str, schemas: dict[str, dict]) -> ToolCall:
        call = _loads(body, "not valid JSON", f"expected {JSON_CALL_SHAPE}")
        if not isinstance(call, dict):
            raise _CallError(f"a JSON {_json_type(call)} is not a call; expected {JSON_CALL_SHAPE}")
        name = call.get("name")
        if not isinstance(name, str) or not name:
            got = "no name" if name is None else f"name {name!r}"
            raise _CallError(f"{got}; expected a function name string: {JSON_CALL_SHAPE}")
        args = call.get("arguments", {})
        if isinstance(args, str):  # OpenAI style: arguments as a JSON string
            args = _loads(args, "arguments string is not valid JSON", "expected a JSON object")
        if not isinstance(args, dict):
            raise _CallError(f"arguments is a JSON {_json_type(args)}; expected a JSON object: {JSON_CALL_SHAPE}")
        given_id = call.get("id")
        return ToolCall(given_id if isinstance(given_id, str) and given_id else call_id, name, args)


_FUNCTION_OPEN = re.compile(r"\s*<function=([^<>\n]+)>")
_PARAM_OPEN = re.compile(r"\s*<parameter=([^<>\n]+)>")


class NemotronChatFormat(ChatFormat):
    """Nemotron 3's XML tool calls: ``<tool_call>\\n<function=f>\\n<parameter=a>\\nVALUE\\n</parameter>\\n...``.

    A value is JSON-decoded when it can be, else kept as text; when the tool's schema says a parameter is a
    string, the raw text is kept (so "007" stays "007").
    """

    call_shape = "\\n" + XML_CALL_SHAPE + "\\n"

    def _parse_call(self, body: str, call_id: str, schemas: dict[str, dict]) -> ToolCall:
        m = _FUNCTION_OPEN.match(body)
        if m is None:
            raise _CallError(f"does not start with <function=NAME>; expected {XML_CALL_SHAPE}")
        name = m.group(1).strip()
        close = body.rfind("</function>")
        if close < m.end():
            raise _CallError(f"<function={name}> is not closed; expected </function> before </tool_call>")
        if body[close + len("</function>"):].strip():
            raise _CallError("unexpected text after </function>; expected only </tool_call>")
        properties = schemas.get(name, {}).get("properties", {})
        args: dict[str, Any] = {}
        pos = m.end()
        while body[pos:close].strip():
            p = _PARAM_OPEN.match(body, pos, close)
            if p is None:
                snippet = body[pos:close].strip()[:40]
                raise _CallError(f"unexpected text {snippet!r} inside <function={name}>; expected <parameter=ARG>")
            arg = p.group(1).strip()
            end = body.find("</parameter>", p.end(), close)
            if end < 0:
                raise _CallError(f"<parameter={arg}> is not closed; expected VALUE then </parameter>")
            if arg in args:
                raise _CallError(f"parameter {arg!r} given twice; give each parameter once")
            args[arg] = _decode_value(_strip_newline(body[p.end():end]), properties.get(arg))
            pos = end + len("</parameter>")
        return ToolCall(call_id, name, args)


def _loads(text: str, what: str, expected: str) -> Any:
    """json.loads, or a `_CallError` saying what was wrong, the decoder's complaint, and what is expected."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _CallError(f"{what} ({e}); {expected}") from None


def _strip_newline(value: str) -> str:
    # The template writes "\nVALUE\n"; remove exactly that, keeping any other whitespace of the value.
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _decode_value(raw: str, schema: dict | None) -> Any:
    # JSON-decode when possible; a parameter the schema types as string keeps its raw text unless the
    # decoded value fits one of its other allowed types.
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return raw
    types = (schema or {}).get("type") or []
    types = [types] if isinstance(types, str) else types
    if "string" in types and _json_type(value) not in types and not (
            "number" in types and _json_type(value) == "integer"):
        return raw
    return value


def _schemas_by_name(tools: list[dict] | None) -> dict[str, dict]:
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number", type(None): "null"}
    return names.get(type(value), "string")


def _normalize_message(index: int, message: dict) -> dict:
    # Templates need tool-call arguments as mappings; OpenAI clients send them as JSON strings.
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for j, call in enumerate(calls):
        fn = call.get("function", call)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"message {index} tool call {j}: arguments {args!r} are not valid JSON ({e}); "
                                 "expected a JSON object or a dict") from None
            if not isinstance(args, dict):
                raise ValueError(f"message {index} tool call {j}: arguments are a JSON {_json_type(args)}; "
                                 "expected a JSON object")
            fn = {**fn, "arguments": args}
            call = {**call, "function": fn} if "function" in call else fn
        fixed.append(call)
    return {**message, "tool_calls": fixed}
