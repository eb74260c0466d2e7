"""The trajectory store: a runtime run recorded and read back, exact token arrays, content-addressed
blobs, forks as branches, schema versions, interrupted runs, flush, concurrent readers, the bench.

Every test runs on a temporary SQLite file and, when AGENTRT_TEST_POSTGRES_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import struct
import subprocess
import sys
import time
from array import array

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select, update

from agentrt import Agent, AgentResult, Budget, ChatReply, Runtime, ScriptedModel, tool
from agentrt.budget import Spent
from agentrt.cli import cli
from agentrt.llm import ChatOptions, ToolCallRequest, Usage
from agentrt.store import SCHEMA_VERSION, Store, StoreError, StoreReader, StoreVersionError
from agentrt.store.schema import blobs, meta, metadata
from agentrt.store.writer import WRITER_ENV
from agentrt.tools import ToolError

PG_URL = os.environ.get("AGENTRT_TEST_POSTGRES_URL")
PG_SKIP = ("PostgreSQL is not configured: set AGENTRT_TEST_POSTGRES_URL (e.g. "
           "postgresql+psycopg://agentrt@127.0.0.1:5433/agentrt_test); `eval \"$(.ci/pg-setup.sh)\"` starts one")


@pytest.fixture(params=["sqlite", "sqlite+process-writer", "postgresql", "postgresql+process-writer"])
def url(request, tmp_path, monkeypatch):
    """The database of one test; `+process-writer`: stores the test opens write from a child process."""
    if request.param.endswith("+process-writer"):
        monkeypatch.setenv(WRITER_ENV, "process")
    if request.param.startswith("sqlite"):
        yield str(tmp_path / "store.db")
        return
    if not PG_URL:
        pytest.skip(PG_SKIP)
    engine = create_engine(PG_URL)
    metadata.drop_all(engine)  # every test starts from an empty database
    engine.dispose()
    yield PG_URL


def bits(values: list[float]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def fp32(values: list[float]) -> list[float]:
    return array("f", values).tolist()


# -- a runtime run, recorded and read back -------------------------------------------------------------
@tool
def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


@tool
async def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: The dividend.
        b: The divisor.
    """
    await asyncio.sleep(0.001)
    if b == 0:
        raise ToolError("b must not be 0")
    return a / b


class Script:
    """A scripted model whose replies carry token ids and logprobs; it keeps every reply per task."""

    def __init__(self) -> None:
        self.replies: dict[str, list[ChatReply]] = {}
        self.rng = random.Random(7)

    def __call__(self, messages: list[dict], tools: list[dict] | None) -> ChatReply:
        task = messages[1]["content"] if len(messages) > 1 else messages[0]["content"]
        done = sum(1 for m in messages if m["role"] == "tool")
        if task.startswith("calc") and done == 0:
            calls = [ToolCallRequest("c1", "add", {"a": 2, "b": 3}), ToolCallRequest("c2", "divide", {"a": 1, "b": 0})]
        elif task.startswith("bad") and done == 0:
            calls = [ToolCallRequest("c1", "add", {"a": "two"})]
        elif task.startswith("greedy"):
            calls = [ToolCallRequest(f"g{done}", "add", {"a": done, "b": 1})]
        else:
            calls = []
        n = self.rng.randint(1, 40)
        reply = ChatReply(
            content="" if calls else f"answer after {done} results", tool_calls=calls,
            finish_reason="tool_calls" if calls else "stop",
            usage=Usage(prompt_tokens=10 * len(messages), cached_tokens=len(messages), output_tokens=n),
            prompt_ids=[self.rng.randrange(2 ** 31 - 1) for _ in range(10 * len(messages))],
            token_ids=[self.rng.randrange(256_000) for _ in range(n)],
            logprobs=fp32([-self.rng.expovariate(1.0) for _ in range(n - 2)] + [-0.0, 1.401298464324817e-45]),
            seconds=0.001 * n)
        self.replies.setdefault(task, []).append(reply)
        return reply


