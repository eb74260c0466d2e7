"""RemoteEngine against a real, scripted OpenAI-compatible server on 127.0.0.1 (aiohttp.web)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from agentrt.llm import ChatModel, ChatOptions, Usage
from agentrt.remote import RemoteEngine, RemoteEngineError

Step = Callable[[web.Request], Awaitable[web.StreamResponse]]
USER = [{"role": "user", "content": "What is 2 + 3?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "number"}, "b": {"type": "number"}}}}}]


# --- the scripted endpoint -------------------------------------------------------------------

@dataclass
class Endpoint:
    """Answers request n with steps[n] (the last step repeats) and records what it received."""

    steps: list[Step]
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        step = self.steps[min(len(self.bodies), len(self.steps)) - 1]
        try:
            return await step(request)
        except asyncio.CancelledError:  # the client went away (handler_cancellation=True)
            self.disconnected.set()
            raise


@asynccontextmanager
async def serve(*steps: Step) -> AsyncIterator[Endpoint]:
    endpoint = Endpoint(list(steps))
    app = web.Application()
    app.router.add_post("/v1/chat/completions", endpoint.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    endpoint.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield endpoint
    finally:
        await runner.cleanup()


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    """One `chat.completion.chunk`; no delta and no finish: a choices-less (usage) chunk."""
    event: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": []}
    if delta is not None or finish is not None:
        event["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage is not None:
        event["usage"] = usage
    return event


def encode(events: tuple[dict | str, ...], newline: bytes) -> bytes:
    out = b": keep-alive comment" + newline + newline
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        out += b"data: " + data.encode() + newline + newline
    return out


def sse(*events: dict | str, newline: bytes = b"\n", piece: int = 11, stall: float = 0.0) -> Step:
    """Stream `events` in `piece`-byte writes (splitting lines, JSON and UTF-8 characters), then
    optionally stall."""
    async def step(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        raw = encode(events, newline)
        for start in range(0, len(raw), piece):
            await resp.write(raw[start:start + piece])
            await asyncio.sleep(0.0002)  # let the client read each piece on its own
        await asyncio.sleep(stall)
        return resp
    return step


def answer(payload: dict, status: int = 200, headers: dict[str, str] | None = None, delay: float = 0.0) -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.json_response(payload, status=status, headers=headers)
    return step


def done(content: str) -> tuple[dict | str, ...]:
    return chunk({"role": "assistant", "content": ""}), chunk({"content": content}), chunk({}, "stop"), "[DONE]"


async def ask(url: str, messages: list[dict] = USER, tools: list[dict] | None = None,
              options: ChatOptions | None = None, **engine: Any):
    async with RemoteEngine(url, "tiny", backoff=0.01, **engine) as model:
        return await model.chat(messages, tools, options or ChatOptions())


# --- replies ---------------------------------------------------------------------------------

def test_streamed_content_survives_split_events_comments_and_crlf():
    text = "Hello → wörld ✓ " * 8  # multi-byte characters land across write boundaries

    async def main():
        async with serve(sse(*done(text), newline=b"\r\n", piece=5)) as ep:
            async with RemoteEngine(ep.url + "/", "tiny") as model:
                assert isinstance(model, ChatModel) and model.name == f"remote:tiny@{ep.url[7:-3]}"
                return await model.chat(USER, None, ChatOptions())

    reply = asyncio.run(main())
    assert reply.content == text and reply.reasoning is None and reply.finish_reason == "stop"
    assert not reply.tool_calls and not reply.errors and reply.seconds > 0


def test_reasoning_then_content():
    events = (chunk({"role": "assistant", "reasoning_content": "2 plus 3 "}), chunk({"reasoning": "is 5."}),
              chunk({"content": "5"}), chunk({}, "stop"), "[DONE]")

    async def main():
        async with serve(sse(*events)) as ep:
            return await ask(ep.url)

    reply = asyncio.run(main())
    assert (reply.reasoning, reply.content) == ("2 plus 3 is 5.", "5")
    assert reply.to_message() == {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."}


def test_parallel_tool_calls_arrive_in_fragments():
    def call(index: int, arguments: str, **head: str) -> dict:
        fn = {"arguments": arguments} | ({"name": head["name"]} if "name" in head else {})
        return {"index": index, **({"id": head["id"], "type": "function"} if "id" in head else {}), "function": fn}

    events = (chunk({"role": "assistant", "tool_calls": [call(0, "", id="call_a", name="add")]}),
              chunk({"tool_calls": [call(0, '{"a": ')]}),
              chunk({"tool_calls": [call(1, '{"a"', id="call_b", name="add")]}),
              chunk({"tool_calls": [call(0, '2, "b": 3}'), call(1, ': 10, "b": ')]}),
              chunk({"tool_calls": [call(1, "-4.5}")]}), chunk({}, "tool_calls"), "[DONE]")

    async def main():
        async with serve(sse(*events)) as ep:
            return await ask(ep.url, tools=TOOLS)

    reply = asyncio.run(main())
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [
        ("call_a", "add", {"a": 2, "b": 3}), ("call_b", "add", {"a": 10, "b": -4.5})]
    assert reply.errors == [] and reply.finish_reason == "tool_calls" and reply.content == ""


def test_malformed_tool_arguments_become_errors_for_the_model():
    events = (chunk({"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "add", "arguments": '{"a": 1'}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "c1", "function": {"name": "add", "arguments": "[1, 2]"}}]}),
              chunk({"tool_calls": [{"index": 2, "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}),
              chunk({}, "tool_calls"), "[DONE]")

    async def main():
        async with serve(sse(*events)) as ep:
            return await ask(ep.url, tools=TOOLS)

    reply = asyncio.run(main())
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [("call_2", "add", {"a": 1, "b": 2})]
    assert [(e.id, e.name) for e in reply.errors] == [("c0", "add"), ("c1", "add")]
    bad_json, not_object = (e.arguments for e in reply.errors)
    assert "tool call c0 (add)" in bad_json and "must be a JSON object" in bad_json and "not valid JSON" in bad_json
    assert "'{\"a\": 1'" in bad_json and "Expecting" in bad_json  # the raw text and the JSON error
    assert "tool call c1 (add)" in not_object and "got list" in not_object
    # the failed calls still go back into the conversation, so their error results have a call to answer
    assert [c["id"] for c in reply.to_message()["tool_calls"]] == ["call_2", "c0", "c1"]


def test_usage_maps_cached_and_reasoning_tokens():
    usage = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
             "prompt_tokens_details": {"cached_tokens": 96}, "completion_tokens_details": {"reasoning_tokens": 7}}
    events = (*done("ok")[:-1], chunk(usage=usage), "[DONE]")

    async def main():
        async with serve(sse(*events)) as ep:
            return await ask(ep.url)

    reply = asyncio.run(main())
    assert reply.usage == Usage(prompt_tokens=120, cached_tokens=96, thinking_tokens=7, output_tokens=30)


def test_non_streaming_reply():
    message = {"role": "assistant", "content": "Let me add.", "reasoning_content": "use the tool",
               "tool_calls": [{"id": "x1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]}
    payload = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": None}}

    async def main():
        async with serve(answer(payload)) as ep:
            return await ask(ep.url, tools=TOOLS, stream=False), ep.bodies[0]

    reply, body = asyncio.run(main())
    assert (reply.content, reply.reasoning, reply.finish_reason) == ("Let me add.", "use the tool", "tool_calls")
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [("x1", "add", {"a": 2})]
    assert reply.usage == Usage(prompt_tokens=9, output_tokens=4)
    assert body["stream"] is False and "stream_options" not in body


# --- requests --------------------------------------------------------------------------------

def test_request_body_and_headers(monkeypatch):
    history = [*USER, {"role": "assistant", "content": "", "reasoning_content": "hm", "tool_calls": [
        {"id": "c9", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "3"}]
    snapshot = json.dumps(history)
    strict = ChatOptions(temperature=0.7, top_p=0.9, max_tokens=64, seed=7, stop=["</s>"], think_tokens=128,
                         require_call=True)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")

    async def main():
        async with serve(sse(*done("ok"))) as ep:
            await ask(ep.url, history, TOOLS, strict, api_key="sk-test", headers={"X-Team": "agents"})
            await ask(ep.url, USER, TOOLS, ChatOptions())
            await ask(ep.url, USER, [], ChatOptions(think_tokens=0))
            return ep.bodies, ep.headers

    (first, second, third), headers = asyncio.run(main())
    assert json.dumps(history) == snapshot  # the caller's messages are left alone
    assert first["model"] == "tiny" and first["tools"] == TOOLS and first["tool_choice"] == "required"
    assert {k: first[k] for k in ("temperature", "top_p", "max_tokens", "seed", "stop", "max_thinking_tokens")} == {
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 7, "stop": ["</s>"], "max_thinking_tokens": 128}
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    sent_call = first["messages"][1]["tool_calls"][0]
    assert sent_call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert first["messages"][1]["reasoning_content"] == "hm" and first["messages"][2] == history[2]
    assert headers[0]["Authorization"] == "Bearer sk-test" and headers[0]["X-Team"] == "agents"
    assert headers[1]["Authorization"] == "Bearer from-env"
    assert second["tool_choice"] == "auto" and not {"seed", "stop", "max_thinking_tokens"} & second.keys()
    assert not {"tools", "tool_choice"} & third.keys() and third["max_thinking_tokens"] == 0


def test_reply_round_trips_into_the_next_request():
    call = {"index": 0, "id": "call_7", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    first = sse(chunk({"reasoning_content": "add them"}), chunk({"tool_calls": [call]}), chunk({}, "tool_calls"),
                "[DONE]")

    async def main():
        async with serve(first, sse(*done("2 + 3 = 5"))) as ep, RemoteEngine(ep.url, "tiny") as model:
            messages = list(USER)
            reply = await model.chat(messages, TOOLS, ChatOptions())
            messages.append(reply.to_message())
            for c in reply.tool_calls:
                result = c.arguments["a"] + c.arguments["b"]
                messages.append({"role": "tool", "tool_call_id": c.id, "content": str(result)})
            final = await model.chat(messages, TOOLS, ChatOptions())
            return final, ep.bodies[1]["messages"]

    final, sent = asyncio.run(main())
    assert final.content == "2 + 3 = 5"
    assert sent[1] == {"role": "assistant", "content": "", "reasoning_content": "add them", "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_7", "content": "5"}


# --- failures --------------------------------------------------------------------------------

def test_503_is_retried_honouring_retry_after():
    busy = {"error": {"message": "overloaded"}}

    async def main():
        async with serve(answer(busy, 503), answer(busy, 503, {"Retry-After": "0"}), sse(*done("finally"))) as ep:
            return await ask(ep.url), len(ep.bodies)

    reply, requests = asyncio.run(main())
    assert reply.content == "finally" and requests == 3


def test_persistent_503_names_url_status_and_body():
    async def main():
        async with serve(answer({"error": {"message": "GPU on fire"}}, 503)) as ep:
            with pytest.raises(RemoteEngineError) as info:
                await ask(ep.url, max_retries=2)
            return info.value, ep

    error, ep = asyncio.run(main())
    assert error.status == 503 and len(ep.bodies) == 3
    assert ep.url in str(error) and "HTTP 503" in str(error) and "GPU on fire" in str(error)
    assert "3 attempts" in str(error) and "max_retries" in str(error)


def test_400_fails_at_once_with_the_server_message():
    async def main():
        async with serve(answer({"error": {"message": "max_tokens is too large: 99999"}}, 400)) as ep:
            with pytest.raises(RemoteEngineError) as info:
                await ask(ep.url)
            return info.value, len(ep.bodies)

    error, requests = asyncio.run(main())
    assert requests == 1 and error.status == 400
    assert "HTTP 400" in str(error) and "max_tokens is too large: 99999" in str(error)


def test_unreachable_server_fails_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    start = time.perf_counter()
    with pytest.raises(RemoteEngineError) as info:
        asyncio.run(ask(url, max_retries=1))
    assert time.perf_counter() - start < 2
    assert info.value.status is None and "2 attempts" in str(info.value) and url in str(info.value)
    assert "base_url" in str(info.value)


def test_stream_ending_early_raises_without_retry():
    async def main():
        async with serve(sse(chunk({"content": "half an ans"}))) as ep:
            with pytest.raises(RemoteEngineError, match="stream ended early") as info:
                await ask(ep.url)
            return info.value, len(ep.bodies)

    error, requests = asyncio.run(main())
    assert requests == 1 and "partial output" in str(error)


def test_empty_stream_is_retried():
    async def main():
        async with serve(sse(), sse(*done("second try"))) as ep:
            return await ask(ep.url), len(ep.bodies)

    reply, requests = asyncio.run(main())
    assert reply.content == "second try" and requests == 2


def test_error_event_mid_stream_raises():
    async def main():
        async with serve(sse(chunk({"content": "x"}), {"error": {"message": "KV cache exhausted"}})) as ep:
            with pytest.raises(RemoteEngineError, match="KV cache exhausted"):
                await ask(ep.url)

    asyncio.run(main())


@pytest.mark.parametrize("streaming", [True, False])
def test_cancellation_is_prompt_and_closes_the_connection(streaming):
    stall = sse(chunk({"content": "thinking..."}), stall=30) if streaming else answer({}, delay=30)

    async def main():
        async with serve(stall) as ep, RemoteEngine(ep.url, "tiny", stream=streaming) as model:
            task = asyncio.create_task(model.chat(USER, None, ChatOptions()))
            await asyncio.sleep(0.2)
            start = time.perf_counter()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            elapsed = time.perf_counter() - start
            await asyncio.wait_for(ep.disconnected.wait(), 1.0)  # the server saw the client go away
            return elapsed

    assert asyncio.run(main()) < 1.0


def test_constructor_checks_and_backoff_cap():
    with pytest.raises(ValueError, match="'localhost:8000/v1'.*http"):
        RemoteEngine("localhost:8000/v1", "m")
    with pytest.raises(ValueError, match="max_retries=-1"):
        RemoteEngine("http://h/v1", "m", max_retries=-1)
    model = RemoteEngine("https://api.example.com/v1/", "m", backoff=0.5)
    assert model.url == "https://api.example.com/v1/chat/completions" and model.name == "remote:m@api.example.com"
    assert [model._delay(n, None) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert model._delay(0, 3.0) == 3.0 and model._delay(0, 60.0) == 10.0


# --- the runtime over a remote model ---------------------------------------------------------

def test_an_agent_runs_unchanged_over_a_remote_engine():
    from agentrt import Agent, Budget, Runtime, tool

    @tool
    def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b

    call = chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                       "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]})

    async def main():
        async with serve(sse(call, chunk({}, "tool_calls"), "[DONE]"), sse(*done("It is 5."))) as endpoint:
            model = RemoteEngine(endpoint.url, "tiny", backoff=0.01)
            async with Runtime(model=model) as rt:
                [result] = await rt.run([(Agent(name="calc", tools=[add], budget=Budget(think_tokens=64)), "2 + 3?")])
            await model.close()
            return result, endpoint.bodies

    result, bodies = asyncio.run(main())
    assert result.status == "done" and result.output == "It is 5."
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.messages[2] == {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "5.0"}
    assert bodies[0]["tools"][0]["function"]["name"] == "add" and bodies[0]["max_thinking_tokens"] > 0
    assert bodies[1]["messages"][-1]["content"] == "5.0"  # the tool result went back to the server
