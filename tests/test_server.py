"""`agentrt serve` through the real `openai` client, over loopback, against the embedded model."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import jsonschema
import openai
import pytest

from agentrt.model import Request, SamplingParams
from agentrt.server import Admission, ServerThread

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["a", "b"], "additionalProperties": False}}}
CITY = {"type": "function", "function": {
    "name": "weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]}},
                   "required": ["city"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server():
    with ServerThread("tiny") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as c:
        yield c


def http(server, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None):
    """One raw request (status, parsed JSON or text, headers), for what the openai client will not send."""

    async def go():
        async with aiohttp.ClientSession() as session:
            url = server.url.removesuffix("/v1") + path
            async with session.request(method, url, data=body, headers=headers or {}) as resp:
                text = await resp.text()
                try:
                    return resp.status, json.loads(text), resp.headers
                except json.JSONDecodeError:
                    return resp.status, text, resp.headers

    return asyncio.run(go())


def idle(server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.server.engine.load and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.server.engine.load == 0, "the engine still holds requests"


def stream_message(stream) -> tuple[dict, list]:
    """Join streamed deltas into one message; also return the raw chunks."""
    content, reasoning, calls, chunks, finish = [], [], {}, [], None
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            d = choice.delta
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            for call in d.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"content": "".join(content), "reasoning": "".join(reasoning), "calls": [calls[i] for i in sorted(calls)],
            "finish": finish}, chunks


# --- the API through the openai client --------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "agentrt"
    status, body, _ = http(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_sync_chat_with_usage_and_logprobs_matching_the_engine(server, client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0, logprobs=True,
                                       extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(choice.logprobs.content) == len(choice.model_extra["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens <= r.usage.completion_tokens
    # the same prompt ids run directly on the engine give the same tokens and logprobs
    prompt_ids = r.model_extra["prompt_token_ids"]
    assert prompt_ids == server.server.format.render(USER)

    async def direct():
        handle = server.server.engine.submit(Request(prompt_ids, SamplingParams(temperature=0, max_tokens=24)))
        return await handle.result()

    result = server.call(direct())
    assert choice.model_extra["token_ids"] == result.token_ids
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(result.logprobs, abs=1e-5)
    assert all(e.logprob <= 0 for e in choice.logprobs.content)


def test_async_clients_in_parallel_get_what_one_client_gets(server, client):
    alone = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0.8, seed=7)

    async def many():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0) as ac:
            return await asyncio.gather(*(
                ac.chat.completions.create(model="tiny", messages=USER, max_tokens=16, temperature=0.8, seed=7)
                for _ in range(8)))

    replies = asyncio.run(many())
    want = (alone.choices[0].message.content, alone.choices[0].message.model_extra.get("reasoning_content"))
    assert all((r.choices[0].message.content, r.choices[0].message.model_extra.get("reasoning_content")) == want
               for r in replies)
    # the shared prompt was prefilled once: later requests read it from the cache
    assert max(r.usage.prompt_tokens_details.cached_tokens for r in replies) > 0


@pytest.mark.parametrize("tools", [None, [ADD, CITY]])
def test_streaming_adds_up_to_the_non_streamed_reply(server, client, tools):
    kwargs = dict(model="tiny", messages=USER, max_tokens=48, temperature=0, tools=tools,
                  extra_body={"max_thinking_tokens": 8})
    whole = client.chat.completions.create(**kwargs)
    streamed, chunks = stream_message(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    msg = whole.choices[0].message
    assert streamed["content"] == (msg.content or "")
    assert streamed["reasoning"] == (msg.model_extra.get("reasoning_content") or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == [
        (c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls or []]
    assert streamed["finish"] == whole.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == whole.usage.completion_tokens


def test_tool_call_round_trip(server, client):
    messages = [{"role": "user", "content": "Add 2 and 3 with the tool."}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[ADD, CITY], tool_choice="required",
                                       max_tokens=200, temperature=0, extra_body={"max_thinking_tokens": 4})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:  # each call is a tool offered, with arguments that follow its schema
        schema = {"add": ADD, "weather": CITY}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        assert call.id.startswith("call_")
    # the client runs the tools and sends the results back
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    for call in calls:
        args = json.loads(call.function.arguments)
        result = args["a"] + args["b"] if call.function.name == "add" else "sunny"
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(model="tiny", messages=messages, tools=[ADD, CITY], tool_choice="none",
                                           max_tokens=16, temperature=0,
                                           extra_body={"max_thinking_tokens": 0, "return_token_ids": True})
    assert final.choices[0].message.tool_calls is None
    prompt = server.server.tokenizer.decode(final.model_extra["prompt_token_ids"])
    for call, result in zip(calls, messages[-len(calls):]):  # the model read its calls and their results
        assert call.function.name in prompt and result["content"] in prompt


def test_named_tool_choice_calls_exactly_that_tool(client):
    choice = {"type": "function", "function": {"name": "weather"}}
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[ADD, CITY], tool_choice=choice,
                                       max_tokens=200, temperature=0, extra_body={"max_thinking_tokens": 0})
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["weather"]
    assert json.loads(calls[0].function.arguments)["city"] in ("Oslo", "Lima")


def test_json_schema_responses_validate(client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "unit": {"type": "string", "enum": ["apples", "pears"]}},
              "required": ["answer", "unit"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=100, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            extra_body={"max_thinking_tokens": 0})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_thinking_budget_is_respected(client):
    for budget, grace in [(0, 0), (3, 0), (6, 2)]:
        r = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=40, temperature=1.0, seed=budget,
            extra_body={"max_thinking_tokens": budget, "thinking_grace_tokens": grace})
        reasoning_tokens = r.usage.completion_tokens_details.reasoning_tokens
        assert reasoning_tokens <= budget + grace
        if budget == 0:
            assert reasoning_tokens == 0 and not r.choices[0].message.model_extra.get("reasoning_content")


def test_text_completions_sync_and_streamed(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                      logprobs=0)
    assert whole.usage.completion_tokens == len(whole.choices[0].logprobs.token_logprobs)
    parts = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].text


def test_a_shared_system_prompt_is_served_from_the_cache(client):
    # The hybrid model's cache resumes Mamba state only where a snapshot was taken: the second
    # request, diverging after the system prompt, leaves one there for every later request.
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    replies = [client.chat.completions.create(model="tiny", messages=[system, {"role": "user", "content": q}],
                                              max_tokens=4, temperature=0)
               for q in ("What is 2 + 3?", "Name a colour.", "Count to three.")]
    system_tokens = replies[0].usage.prompt_tokens - 20
    assert replies[2].usage.prompt_tokens_details.cached_tokens >= system_tokens


def test_metrics_in_prometheus_format(server, client):
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0)
    status, text, headers = http(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    stats = server.server.engine.stats()
    assert samples["agentrt_output_tokens_total"] == stats.output_tokens > 0
    assert samples["agentrt_kv_slots_total"] == stats.kv_total
    assert 0 <= samples["agentrt_prefix_cache_hit_rate"] <= 1
    assert samples['agentrt_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert "# TYPE agentrt_output_tokens_total counter" in text


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param,words", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON list"),
    (json.dumps({"model": "tiny"}).encode(), "messages", "required"),
    (json.dumps({"model": "tiny", "messages": USER, "temperature": 5}).encode(), "temperature", "less than"),
    (json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}).encode(), "messages.0.role",
     "robot"),
    (json.dumps({"model": "tiny", "messages": USER, "max_tokens": 0}).encode(), "max_tokens", "greater than"),
    (json.dumps({"model": "tiny", "messages": USER, "tool_choice": "required"}).encode(), None, "needs tools"),
    (json.dumps({"model": "tiny", "messages": USER, "n": 3}).encode(), "n", "one choice"),
    (json.dumps({"model": "tiny", "messages": USER, "max_tokens": 10**9}).encode(), "max_tokens", "does not fit"),
    (json.dumps({"model": "tiny", "messages": USER, "tools": [ADD],
                 "tool_choice": {"type": "function", "function": {"name": "nope"}}}).encode(), None, "'nope'"),
    (json.dumps({"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integr"}}}}}]}).encode(),
     "tools.0.function.parameters", "not a valid JSON Schema at properties/a/type"),
    (json.dumps({"model": "tiny", "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": "a"}}}}).encode(),
     "response_format.json_schema.schema", "not a valid JSON Schema at required"),
])
def test_bad_requests_get_400_naming_the_field(server, body, param, words):
    status, reply, _ = http(server, "POST", "/v1/chat/completions", body=body,
                            headers={"Content-Type": "application/json"})
    assert status == 400
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


def test_openai_client_sees_bad_request_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=USER, top_p=0)
    assert bad.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert missing.value.body["code"] == "model_not_found" and "'tiny'" in missing.value.body["message"]


def test_no_endpoint_reads_files_the_client_names(server, client):
    for name in ("../../../../etc/passwd", "/etc/passwd"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=USER)
    status, body, _ = http(server, "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd")
    assert status == 404 and "root:" not in json.dumps(body)
    status, body, _ = http(server, "GET", "/static/../../etc/passwd")
    assert status == 404 and body["error"]["message"].startswith("GET ")


def test_oversize_body_gets_413(server):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (9 << 20)}]}).encode()
    status, reply, _ = http(server, "POST", "/v1/chat/completions", body=body,
                            headers={"Content-Type": "application/json"})
    assert status == 413 and "limit" in reply["error"]["message"]


def test_overload_gets_429_with_retry_after(server):
    saved = server.server.admission
    server.server.admission = Admission(1, 0)  # one request in the engine, none waiting

    async def two():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0) as ac:
            first = asyncio.ensure_future(ac.chat.completions.create(
                model="tiny", messages=USER, max_tokens=300, temperature=0, extra_body={"ignore_eos": True}))
            while server.server.admission.active == 0:  # the first one is running
                await asyncio.sleep(0.005)
            with pytest.raises(openai.RateLimitError) as refused:
                await ac.chat.completions.create(model="tiny", messages=USER, max_tokens=4)
            return await first, refused.value

    try:
        first, refused = asyncio.run(two())
    finally:
        server.server.admission = saved
    assert first.usage.completion_tokens == 300
    assert refused.status_code == 429 and refused.response.headers["Retry-After"] == "1"
    assert "capacity" in refused.body["message"]


def test_api_key_is_required_when_set(server):
    server.server.config.api_key = "s3cret"
    try:
        with openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as denied:
                wrong.models.list()
        assert "wrong" in denied.value.body["message"]
        status, body, _ = http(server, "POST", "/v1/chat/completions", body=b"{}")
        assert status == 401 and "no API key" in body["error"]["message"]
        assert http(server, "GET", "/metrics")[0] == 401
        assert http(server, "GET", "/health")[0] == 200  # liveness stays open
        with openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0) as right:
            assert right.models.list().data[0].id == "tiny"
    finally:
        server.server.config.api_key = None


def test_a_client_that_disconnects_mid_stream_frees_its_request(server):
    idle(server)
    engine = server.server.engine
    before = (engine.kv.num_used, engine.states.num_used)
    disconnects, produced = server.server.disconnects, engine.stats().output_tokens
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 500, "temperature": 0, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "a prompt no other test sends " * 5}]}).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.split(":")[2].split("/")[0]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data: ") < 5:  # a few tokens streamed: the request holds cache now
            received += sock.recv(65536)
        assert engine.kv.num_used > before[0]
    deadline = time.monotonic() + 20
    while (engine.load or server.server.disconnects == disconnects) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load == 0 and server.server.disconnects == disconnects + 1
    assert (engine.kv.num_used, engine.states.num_used) == before
    assert engine.stats().output_tokens - produced < 500  # cancelled, not run to max_tokens