async def failing_policy(ctx):
    await ctx.chat()
    raise ValueError("the policy broke on purpose")


async def rewarding_policy(ctx):
    reply = await ctx.chat()
    ctx.reward(1.0, info={"why": "answered", "score": 0.5})
    ctx.reward(0.25, name="format")
    return reply.content


def run_agents(url: str, items: list, **store_args) -> tuple[Store, list[AgentResult], Script]:
    script = Script()

    async def main() -> list[AgentResult]:
        async with Runtime(model=ScriptedModel(script), recorder=store) as rt:
            results = await rt.run(items, run_id="run-1")
        await store.aflush()
        return results

    store = Store(url, **store_args)
    return store, asyncio.run(main()), script


def test_a_runtime_run_is_recorded_and_read_back(url):
    calc = Agent(name="calc", instructions="Use the tools.", tools=[add, divide])
    greedy = Agent(name="greedy", instructions="Call tools forever.", tools=[add], budget=Budget(tool_calls=2))
    items = [(calc, "calc 2 + 3 and 1 / 0"), (calc, "bad arguments"), (greedy, "greedy task"),
             (Agent(name="failing", policy=failing_policy), "fail please"),
             (Agent(name="rewarding", instructions="Answer.", policy=rewarding_policy), "reward me"),
             (Agent(name="unknown-tool", tools=["nope"]), "cannot start")]
    store, results, script = run_agents(url, items, batch_size=7)  # small batches: links cross batch borders
    with store:
        by_agent = {r.agent: r for r in results[2:]}
        by_agent["calc"] = results[0]
        assert [r.status for r in results] == ["done", "done", "budget", "failed", "done", "failed"]

        [run] = store.runs()
        assert (run.id, run.status, run.meta["agents"], run.summary["agents"]) == ("run-1", "finished", 6, 6)
        assert run.summary["by_status"] == {"done": 3, "budget": 1, "failed": 2}
        assert store.run("run-1") == run

        for r in results:
            t = store.trajectory(r.trajectory_id)
            assert (t.run_id, t.agent, t.task, t.status, t.reason) == ("run-1", r.agent, r.task, r.status, r.reason)
            assert t.spent == r.spent.as_dict() and t.reward == r.reward
            assert t.finished >= t.started
            assert [n.message for n in store.messages(r.trajectory_id)] == r.messages
            kinds = [e.kind for e in store.events(r.trajectory_id)]
            assert kinds[0] == "trajectory_started" and kinds[-1] == "trajectory_finished", kinds
        assert {t.id for t in store.trajectories("run-1")} == {r.trajectory_id for r in results}
        assert store.trajectory(by_agent["failing"].trajectory_id).error.rstrip().endswith(
            "ValueError: the policy broke on purpose")
        assert by_agent["greedy"].reason == "budget:tool_calls"
        [budget] = [e for e in store.events(by_agent["greedy"].trajectory_id) if e.kind == "budget"]
        assert budget.data["reason"] == "budget:tool_calls" and budget.run_id == "run-1"

        # model calls: the engine's arrays exactly, each linked to the assistant message it produced
        for r in results:
            calls = store.model_calls(r.trajectory_id)
            assert len(calls) == r.spent.turns
            replies = script.replies.get(r.task, [])
            assert len(calls) == len(replies)
            nodes = {n.id: n for n in store.messages(r.trajectory_id)}
            for call, reply in zip(calls, replies):
                assert call.token_ids == reply.token_ids and call.prompt_ids == reply.prompt_ids
                assert bits(call.logprobs) == bits(reply.logprobs)
                assert (call.finish_reason, call.output_tokens, call.cached_tokens) == (
                    reply.finish_reason, reply.usage.output_tokens, reply.usage.cached_tokens)
                assert nodes[call.node_id].message == reply.to_message() == call.reply
                assert call.options["session"] == r.trajectory_id and call.meta["turn"] >= 1

        # tool calls: arguments, results and errors, each linked to its result message
        calc_calls = store.tool_calls(by_agent["calc"].trajectory_id)
        assert [(c.name, c.arguments, c.ok, c.error) for c in calc_calls] == [
            ("add", {"a": 2, "b": 3}, True, None), ("divide", {"a": 1, "b": 0}, False, "tool_error")]
        assert calc_calls[0].content == "5.0" and "b must not be 0" in calc_calls[1].content
        nodes = {n.id: n for n in store.messages(by_agent["calc"].trajectory_id)}
        for c in calc_calls:
            assert nodes[c.node_id].message == {"role": "tool", "tool_call_id": c.call_id, "name": c.name,
                                                "content": c.content}
        [bad] = store.tool_calls(results[1].trajectory_id)
        assert (bad.ok, bad.error, bad.arguments) == (False, "invalid_arguments", {"a": "two"})
        assert len(store.tool_calls(by_agent["greedy"].trajectory_id)) == 2

        # rewards
        rewards = store.rewards(by_agent["rewarding"].trajectory_id)
        assert [(w.name, w.value, w.info) for w in rewards] == [
            ("reward", 1.0, {"why": "answered", "score": 0.5}), ("format", 0.25, None)]
        assert store.trajectory(by_agent["rewarding"].trajectory_id).reward == 1.25

        # an agent that failed before it started still has its trajectory, in its run
        t = store.trajectory(by_agent["unknown-tool"].trajectory_id)
        assert (t.run_id, t.agent, t.status) == ("run-1", "unknown-tool", "failed") and "nope" in t.reason

        # one row per recorder call
        stats = store.stats()
        assert stats.written == stats.queued == store.recorded() and stats.lost == 0 and stats.pending == 0
        assert stats.batches >= stats.written // 7


