"""`RemoteEngine`: the runtime's `ChatModel` over any OpenAI-compatible chat-completions server
(vLLM, SGLang, llama.cpp, agentrt's own server, the OpenAI API).

One request per assistant turn, streamed by default; the reply is parsed into a `ChatReply` with
tool calls as dicts and malformed calls in `ChatReply.errors`, ready for the tool registry.
Importing this module imports aiohttp, so `agentrt/__init__.py` never imports it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from agentrt.llm import ChatOptions, ChatReply, ToolCallRequest, Usage

MAX_BACKOFF = 10.0  # seconds: cap on one wait between retries, Retry-After included
BODY_LIMIT = 500  # characters of a server's error body quoted in an error


class RemoteEngineError(RuntimeError):
    """A chat-completions request failed for good (after any retries).

    `url`, `status` (None when no HTTP response came back) and `body` (the server's error body,
    truncated) say what happened; the message also says what to check.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.url, self.status, self.body = url, status, body


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix (connection, timeout, 429, 5xx)."""

    def __init__(self, detail: str, status: int | None = None, body: str = "", retry_after: float | None = None):
        super().__init__(detail)
        self.detail, self.status, self.body, self.retry_after = detail, status, body, retry_after


class RemoteEngine:
    """A `ChatModel` served by an OpenAI-compatible `POST {base_url}/chat/completions` endpoint.

    `options.think_tokens`, when not None, is sent as `"max_thinking_tokens": N`, the field
    NVIDIA's servers and agentrt's own accept, with the grace window as `"thinking_grace_tokens"`
    (agentrt's); other OpenAI-compatible servers ignore unknown fields. `timeout` bounds
    connecting and each wait for data (time between streamed chunks; the whole generation when
    `stream=False`). Connection errors, timeouts, HTTP 429 and 5xx are retried `max_retries` times,
    waiting `backoff`, 2*`backoff`, 4*`backoff`, ... seconds (or the server's `Retry-After`), at
    most 10 s. The API key comes from `api_key` or the `OPENAI_API_KEY` environment variable.

    `token_ids=True` asks the server for the exact prompt and output token ids and the sampled
    tokens' logprobs (`return_token_ids` and `logprobs`, which agentrt's server and vLLM accept),
    so replies carry `prompt_ids`, `token_ids` and `logprobs` as they do in process and trajectories
    stay token-faithful. Leave it off for servers that reject unknown fields (the OpenAI API).

    >>> async def main():
    ...     async with RemoteEngine("http://localhost:8000/v1", "nemotron-h-8b") as model:
    ...         reply = await model.chat([{"role": "user", "content": "Hi"}], None, ChatOptions())
    ...         return reply.content
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3, headers: dict[str, str] | None = None, stream: bool = True,
                 max_connections: int = 64, backoff: float = 0.5, token_ids: bool = False):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url {base_url!r} is not an http(s) URL; pass e.g. 'http://localhost:8000/v1'")
        _check_number("timeout", timeout, low=0.0, strict=True)
        _check_number("max_retries", max_retries, low=0)
        _check_number("max_connections", max_connections, low=1)
        _check_number("backoff", backoff, low=0.0)
        self.base_url, self.model = base_url.rstrip("/"), model
        self.url = f"{self.base_url}/chat/completions"
        self.name = f"remote:{model}@{parts.netloc}"
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.stream, self.max_connections, self.token_ids = stream, max_connections, token_ids
        self.max_concurrency = max_connections  # calls the runtime lets through at once
        self.headers = _request_headers(api_key or os.environ.get("OPENAI_API_KEY"), headers, stream)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def chat(self, messages: list[dict], tools: list[dict] | None, options: ChatOptions) -> ChatReply:
        """One assistant turn: POST the conversation, parse the (streamed) answer.

        Raises `RemoteEngineError` when the server cannot be reached or refuses the request.
        """
        body = request_body(self.model, messages, tools, options, stream=self.stream)
        if self.token_ids:
            body.update(return_token_ids=True, logprobs=True)
        session = self._get_session()
        start = time.perf_counter()
        attempt = 0
        while True:
            try:
                reply = await self._attempt(session, body)
            except _Retryable as failure:
                if attempt >= self.max_retries:
                    raise self._final_error(failure, attempt + 1) from failure
                await asyncio.sleep(self._delay(attempt, failure.retry_after))
                attempt += 1
                continue
            reply.seconds = time.perf_counter() - start
            return reply

    async def close(self) -> None:
        """Close the HTTP session (idempotent); a later `chat` opens a new one."""
        session, self._session, self._loop = self._session, None, None
        if session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> RemoteEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        """The shared session, created in (and bound to) the running event loop."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self.headers)
            self._loop = loop
        return self._session

    async def _attempt(self, session: aiohttp.ClientSession, body: dict) -> ChatReply:
        """One HTTP request; raises `_Retryable` for failures worth another try."""
        try:
            async with session.post(self.url, json=body) as resp:
                try:
                    if resp.status >= 400:
                        raise await self._http_error(resp)
                    if self.stream:
                        return await self._read_stream(resp)
                    return self._read_json(await resp.read())
                except asyncio.CancelledError:
                    resp.close()  # drop the connection so the server stops generating
                    raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _Retryable(_describe(exc)) from exc

    async def _http_error(self, resp: aiohttp.ClientResponse) -> Exception:
        text = _truncate(await resp.text(errors="replace"))
        if resp.status == 429 or resp.status >= 500:
            return _Retryable(f"HTTP {resp.status}", resp.status, text, _retry_after(resp.headers.get("Retry-After")))
        message = f"POST {self.url} returned HTTP {resp.status}: {text}\n{_advice(resp.status, self.model)}"
        return RemoteEngineError(message, url=self.url, status=resp.status, body=text)

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> ChatReply:
        """Parse a Server-Sent Events body into a reply."""
        acc, decoder = _Accumulator(), _SSEDecoder()
        try:
            async for chunk in resp.content.iter_any():
                if done := self._take_events(acc, decoder.feed(chunk)):
                    break
            else:
                done = self._take_events(acc, decoder.flush())
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._check_complete(acc, f"stream broke off ({_describe(exc)})")
            return acc.reply()
        self._check_complete(acc, "stream ended early, without [DONE] or a finish_reason", done)
        return acc.reply()

    def _take_events(self, acc: _Accumulator, payloads: list[str]) -> bool:
        """Feed `data:` payloads to `acc`; True once `[DONE]` came."""
        for data in payloads:
            if data.strip() == "[DONE]":
                return True
            self._take_event(acc, data)
        return False

    def _take_event(self, acc: _Accumulator, data: str) -> None:
        """Feed one JSON chunk to `acc`; a chunk carrying an `error` (vLLM does this) raises."""
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise self._protocol_error(f"sent a stream event that is not JSON ({exc}): {_truncate(data)}") from exc
        if not isinstance(event, dict):
            raise self._protocol_error(f"sent a stream event that is not a JSON object: {_truncate(data)}")
        if "error" in event:
            raise self._protocol_error(f"reported an error mid-stream: {_truncate(json.dumps(event['error']))}")
        acc.add_chunk(event)

    def _check_complete(self, acc: _Accumulator, what: str, done: bool = False) -> None:
        """A stream is complete at `[DONE]` or once a finish_reason came; retry only if nothing came."""
        if done or acc.finish_reason is not None:
            return
        if not acc.received:
            raise _Retryable(what)
        raise RemoteEngineError(f"{what} from {self.url} after partial output; the server may have crashed or "
                                "cut the connection: check its logs", url=self.url)

    def _read_json(self, raw: bytes) -> ChatReply:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise self._protocol_error(f"answered with a body that is not JSON ({exc}): "
                                       f"{_truncate(raw.decode(errors='replace'))}") from exc
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise self._protocol_error(f"answered without choices: {_truncate(raw.decode(errors='replace'))}")
        acc = _Accumulator()
        acc.add_delta(choices[0].get("message") or {})
        acc.add_tokens(choices[0], data)
        acc.finish_reason = choices[0].get("finish_reason")
        acc.add_usage(data.get("usage"))
        return acc.reply()

    def _protocol_error(self, what: str) -> RemoteEngineError:
        return RemoteEngineError(f"the server at {self.url} {what}", url=self.url)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        return min(MAX_BACKOFF, retry_after if retry_after is not None else self.backoff * 2**attempt)

    def _final_error(self, failure: _Retryable, attempts: int) -> RemoteEngineError:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if failure.status is None:
            message = (f"could not get an answer from {self.url} after {tries}: {failure.detail}. Check that the "
                       f"server is running and that base_url {self.base_url!r} is right (e.g. "
                       "'http://host:8000/v1'), or raise timeout/max_retries.")
        else:
            message = (f"POST {self.url} failed after {tries}: HTTP {failure.status}: {failure.body}\nThe server "
                       "is overloaded or failing: check its logs, lower the number of concurrent agents, or raise "
                       "max_retries.")
        return RemoteEngineError(message, url=self.url, status=failure.status, body=failure.body)


def request_body(model: str, messages: list[dict], tools: list[dict] | None, options: ChatOptions, *,
                 stream: bool) -> dict[str, Any]:
    """The chat-completions request for one turn (the caller's messages are not modified).

    >>> request_body("m", [{"role": "user", "content": "Hi"}], None, ChatOptions(seed=1), stream=False)["seed"]
    1
    """
    body: dict[str, Any] = {"model": model, "messages": [_wire_message(m) for m in messages],
                            "temperature": options.temperature, "top_p": options.top_p,
                            "max_tokens": options.max_tokens, "stream": stream}
    if tools:
        body["tools"] = tools
        body["tool_choice"] = "required" if options.require_call else "auto"
        if not options.parallel_calls:
            body["parallel_tool_calls"] = False
    if options.seed is not None:
        body["seed"] = options.seed
    if options.stop:
        body["stop"] = list(options.stop)
    if options.think_tokens is not None:
        body["max_thinking_tokens"] = options.think_tokens  # vendor fields: agentrt's server reads both
        body["thinking_grace_tokens"] = options.think_grace
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _wire_message(message: dict) -> dict:
    """`message` as the API expects it: tool-call arguments as JSON strings, not dicts."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {**message, "tool_calls": [_wire_call(c) for c in calls]}


def _wire_call(call: dict) -> dict:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        return call
    return {**call, "function": {**function, "arguments": json.dumps(arguments if arguments is not None else {})}}


class _SSEDecoder:
    """Splits a byte stream into `data:` payloads, whatever the network chunking.

    Each `data:` line is one payload (OpenAI-compatible servers put one JSON object per line, and
    some omit the blank line between events); comments (`:`) and other fields are skipped.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return [data for line in lines if (data := _data_of(line)) is not None]

    def flush(self) -> list[str]:
        line, self._pending = self._pending, b""
        data = _data_of(line)
        return [] if data is None else [data]


def _data_of(line: bytes) -> str | None:
    text = line.rstrip(b"\r").decode("utf-8", errors="replace")
    if not text.startswith("data:"):
        return None
    return text[6:] if text.startswith("data: ") else text[5:]


class _Accumulator:
    """Builds a `ChatReply` from streamed deltas (or from one non-streamed message)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}  # index -> {"id", "name", "arguments": [fragments]}
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.received = False
        self.prompt_ids: list[int] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []

    def add_chunk(self, event: dict) -> None:
        self.received = True
        for choice in event.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self.add_delta(choice.get("delta") or {})
                self.add_tokens(choice, event)
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.add_usage(event.get("usage"))

    def add_tokens(self, choice: dict, event: dict) -> None:
        """Token ids and logprobs, where the server sends them (`return_token_ids`, `logprobs`)."""
        if isinstance(event.get("prompt_token_ids"), list):
            self.prompt_ids = event["prompt_token_ids"]
        if isinstance(choice.get("token_ids"), list):
            self.token_ids = choice["token_ids"]
        content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        for entry in content or []:
            if isinstance(entry, dict) and isinstance(entry.get("logprob"), (int, float)):
                self.logprobs.append(float(entry["logprob"]))

    def add_delta(self, delta: dict) -> None:
        if delta.get("content"):
            self.content.append(delta["content"])
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self.reasoning.append(reasoning)
        for call in delta.get("tool_calls") or []:
            self._add_call(call)

    def _add_call(self, call: dict) -> None:
        index = call.get("index")
        if index is None:  # servers that omit `index`: a new id starts a new call
            new = call.get("id") and all(c["id"] != call["id"] for c in self.calls.values())
            index = len(self.calls) if new or not self.calls else max(self.calls)
        slot = self.calls.setdefault(index, {"id": None, "name": "", "arguments": []})
        slot["id"] = slot["id"] or call.get("id")
        function = call.get("function") or {}
        if function.get("name") and not slot["name"]:
            slot["name"] = function["name"]
        if function.get("arguments") is not None:
            slot["arguments"].append(function["arguments"])

    def add_usage(self, usage: dict | None) -> None:
        if not isinstance(usage, dict):
            return
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        self.usage = Usage(prompt_tokens=usage.get("prompt_tokens") or 0,
                           cached_tokens=prompt_details.get("cached_tokens") or 0,
                           thinking_tokens=completion_details.get("reasoning_tokens") or 0,
                           output_tokens=usage.get("completion_tokens") or 0)

    def reply(self) -> ChatReply:
        reply = ChatReply(content="".join(self.content), reasoning="".join(self.reasoning) or None,
                          usage=self.usage, prompt_ids=list(self.prompt_ids), token_ids=list(self.token_ids),
                          logprobs=list(self.logprobs))
        for n, index in enumerate(sorted(self.calls)):
            slot = self.calls[index]
            call_id, arguments = slot["id"] or f"call_{n}", _parse_arguments(slot["arguments"])
            if isinstance(arguments, dict) and slot["name"]:
                reply.tool_calls.append(ToolCallRequest(call_id, slot["name"], arguments))
            else:
                problem = arguments if slot["name"] else "the call has no function name; name one of the tools"
                reply.errors.append(ToolCallRequest(call_id, slot["name"], f"tool call {call_id} "
                                                    f"({slot['name'] or 'unnamed'}): {problem}"))
        reply.finish_reason = self.finish_reason or ("tool_calls" if reply.tool_calls or reply.errors else "stop")
        return reply


