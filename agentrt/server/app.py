"""The OpenAI-compatible HTTP server over the in-process engine (aiohttp).

`Server` owns the engine's request path: it renders chat requests with the checkpoint's chat
format, turns tool choices, response formats and thinking budgets into engine constraints, admits
requests under a bound (429 beyond it), and streams tokens back as server-sent events. A client
that goes away cancels its request, which frees everything the request held in the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from agentrt.model import Constraint, Engine, LoadedModel, Request, SamplingParams, ThinkingBudget
from agentrt.model.tokenizer import IncrementalDecoder

from .deltas import Delta, OutputSplitter, message_of
from .protocol import (
    DEFAULT_THINKING_GRACE,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
    parse_body,
)

log = logging.getLogger("agentrt.server")
UNAUTHENTICATED = ("/health",)


@dataclass(slots=True)
class ServerConfig:
    """What the server admits.

    `max_active`: requests handed to the engine at once (default: twice its `max_running`);
    `max_waiting`: requests queued here beyond those, after which new ones get 429 with Retry-After;
    `max_body_bytes`: larger request bodies get 413; `default_max_tokens`: the output limit of a
    request that sets none (capped by what the KV pool can hold).
    """

    model_name: str = "tiny"
    api_key: str | None = None
    max_active: int | None = None
    max_waiting: int = 1024
    max_body_bytes: int = 8 << 20
    default_max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.max_active is not None and self.max_active < 1:
            raise ValueError(f"max_active={self.max_active} must be >= 1")
        if self.max_waiting < 0 or self.max_body_bytes < 1 or self.default_max_tokens < 1:
            raise ValueError(f"max_waiting={self.max_waiting} must be >= 0, max_body_bytes={self.max_body_bytes} "
                             f"and default_max_tokens={self.default_max_tokens} >= 1")


class Admission:
    """At most `active` requests in the engine; up to `waiting` more wait their turn; the rest get 429."""

    def __init__(self, active: int, waiting: int):
        self.limit, self.max_waiting = active, waiting
        self.active = self.waiting = 0
        self._free = asyncio.Semaphore(active)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.active >= self.limit and self.waiting >= self.max_waiting:
            raise ApiError(429, f"the server is at capacity ({self.active} requests running, {self.waiting} "
                           "waiting); retry after a moment or lower your concurrency",
                           code="server_overloaded", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._free.release()


@dataclass(slots=True)
class _Plan:
    """An engine request and what is needed to turn its tokens back into a response."""

    request: Request
    tools: list[dict] | None
    thinking_open: bool
    body: SamplingFields


class Server:
    """The HTTP API over one loaded model and its engine; `app()` builds the aiohttp application."""

    def __init__(self, lm: LoadedModel, engine: Engine, config: ServerConfig | None = None):
        self.lm, self.engine, self.config = lm, engine, config or ServerConfig()
        self.tokenizer, self.format = lm.tokenizer, lm.chat_format
        self.admission = Admission(self.config.max_active or 2 * engine.config.max_running, self.config.max_waiting)
        self.created = int(time.time())
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count, for /metrics
        self.disconnects = 0
        self._token_text: dict[int, str] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes,
                              middlewares=[self._errors, self._auth])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model_info)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        return app

    # -- middlewares -------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as e:
            response = _error_response(e)
        except web.HTTPRequestEntityTooLarge:
            response = _error_response(ApiError(
                413, f"the request body is larger than the server's limit of {self.config.max_body_bytes} bytes; "
                "send a smaller request (or start the server with a larger --max-body-mb)", code="body_too_large"))
        except web.HTTPException as e:  # unknown route, wrong method
            if e.status < 400:
                raise
            what = "no such endpoint" if e.status == 404 else e.reason
            response = _error_response(ApiError(e.status, f"{request.method} {request.path}: {what}; the API "
                                                "lives under /v1 (chat/completions, completions, models)"))
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        except Exception as e:  # a bug: say so, keep serving
            log.exception("unhandled error serving %s %s", request.method, request.path)
            response = _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
        key = (request.path if request.path in _ENDPOINTS else "other", response.status)
        self.requests[key] = self.requests.get(key, 0) + 1
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.config.api_key
        if key is not None and request.path not in UNAUTHENTICATED:
            given = request.headers.get("Authorization", "")
            token = given[7:] if given.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                problem = "no API key was given" if not given else "the API key is wrong"
                raise ApiError(401, f"{problem}; send the header 'Authorization: Bearer <key>' with the key the "
                               "server was started with (--api-key)", code="invalid_api_key")
        return await handler(request)

    # -- simple endpoints --------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.config.model_name})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "agentrt",
                "max_model_len": self.engine.kv.capacity}

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                           f"{self.config.model_name!r} (see GET /v1/models)", param="model", code="model_not_found")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.prometheus(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def prometheus(self) -> str:
        """Engine statistics and request counts in Prometheus' text exposition format."""
        s = self.engine.stats()
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value: float, labels: str = "") -> None:
            if not any(line.startswith(f"# HELP agentrt_{name} ") for line in lines):
                lines.extend([f"# HELP agentrt_{name} {help}", f"# TYPE agentrt_{name} {kind}"])
            lines.append(f"agentrt_{name}{labels} {value if isinstance(value, int) else repr(float(value))}")

        metric("tokens_per_second", "gauge", "tokens read by the model per second (prefill and decode)",
               s.tokens_per_s)
        metric("output_tokens_per_second", "gauge", "tokens generated per second", s.output_tokens_per_s)
        metric("batch_size", "gauge", "sequences in the last engine step", s.batch_size)
        metric("mean_batch_size", "gauge", "mean sequences per engine step", s.mean_batch_size)
        metric("queue_length", "gauge", "requests waiting in the engine's scheduler", s.queue_len)
        metric("running", "gauge", "requests the engine is running", s.running)
        metric("prefix_cache_hit_rate", "gauge", "cached prompt tokens / prompt tokens", s.prefix_hit_rate)
        metric("prompt_tokens_total", "counter", "prompt tokens of finished requests", s.prompt_tokens)
        metric("cached_prompt_tokens_total", "counter", "prompt tokens served from the prefix cache",
               s.cached_prompt_tokens)
        metric("output_tokens_total", "counter", "tokens generated", s.output_tokens)
        metric("tokens_fed_total", "counter", "tokens the model has read", s.tokens_fed)
        metric("kv_slots_used", "gauge", "KV-cache slots in use", s.kv_used)
        metric("kv_slots_total", "gauge", "KV-cache slots", s.kv_total)
        metric("state_slots_used", "gauge", "Mamba state slots in use", s.state_used)
        metric("state_slots_total", "gauge", "Mamba state slots", s.state_total)
        metric("preemptions_total", "counter", "requests preempted for memory", s.preemptions)
        metric("engine_steps_total", "counter", "engine steps", s.steps)
        metric("server_active_requests", "gauge", "requests admitted to the engine", self.admission.active)
        metric("server_waiting_requests", "gauge", "requests waiting for admission", self.admission.waiting)
        metric("client_disconnects_total", "counter", "requests whose client went away", self.disconnects)
        for (endpoint, status), count in sorted(self.requests.items()):
            metric("http_requests_total", "counter", "HTTP requests answered", count,
                   f'{{endpoint="{endpoint}",status="{status}"}}')
        return "\n".join(lines) + "\n"

    # -- chat completions --------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, raw = parse_body(await request.read(), ChatCompletionRequest)
        self._check_model(body.model)
        plan = self._plan_chat(body, raw.get("tools"))
        return await self._run(request, plan, _ChatOutput(self, plan, body))

    def _plan_chat(self, body: ChatCompletionRequest, tools: list[dict] | None) -> _Plan:
        # tools are rendered as the client wrote them (validated above): the same JSON gives the same prompt
        tools = tools or None
        choice = body.tool_choice or "auto"
        offered = tools if choice != "none" else None
        try:
            ids = self.format.render([m.for_template() for m in body.messages], offered,
                                     enable_thinking=body.enable_thinking)
        except ValueError as e:  # e.g. tool-call arguments that are not JSON
            raise ApiError(400, f"messages: {e}", param="messages") from None
        constraint = None
        if offered:
            if isinstance(choice, NamedToolChoice):
                named = [t for t in offered if t["function"]["name"] == choice.function.name]
                constraint = Constraint(tools=named, require_call=True, parallel_calls=False)
            else:
                constraint = Constraint(tools=offered, require_call=choice == "required",
                                        parallel_calls=body.parallel_tool_calls)
        elif body.response_format is not None and body.response_format.type != "text":
            fmt = body.response_format
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
            constraint = Constraint(json_schema=schema or {"type": "object"})
        thinking = None
        if body.max_thinking_tokens:
            grace = body.thinking_grace_tokens
            thinking = ThinkingBudget(body.max_thinking_tokens, DEFAULT_THINKING_GRACE if grace is None else grace)
        request = self._request(ids, body, body.output_limit, constraint, thinking, "messages")
        return _Plan(request, offered, self.engine.opens_thinking(ids), body)

    # -- text completions --------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, _ = parse_body(await request.read(), CompletionRequest)
        self._check_model(body.model)
        prompt = body.prompt
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        vocab = self.lm.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                           param="prompt")
        plan = _Plan(self._request(ids, body, body.max_tokens, None, None, "prompt"), None, False, body)
        return await self._run(request, plan, _TextOutput(self, plan, body))

    def _request(self, ids: list[int], body: SamplingFields, limit: int | None, constraint: Constraint | None,
                 thinking: ThinkingBudget | None, prompt_field: str) -> Request:
        room = self.engine.kv.capacity - len(ids)
        if room < 1:
            raise ApiError(400, f"{prompt_field}: the prompt is {len(ids)} tokens, more than the "
                           f"{self.engine.kv.capacity} the server's cache holds; shorten it", param=prompt_field,
                           code="context_length_exceeded")
        if limit is not None and limit > room:
            raise ApiError(400, f"max_tokens={limit} does not fit: the prompt is {len(ids)} tokens and the cache "
                           f"holds {self.engine.kv.capacity}; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, seed=body.seed,
                                  max_tokens=limit or min(self.config.default_max_tokens, room),
                                  stop=list(body.stop or []), ignore_eos=body.ignore_eos)
        return Request(prompt_ids=list(ids), sampling=sampling, constraint=constraint, thinking=thinking,
                       id=f"http-{uuid.uuid4().hex[:16]}")

    # -- running a request -------------------------------------------------------------------------
    async def _run(self, http: web.Request, plan: _Plan, output: _Output) -> web.StreamResponse:
        async with self.admission.slot():
            try:
                handle = self.engine.submit(plan.request)
            except ValueError as e:  # what the engine refuses to queue (the checks above should catch it first)
                raise ApiError(400, str(e)) from None
            finished = False
            try:
                if plan.body.stream:
                    response = await self._stream(http, handle, output)
                else:
                    async for event in handle:
                        output.token(event.token_id, event.logprob)
                    response = web.json_response(output.response(await handle.result()))
                finished = True
                return response
            finally:
                if not finished:  # the client went away (or the write failed): free what the request holds
                    handle.cancel()

    async def _stream(self, http: web.Request, handle: Any, output: _Output) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(http)
        await _send(response, output.opening())
        async for event in handle:
            chunk = output.token(event.token_id, event.logprob)
            if chunk is not None:
                await _send(response, chunk)
        result = await handle.result()
        for chunk in output.closing(result):
            await _send(response, chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text


_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


async def _send(response: web.StreamResponse, chunk: dict) -> None:
    await response.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _usage(result: Any) -> dict:
    c = result.counts
    return {"prompt_tokens": c.prompt, "completion_tokens": c.output, "total_tokens": c.prompt + c.output,
            "prompt_tokens_details": {"cached_tokens": c.cached_prompt},
            "completion_tokens_details": {"reasoning_tokens": c.thinking}}


class _Output(ABC):
    """Turns one request's tokens into response chunks (streamed) or one response body."""

    prefix = "cmpl"

    def __init__(self, server: Server, plan: _Plan, body: SamplingFields):
        self.server, self.plan, self.body = server, plan, body
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.decoder = IncrementalDecoder(server.tokenizer)
        self.eos = server.engine.eos
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.config.model_name,
                "choices": choices}

    def _text_of(self, token_id: int) -> str:
        # end-of-turn tokens end the reply; they are counted and logged, not shown
        if token_id in self.eos and not self.body.ignore_eos:
            return ""
        return self.decoder.push(token_id)

    def _error(self, result: Any) -> ApiError:
        return ApiError(500, f"the engine failed this request: {result.error}", code="engine_error")

    @abstractmethod
    def opening(self) -> dict:
        """The first streamed chunk."""

    @abstractmethod
    def token(self, token_id: int, logprob: float) -> dict | None:
        """Take one generated token; the chunk to stream for it, if any."""

    @abstractmethod
    def closing(self, result: Any) -> list[dict]:
        """The last streamed chunks (finish reason, usage), or an error event."""

    @abstractmethod
    def response(self, result: Any) -> dict:
        """The whole non-streamed response body."""