# -- exact arrays, awkward values ------------------------------------------------------------------------
def result_for(trajectory_id: str, status: str = "done", task: object = "t", **kwargs) -> AgentResult:
    return AgentResult(agent="a", trajectory_id=trajectory_id, task=task, status=status, spent=Spent(turns=1), **kwargs)


def test_token_ids_and_logprobs_round_trip_bit_exactly(url):
    rng = random.Random(3)
    awkward32 = fp32([1e-45, -0.0, 0.0, 3.4028234663852886e38, -math.inf, -1e-38, -2.5e-40]
                     + [-rng.expovariate(0.1) * rng.choice([1, 1e-20, 1e20]) for _ in range(5000)])
    awkward64 = [0.1, -1e-300, 5e-324, -0.0, 1.0000000000000002, -math.inf]  # not fp32 values: kept as doubles
    replies = [
        ChatReply(content="fp32", prompt_ids=list(range(20_000)), token_ids=[0, 1, 2 ** 31 - 1], logprobs=awkward32),
        ChatReply(content="fp64", token_ids=[2 ** 40, -1, 7], logprobs=awkward64),
        ChatReply(content="empty"),
    ]
    with Store(url) as store:
        store.run_started("r", {})
        store.trajectory_started("t", "r", "a", {"task": "t"})
        for reply in replies:
            store.model_call("t", reply, {"options": ChatOptions(seed=1), "turn": 1})
        store.flush()
        calls = store.model_calls("t")
    assert [c.reply["content"] for c in calls] == ["fp32", "fp64", "empty"]  # no message followed: kept with the call
    for call, reply in zip(calls, replies):
        assert call.prompt_ids == reply.prompt_ids and call.token_ids == reply.token_ids
        assert bits(call.logprobs) == bits(reply.logprobs)
        assert all(type(x) is int for x in call.token_ids) and all(type(x) is float for x in call.logprobs)
    assert calls[0].options["seed"] == 1 and calls[2].prompt_ids == [] and calls[2].logprobs == []


