"""What the runtime asks of a model: one chat turn in, one parsed assistant reply out.

Three implementations share this interface, so agents run unchanged on any of them:
`LocalModel` (the in-process engine and its chat format), `RemoteEngine` (any OpenAI-compatible
chat-completions server, `agentrt.remote`) and `ScriptedModel` (a Python function, for tests and
for benchmarking the runtime without a model). Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable


@dataclass(slots=True)
class ToolCallRequest:
    """A tool call the model made. `arguments` is what the model produced: normally a dict, but a
    raw string when the model's JSON did not parse (the registry turns that into an error result)."""

    id: str
    name: str
    arguments: Any


@dataclass(slots=True)
class Usage:
    """Token counts of one model call (or a sum of them)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    thinking_tokens: int = 0
    output_tokens: int = 0

    def __iadd__(self, other: Usage) -> Usage:
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens
        self.thinking_tokens += other.thinking_tokens
        self.output_tokens += other.output_tokens
        return self


@dataclass(slots=True)
class ChatReply:
    """One assistant turn, parsed.

    `errors` are tool calls the model attempted but that could not be parsed (each has an id and a
    message the model will be shown). `prompt_ids`/`token_ids`/`logprobs` are exactly what the
    engine consumed and produced when the model runs in process (empty for remote and scripted
    models that do not report them).
    """

    content: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    errors: list[ToolCallRequest] = field(default_factory=list)  # arguments: the error message
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_message(self) -> dict:
        """The OpenAI-style assistant message to append to the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        calls = self.tool_calls + self.errors
        if calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments if isinstance(c.arguments, dict) else {}}}
                for c in calls
            ]
        return msg


@dataclass(slots=True)
class ChatOptions:
    """Per-call settings the runtime passes to a model.

    `think_tokens`: the thinking budget (None: unlimited, 0: no thinking); `constrain_tools`: ask
    the model to emit tool calls whose arguments follow the tools' schemas (constrained decoding
    where the model supports it); `require_call`: a tool call must be made; `parallel_calls`:
    several calls may be made in one turn (False: one at most); `max_total_tokens`:
    prompt + generated tokens this call may use: the model caps generation to what the prompt
    leaves, and answers with `finish_reason="budget"` (nothing generated) when the prompt alone
    does not fit.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    think_tokens: int | None = None
    think_grace: int = 32
    constrain_tools: bool = True
    require_call: bool = False
    parallel_calls: bool = True
    session: str | None = None
    max_total_tokens: int | None = None  # prompt + generated; a model that cannot fit the prompt replies "budget"


@runtime_checkable
class ChatModel(Protocol):
    """The model interface of the runtime."""

    name: str

    async def chat(self, messages: list[dict], tools: list[dict] | None, options: ChatOptions) -> ChatReply:
        """One assistant turn for `messages` (OpenAI-style dicts) and the tools' OpenAI-style schemas."""
        ...

    async def close(self) -> None: ...


Script = Callable[[list[dict], list[dict] | None], "ChatReply | dict | str | Awaitable[ChatReply | dict | str]"]


class ScriptedModel:
    """A model played by a Python function of (messages, tools): for tests, examples and the
    runtime benchmark, with zero model latency.

    The function returns a `ChatReply`, a plain string (the answer), or a dict
    `{"content": ..., "tool_calls": [{"name": ..., "arguments": {...}}]}`; it may be async.

    >>> def script(messages, tools):
    ...     if messages[-1]["role"] == "tool":
    ...         return "The answer is " + messages[-1]["content"]
    ...     return {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}
    >>> model = ScriptedModel(script)
    """

    def __init__(self, script: Script, name: str = "scripted"):
        self.script, self.name = script, name
        self.calls: list[ChatOptions] = []  # the options of every call, in order
        self._ids = itertools.count()

    async def chat(self, messages: list[dict], tools: list[dict] | None, options: ChatOptions) -> ChatReply:
        self.calls.append(options)
        await asyncio.sleep(0)  # a real model always suspends the caller; so does this one, so backpressure acts
        out = self.script(messages, tools)
        if inspect.isawaitable(out):
            out = await out
        reply = self._reply(out)
        if reply.usage == Usage():  # no counts given: about four characters a token
            text = reply.content + "".join(json.dumps(c.arguments, default=str) for c in reply.tool_calls)
            reply.usage = Usage(prompt_tokens=sum(len(str(m.get("content") or "")) for m in messages) // 4,
                                output_tokens=max(1, len(text) // 4))
        cap = options.max_tokens
        if options.max_total_tokens is not None:
            cap = min(cap, options.max_total_tokens - reply.usage.prompt_tokens)
            if cap <= 0:
                return ChatReply(finish_reason="budget")
        reply.usage.output_tokens = min(reply.usage.output_tokens, cap)
        return reply

    def _reply(self, out: Any) -> ChatReply:
        if isinstance(out, ChatReply):
            return out
        if isinstance(out, str):
            return ChatReply(content=out)
        if isinstance(out, dict):
            calls = [ToolCallRequest(c.get("id") or f"call_{next(self._ids)}", c["name"], c.get("arguments", {}))
                     for c in out.get("tool_calls", [])]
            return ChatReply(content=out.get("content", ""), reasoning=out.get("reasoning"), tool_calls=calls,
                             finish_reason="tool_calls" if calls else "stop")
        raise TypeError(f"a ScriptedModel script returned {type(out).__name__}; return a ChatReply, a str or a dict "
                        "with 'content' and/or 'tool_calls'")

    async def close(self) -> None:
        pass