class _ChatOutput(_Output):
    prefix = "chatcmpl"

    def __init__(self, server: Server, plan: _Plan, body: ChatCompletionRequest):
        super().__init__(server, plan, body)
        self.splitter = OutputSplitter(server.format, plan.tools, plan.thinking_open)
        self.want_logprobs = body.logprobs

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: list[dict] | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        return self._envelope("chat.completion.chunk", [choice])

    def _logprob(self, token_id: int, logprob: float) -> dict:
        text = self.server.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}

    def opening(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def token(self, token_id: int, logprob: float) -> dict | None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        delta = self.splitter.push(self._text_of(token_id))
        lp = [self._logprob(token_id, logprob)] if self.want_logprobs else None
        if not delta and lp is None:
            return None
        return self._chunk(_wire_delta(delta), logprobs=lp)

    def _finish(self, result: Any) -> tuple[Delta, str]:
        if result.error:
            raise self._error(result)
        tail = self.splitter.push(self.decoder.flush())
        tail.extend(self.splitter.finish())
        reason = self.splitter.finish_reason_override or str(result.finish_reason)
        return tail, reason

    def closing(self, result: Any) -> list[dict]:
        try:
            tail, reason = self._finish(result)
        except ApiError as e:
            return [e.body()]
        chunks = [self._chunk(_wire_delta(tail))] if tail else []
        final = self._chunk({}, reason)
        if self.body.return_token_ids:
            final["choices"][0]["token_ids"] = self.token_ids
            final["prompt_token_ids"] = self.plan.request.prompt_ids
        chunks.append(final)
        if self.body.include_usage:
            chunks.append({**self._envelope("chat.completion.chunk", []), "usage": _usage(result)})
        return chunks

    def response(self, result: Any) -> dict:
        _, reason = self._finish(result)
        choice: dict[str, Any] = {"index": 0, "message": message_of(self.splitter.all), "finish_reason": reason,
                                  "logprobs": None}
        if self.want_logprobs:
            choice["logprobs"] = {"content": [self._logprob(t, lp) for t, lp in zip(self.token_ids, self.logprobs)]}
        out = {**self._envelope("chat.completion", [choice]), "usage": _usage(result)}
        if self.body.return_token_ids:
            choice["token_ids"] = self.token_ids
            out["prompt_token_ids"] = self.plan.request.prompt_ids
        return out


def _wire_delta(delta: Delta) -> dict:
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = delta.tool_calls
    return out


class _TextOutput(_Output):
    def _choice(self, text: str, finish: str | None, tokens: list[int], logprobs: list[float]) -> dict:
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if self.body.logprobs is not None:
            choice["logprobs"] = {"tokens": [self.server.token_text(t) for t in tokens], "token_logprobs": logprobs,
                                  "top_logprobs": None, "text_offset": None}
        return choice

    def opening(self) -> dict:
        return self._envelope("text_completion", [self._choice("", None, [], [])])

    def token(self, token_id: int, logprob: float) -> dict | None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        text = self._text_of(token_id)
        if not text and self.body.logprobs is None:
            return None
        return self._envelope("text_completion", [self._choice(text, None, [token_id], [logprob])])

    def closing(self, result: Any) -> list[dict]:
        if result.error:
            return [self._error(result).body()]
        final = self._envelope("text_completion", [self._choice(self.decoder.flush(), str(result.finish_reason),
                                                                [], [])])
        chunks = [final]
        if self.body.include_usage:
            chunks.append({**self._envelope("text_completion", []), "usage": _usage(result)})
        return chunks

    def response(self, result: Any) -> dict:
        if result.error:
            raise self._error(result)
        text = self.server.tokenizer.decode([t for t in self.token_ids if t not in self.eos or self.body.ignore_eos])
        choice = self._choice(text, str(result.finish_reason), self.token_ids, self.logprobs)
        out = {**self._envelope("text_completion", [choice]), "usage": _usage(result)}
        if self.body.return_token_ids:
            choice["token_ids"] = self.token_ids
            out["prompt_token_ids"] = self.plan.request.prompt_ids
        return out