def test_awkward_payloads_do_not_break_a_batch(url):
    with Store(url) as store:
        store.run_started("r", {"started by": "a test", "nan": math.nan})
        store.trajectory_started("t", "r", "a", {"task": {"a dict": [1, 2]}, "budget": {"seconds": math.inf}})
        store.message("t", {"role": "user", "content": "nul \x00 and emoji 🙂 and a lone surrogate \ud800" * 10})
        store.reward("t", "r", 1.0, {"nan": math.nan, "set": {3}})
        store.event("t", "note", {"obj": ValueError("not JSON")})
        store.trajectory_finished("t", result_for("t", task={"a dict": [1, 2]}, output={"x": math.inf},
                                                  reason="nul\x00"))
        store.flush()
        assert store.stats().lost == 0
        [node] = store.messages("t")
        assert node.message["content"].startswith("nul \x00 and emoji 🙂 and a lone surrogate \ud800")
        t = store.trajectory("t")
        assert json.loads(t.task) == {"a dict": [1, 2]} and t.output == {"x": "inf"} and t.reason == "nul\ufffd"
        assert store.rewards("t")[0].info == {"nan": "nan", "set": [3]}
        assert store.events("t")[1].data == {"obj": "not JSON"}


# -- content addressing ------------------------------------------------------------------------------------
def test_the_same_large_message_is_stored_once(url):
    big = {"role": "system", "content": "You are a careful agent. " * 8000}  # 200 KB
    with Store(url) as store:
        store.run_started("r", {})
        for i in range(50):
            store.trajectory_started(f"t{i}", "r", "a", {"task": None})
            store.message(f"t{i}", big)
        store.flush()
        counts = store.counts()
        assert counts["nodes"] == 50 and counts["blobs"] == 2  # the text, and {"role": "system", "content": null}
        with store.engine.connect() as c:
            sizes = sorted(c.execute(select(blobs.c.size)).scalars())
        assert sizes[-1] == len(big["content"].encode()) and sizes[0] < 100
        assert all(store.messages(f"t{i}")[0].message == big for i in (0, 49))
    if "://" not in url:
        assert os.path.getsize(url) < 1_000_000


# -- forks -------------------------------------------------------------------------------------------------
def test_a_fork_is_a_branch_sharing_its_prefix(url):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "a2"}]
    with Store(url) as store:
        store.run_started("r", {})
        store.trajectory_started("A", "r", "a", {"task": "q"})
        for m in msgs:
            store.message("A", m)
        store.flush()
        path_a = store.messages("A")
        root, k = path_a[0], path_a[2]
        assert root.parent_id is None and [n.seq for n in path_a] == [0, 1, 2, 3, 4]

        fork = [{"role": "user", "content": "something else"}, {"role": "assistant", "content": "b2"}]
        store.trajectory_started("B", "r", "a", {"task": "q", "parent_node": k.id})
        for m in fork:
            store.message("B", m)
        store.trajectory_started("C", "r", "a", {"task": "q", "parent_node": 10 ** 12})  # no such node
        store.message("C", {"role": "user", "content": "alone"})
        store.flush()

        b = store.trajectory("B")
        assert (b.parent_trajectory_id, b.fork_node_id) == ("A", k.id)
        path_b = store.messages("B")
        assert [n.message for n in path_b] == msgs[:3] + fork
        assert [n.id for n in path_b[:3]] == [n.id for n in path_a[:3]] and path_b[3].parent_id == k.id
        assert [n.trajectory_id for n in path_b] == ["A"] * 3 + ["B"] * 2

        branches = store.branches(root.id)
        assert [[n.id for n in p] for p in branches] == [[n.id for n in path_a], [n.id for n in path_b]]
        assert store.branches(k.id) == branches  # through a middle node: the same full paths
        assert [n.id for n in store.children(k.id)] == [path_a[3].id, path_b[3].id]
        assert store.children(path_a[-1].id) == [] and store.node(k.id) == k

        c = store.trajectory("C")
        assert c.parent_trajectory_id is None and store.messages("C")[0].parent_id is None
        [started] = [e for e in store.events("C") if e.kind == "trajectory_started"]
        assert "not a node of this store" in started.data["fork_error"]