def _parse_arguments(fragments: list[Any]) -> dict | str:
    """The arguments as a dict, or a message for the model saying why they are not one."""
    if len(fragments) == 1 and isinstance(fragments[0], dict):
        return fragments[0]  # some servers send parsed arguments when not streaming
    raw = "".join(str(f) for f in fragments)
    if not raw.strip():
        return {}  # a call without arguments
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"arguments must be a JSON object, but {_truncate(raw, 200)!r} is not valid JSON ({exc})"
    if not isinstance(value, dict):
        return f"arguments must be a JSON object, got {type(value).__name__} {_truncate(raw, 200)}"
    return value


def _request_headers(api_key: str | None, extra: dict[str, str] | None, stream: bool) -> dict[str, str]:
    headers = {"Accept": "text/event-stream" if stream else "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {**headers, **(extra or {})}


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (the HTTP-date form is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _advice(status: int, model: str) -> str:
    if status in (401, 403):
        return "Check the API key (api_key= or OPENAI_API_KEY) and that it may use this server."
    if status == 404:
        return (f"Check that base_url ends where the API lives (usually '/v1') and that the server serves "
                f"model {model!r}.")
    return f"Check the request the server rejected: model {model!r}, the messages, the tools and the options."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out waiting for the server"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _truncate(text: str, limit: int = BODY_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _check_number(name: str, value: float, *, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"RemoteEngine {name}={value!r} is out of range; pass a value {bound}")