# -- versions, reopening, closing ------------------------------------------------------------------------
def test_another_schema_version_is_refused_with_what_to_do(url):
    Store(url).close()
    engine = create_engine(url if "://" in url else f"sqlite:///{url}")
    with engine.begin() as c:
        c.execute(update(meta).where(meta.c.key == "schema_version").values(value="999"))
    engine.dispose()
    for opener in (Store, StoreReader):
        with pytest.raises(StoreVersionError) as info:
            opener(url)
        text = str(info.value)
        assert "schema version 999" in text and f"reads version {SCHEMA_VERSION}" in text and "new file" in text


def test_reopening_marks_unfinished_runs_interrupted(url):
    first = Store(url)
    first.run_started("r1", {})
    first.trajectory_started("done", "r1", "a", {"task": "x"})
    first.trajectory_started("cut", "r1", "a", {"task": "y"})
    first.message("cut", {"role": "user", "content": "y"})
    first.trajectory_finished("done", result_for("done"))
    first.run_started("r2", {})
    first.run_finished("r2", "finished", {"agents": 0})
    first.flush()
    # a new process opening the file while r1 is still `running`: the one that wrote it is gone
    with Store(url) as second:
        assert second.interrupted == ["r1"]
        assert [(r.id, r.status) for r in second.runs()] == [("r1", "interrupted"), ("r2", "finished")]
        assert second.trajectory("cut").status == "interrupted" and second.trajectory("done").status == "done"
        [event] = [e for e in second.events(run_id="r1") if e.kind == "interrupted"]
        assert event.trajectory_id is None and event.data["trajectories"] == 1
        recorded = second.recorded()
    first.close()  # nothing left to mark: r1 is interrupted already
    with StoreReader(url) as reader:
        assert len([e for e in reader.events() if e.kind == "interrupted"]) == 1 and reader.recorded() == recorded


def test_close_marks_what_this_store_left_unfinished(url):
    store = Store(url)
    store.run_started("r", {})
    store.trajectory_started("t", "r", "a", {"task": None})
    store.close()
    store.close()  # idempotent
    with StoreReader(url) as reader:
        assert reader.run("r").status == "interrupted" and reader.trajectory("t").status == "interrupted"
        assert "closed" in reader.trajectory("t").reason
        with pytest.raises(KeyError, match="no run 'nope'"):
            reader.run("nope")


# -- flush, concurrency ------------------------------------------------------------------------------------
def test_flush_waits_for_exactly_what_was_queued(url, caplog):
    with Store(url, flush_interval=30.0, batch_size=50) as store:  # the idle writer would sleep 30 s
        store.run_started("r", {})
        store.trajectory_started("t", "r", "a", {"task": None})
        for i in range(498):
            store.message("t", {"role": "user", "content": f"m{i}"})
        started = time.monotonic()
        assert store.flush() is True
        assert time.monotonic() - started < 10
        assert store.flushed_events == 500 == store.recorded() == store.stats().written
        assert len(store.messages("t")) == 498
        assert store.flush(timeout=0.5) is True  # nothing new: at once

        async def more() -> None:
            store.message("t", {"role": "assistant", "content": "async"})
            await store.aflush()
        asyncio.run(more())
        assert store.flushed_events == 501
    store.message("t", {"role": "user", "content": "too late"})  # after close: dropped, with a warning
    assert store.flush() is True and "dropped" in caplog.text


def test_a_reader_sees_a_consistent_growing_store_while_the_writer_writes(url):
    with Store(url, batch_size=20, flush_interval=0.005) as store, StoreReader(url) as reader:
        store.run_started("r", {})
        store.trajectory_started("t", "r", "a", {"task": None})
        store.flush()
        seen = []
        for i in range(40):
            for j in range(25):
                store.message("t", {"role": "user", "content": f"{i}.{j}"})
            path = reader.messages("t")  # whatever is committed: always a whole path from the root
            assert [n.seq for n in path] == list(range(len(path)))
            seen.append(len(path))
            time.sleep(0.002)
        store.flush()
        assert seen == sorted(seen) and len(reader.messages("t")) == 1000
        assert reader.counts() == store.counts()


def test_the_reader_is_read_only(url):
    Store(url).close()
    with StoreReader(url) as reader, pytest.raises(Exception):
        with reader.engine.begin() as c:
            c.execute(meta.insert(), [{"key": "x", "value": "y"}])


def test_missing_file_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        StoreReader(tmp_path / "nothing.db")
    with pytest.raises(StoreError, match="create it first"):
        Store(tmp_path / "no" / "such" / "folder.db")
    with pytest.raises(ValueError, match="batch_size=0"):
        Store(tmp_path / "x.db", batch_size=0)


# -- import weight and the benchmark ----------------------------------------------------------------------
def test_importing_the_store_stays_light():
    code = "import json, sys; import agentrt.store; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    assert not {"torch", "textual", "agentrt.model"} & loaded


def test_bench_store_reports_throughput_lag_and_size():
    result = CliRunner().invoke(cli, ["bench", "store", "--agents", "50", "--turns", "3"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "runtime alone" in out
    for writer in ("thread", "process"):
        assert f"store events/s written ({writer} writer):" in out and "target >= 20,000" in out
        assert f"event-loop lag p99 with the store ({writer} writer):" in out and "target < 10 ms" in out
        row = next(line for line in out.splitlines() if line.startswith(f"runtime + store ({writer} writer)"))
        row = row.split()
        assert row[5:8] == ["50", "3", "50"]  # agents, turns, completed
        events = int(row[10].replace(",", ""))
        assert events == 2 + 50 * (1 + 2 + 4 * 3 + 2 + 1)  # run start/end; per agent: start, system and user
        #                                                     messages, 4 calls per tool turn, the answer (2), end
        assert float(row[-2]) > 0  # file MB


def test_bench_store_refuses_an_unknown_writer():
    result = CliRunner().invoke(cli, ["bench", "store", "--writers", "thread,fork"])
    assert result.exit_code == 2 and "choose one or more of thread, process" in result.output


def test_fast_json_encoding_means_what_the_standard_library_means():
    """`dumps` takes pydantic-core's encoder where it can; every payload reads back as the
    standard library's encoding of it would, and non-finite floats still become strings."""
    import dataclasses

    from pydantic import BaseModel

    from agentrt.store.schema import _ENCODER, _finite, dumps, jsonable

    @dataclasses.dataclass
    class Point:
        x: float
        tags: tuple

    class Call(BaseModel):
        name: str
        args: dict

    rng = random.Random(7)

    def value(depth: int = 0):
        kinds = ["int", "float", "str", "bool", "none"] + (["list", "dict", "tuple"] if depth < 3 else [])
        kind = rng.choice(kinds)
        if kind == "int":
            return rng.randint(-2**40, 2**40)
        if kind == "float":
            return rng.choice([rng.uniform(-1e6, 1e6), 1e-7, 1e16, 0.1, -0.0, math.nan, math.inf])
        if kind == "str":
            return "".join(rng.choice("ab \"\\\n\té🙂\x00") for _ in range(rng.randint(0, 8)))
        if kind == "bool":
            return rng.random() < 0.5
        if kind == "none":
            return None
        items = [value(depth + 1) for _ in range(rng.randint(0, 4))]
        if kind == "list":
            return items
        if kind == "tuple":
            return tuple(items)
        return {rng.choice(["k", "é", "1", "a b"]) + str(i): v for i, v in enumerate(items)}

    payloads = [value() for _ in range(400)] + [
        {"point": Point(1.5, (1, 2))}, {"call": Call(name="f", args={"x": [1, 2]})}, {"ints": {1: "a", 2: "b"}},
        {"bytes": b"raw"}, {"set": {3}}, {"lone": "\ud800"},
    ]
    for v in payloads:
        text = dumps(v)
        try:
            expected = _ENCODER.encode(v)
        except ValueError:
            expected = _ENCODER.encode(_finite(json.loads(json.dumps(v, default=jsonable))))
        assert json.loads(text) == json.loads(expected), v
        assert "NaN" not in text and "Infinity" not in text


# -- the writer process ------------------------------------------------------------------------------------
def test_the_writer_process_stores_what_the_writer_thread_stores(tmp_path):
    """Records holding objects only this process can build (classes local to the test) reach the
    writer process as what the database would hold anyway, and read back as with the thread."""
    import dataclasses
    import enum

    from pydantic import BaseModel

    class Colour(str, enum.Enum):
        RED = "red"

    class Answer(BaseModel):
        value: int
        colour: Colour

    @dataclasses.dataclass
    class Point:
        x: float
        y: float

    class Opaque:
        def __str__(self) -> str:
            return "an opaque object"

    class Info(dict):  # a container subclass the writer process cannot import either
        pass

    Pair = collections.namedtuple("Pair", "left right")

    def record(store: Store) -> None:
        store.run_started("r", {"colour": Colour.RED})
        store.trajectory_started("t", "r", "a", {"task": "t"})
        store.message("t", {"role": "user", "content": "go"})
        reply = ChatReply(content=None, tool_calls=[ToolCallRequest("c1", "f", {"p": 1})], prompt_ids=[1, 2],
                          token_ids=[3], logprobs=[-0.5], usage=Usage(prompt_tokens=2, output_tokens=1))
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        for turn in range(3):  # the same schema list every call, as a trajectory passes it
            store.model_call("t", reply, {"options": ChatOptions(session="t"), "tools": tools, "turn": turn})
        store.tool_call("t", {"id": "c1", "name": "f", "arguments": {"p": 1}}, Answer(value=7, colour=Colour.RED))
        store.tool_call("t", {"id": "c2", "name": "f", "arguments": {"p": Point(1, 2)}}, Opaque())
        store.reward("t", "score", 1.0, {"where": Point(0.5, 1.5), "ids": {4}})
        store.event("t", "note", {"colour": Colour.RED, "thing": Opaque()})
        store.event("t", "more", Info(pair=Pair(1, Info(x=2))))

    def read(store: Store) -> tuple:
        calls = store.model_calls("t")
        return ([n.message for n in store.messages("t")], [(c.options, c.meta, c.token_ids) for c in calls],
                [(c.arguments, c.content) for c in store.tool_calls("t")], [r.info for r in store.rewards("t")],
                [e.data for e in store.events("t")], store.run("r").meta)

    seen = {}
    for writer in ("thread", "process"):
        with Store(tmp_path / f"{writer}.db", writer=writer) as store:
            record(store)
            store.flush()
            assert store.stats().lost == 0 and store.flushed_events == 11
            seen[writer] = read(store)
    assert seen["process"] == seen["thread"]
    assert seen["process"][4][-1] == {"pair": [1, {"x": 2}]}
    tool_calls = seen["process"][2]
    assert tool_calls[0][1] == {"value": 7, "colour": "red"} and tool_calls[1] == ({"p": {"x": 1, "y": 2}},
                                                                                     "an opaque object")


def test_a_writer_process_that_dies_fails_flushes_instead_of_hanging(tmp_path):
    store = Store(tmp_path / "store.db", writer="process")
    store.run_started("r", {})
    store.flush()
    assert store.flushed_events == 1
    store._writer.proc.kill()
    store.event(None, "after", {})
    with pytest.raises(StoreError, match="writer process .* exited"):
        store.flush(timeout=30)
    started = time.monotonic()
    store.close()  # logs that the last records were not written; does not wait for a dead writer
    assert time.monotonic() - started < 10
    with StoreReader(tmp_path / "store.db") as reader:
        assert reader.recorded() == 1
