"""Replay, fork and render recorded trajectories, and TrajectoryEnv: the embedded model replays its
own runs token for token (a custom tool policy, and the logistics world) without running a tool."""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest

from agentrt import Agent, Budget, Runtime, Sampling, ScriptedModel, ToolError, tool
from agentrt.environments.base import Environment, Seat, run_environment
from agentrt.environments.trajectory import TrajectoryEnv
from agentrt.replay import ReplayError, fork, render, replay
from agentrt.runtime import Episode
from agentrt.store import Store

painted: list[tuple[int, str]] = []


@tool
def paint(count: Literal[1, 2, 3], colour: Literal["red", "green"]) -> str:
    """Paint some boxes.

    Args:
        count: How many boxes.
        colour: Which colour.
    """
    painted.append((count, colour))
    return f"painted {count} {colour}"


async def painter_policy(ctx) -> str:
    for _ in range(2):  # two constrained tool turns, then an answer without tools
        reply = await ctx.chat(require_call=True, parallel_calls=False)
        ctx.reject_calls(reply.errors)
        await ctx.call_tools(reply.tool_calls)
    return (await ctx.chat(tools=False, max_tokens=12)).content


painter = Agent(name="painter", instructions="Paint boxes with the tool.", tools=[paint], policy=painter_policy,
                budget=Budget(tool_calls=3, think_tokens=4), sampling=Sampling(temperature=0.7, max_tokens=80))
truck = Agent(name="truck", max_turns=3, budget=Budget(tool_calls=3, turns=3, think_tokens=4),
              sampling=Sampling(max_tokens=48, temperature=0.7, seed=1))


class Counting:
    """Counts calls of a world's rule methods (what the seat tools call)."""

    def __init__(self, world, names: tuple[str, ...]):
        self.calls = 0
        for name in names:
            setattr(world, name, self._wrap(getattr(world, name)))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return counted


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Three painters and a 2-truck, 2-tick logistics run recorded on the tiny model; then, on a fresh
    runtime over the same store: every trajectory replayed, and one fork."""
    from agentrt.environments.logistics import LogisticsWorld, play_until_done

    store = Store(tmp_path_factory.mktemp("replay") / "runs.db")
    world = LogisticsWorld(trucks=2, ticks=2, tick_timeout=0.3)

    async def main():
        async with Runtime(model="tiny", recorder=store) as rt:
            painters = await rt.run([(painter.model_copy(update={"sampling": painter.sampling.model_copy(
                update={"seed": i})}), f"Paint {i + 1} boxes.") for i in range(3)])
            trucks = await run_environment(rt, world, seed=0, agent=truck, policy=play_until_done(world))
        await store.aflush()
        executed = len(painted)
        fresh = LogisticsWorld(trucks=2, ticks=2)  # only for its tools' schemas: nothing may reach it
        counter = Counting(fresh, ("status", "order_views", "place_bid", "request_charge", "end_tick"))
        seats = {s.id: s for s in fresh.reset(0)}
        async with Runtime(model="tiny", recorder=store) as rt:
            again = [await replay(rt, store, r.trajectory_id, agent=painter) for r in painters]
            truck_again = [await replay(rt, store, r.trajectory_id, agent=truck.model_copy(
                update={"name": r.agent, "tools": seats[r.agent].tools})) for r in trucks]
            user = store.messages(painters[0].trajectory_id)[1]

            async def answer(ctx):
                return (await ctx.chat(tools=False, max_tokens=8)).content
            forked = await fork(rt, store, user.id, agent=painter, sampling={"seed": 99}, policy=answer)
        await store.aflush()
        return dict(painters=painters, trucks=trucks, again=again, truck_again=truck_again, forked=forked,
                    user=user, executed=executed, replay_executions=len(painted) - executed,
                    world_calls=counter.calls)

    out = asyncio.run(main())
    yield store, out
    store.close()


def test_replay_reproduces_every_token_of_the_recorded_run(recorded):
    store, out = recorded
    assert all(r.status == "done" for r in out["painters"]), [r.error for r in out["painters"]]
    assert out["executed"] >= 3  # the policy made tool calls, so the replay had results to serve
    for r, again in zip(out["painters"], out["again"]):
        assert again.identical, (again.mismatches, again.error)
        assert again.calls == again.recorded_calls == 3 and again.replay_of == r.trajectory_id
        old = store.model_calls(r.trajectory_id)
        new = store.model_calls(again.trajectory_id)
        assert [c.token_ids for c in new] == [c.token_ids for c in old]
        for a, b in zip(new, old):  # same tokens; logprobs to float noise (batch shape, cached prefixes)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
        assert [c.options["seed"] for c in new] == [c.options["seed"] for c in old]  # the recorded options
        assert [n.message for n in store.messages(again.trajectory_id)] == [n.message for n in
                                                                            store.messages(r.trajectory_id)]
        assert store.trajectory(again.trajectory_id).meta["replay_of"] == r.trajectory_id


def test_replayed_tool_calls_are_served_from_the_recording_not_run(recorded):
    store, out = recorded
    assert out["replay_executions"] == 0
    for r, again in zip(out["painters"], out["again"]):
        old, new = store.tool_calls(r.trajectory_id), store.tool_calls(again.trajectory_id)
        assert [(c.name, c.arguments, c.content, c.ok) for c in new] == [(c.name, c.arguments, c.content, c.ok)
                                                                          for c in old]


def test_a_logistics_run_replays_identically_without_touching_a_world(recorded):
    store, out = recorded
    assert [r.agent for r in out["trucks"]] == ["truck-00", "truck-01"]
    assert sum(len(store.tool_calls(r.trajectory_id)) for r in out["trucks"]) >= 2
    for again in out["truck_again"]:
        assert again.identical, (again.mismatches, again.error)
        assert again.calls >= 1
    assert out["world_calls"] == 0


def test_a_fork_is_a_sibling_branch_sharing_the_prefix(recorded):
    store, out = recorded
    user, forked, original = out["user"], out["forked"], out["painters"][0]
    assert forked.status == "done", forked.error
    kids = store.children(user.id)
    assert [k.trajectory_id for k in kids] == [original.trajectory_id, forked.trajectory_id]
    root = store.messages(original.trajectory_id)[0]
    paths = store.branches(root.id)
    assert len(paths) == 2
    assert [n.id for n in paths[0][:2]] == [n.id for n in paths[1][:2]] == [root.id, user.id]
    t = store.trajectory(forked.trajectory_id)
    assert (t.parent_trajectory_id, t.fork_node_id, t.meta["fork_of"]) == (original.trajectory_id, user.id,
                                                                          original.trajectory_id)
    assert store.model_calls(forked.trajectory_id)[0].options["seed"] == 99


def test_render_shows_messages_tool_calls_results_and_status(recorded):
    store, out = recorded
    r = out["painters"][0]
    text = render(store, r.trajectory_id)
    first = store.tool_calls(r.trajectory_id)[0]
    assert f"-> paint({{\"count\": {first.arguments['count']}" in text
    assert f"tool paint ({first.call_id}) ok" in text and first.content in text
    assert "#0 system" in text and "#1 user" in text and "<reasoning>" in text
    assert text.rstrip().endswith("status: done")
    fork_text = render(store, out["forked"].trajectory_id)
    assert "fork of" in fork_text and "shared prefix" in fork_text


# ---------------------------------------------------------------- scripted: divergence and TrajectoryEnv

added: list[tuple[int, int]] = []


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    added.append((a, b))
    return a + b


def adder(b: int):
    def script(messages, tools):
        if messages[-1]["role"] == "tool":
            return f"it is {messages[-1]['content']}"
        return {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": b}}]}
    return script


def test_a_replay_that_makes_an_unrecorded_call_stops_with_a_clear_error(tmp_path):
    calc = Agent(name="calc", tools=[add])

    async def main():
        with Store(tmp_path / "s.db") as store:
            async with Runtime(model=ScriptedModel(adder(3)), recorder=store) as rt:
                [r] = await rt.run([(calc, "2 + 3?")])
            await store.aflush()
            before = len(added)
            async with Runtime(model=ScriptedModel(adder(3)), recorder=store) as rt:
                same = await replay(rt, store, r.trajectory_id)  # the store holds the tools' schemas
            async with Runtime(model=ScriptedModel(adder(4)), recorder=store) as rt:
                other = await replay(rt, store, r.trajectory_id, agent=calc)
            return same, other, len(added) - before

    same, other, executed = asyncio.run(main())
    assert same.identical and same.calls == 2 and executed == 0
    assert not other.identical and other.result.status == "failed"
    assert ReplayError.__name__ in other.error and 'add({"a": 2, "b": 4})' in other.error
    assert "does not hold" in other.error and 'add({"a": 2, "b": 3})' in other.error
    assert other.mismatches and other.mismatches[0].field == "reply" and other.mismatches[0].call == 0


class Shop(Environment):
    """One seller; reward: what it sold for."""

    name = "shop"

    def reset(self, seed: int = 0) -> list[Seat]:
        self.sold: list[tuple[str, float]] = []

        @tool
        def sell(item: str, price: float) -> str:
            """Sell an item."""
            if price <= 0:
                raise ToolError("price must be positive")
            self.sold.append((item, price))
            return f"sold {item} for {price:g}"
        return [Seat("seller", "Sell things.", "Sell a and b.", [sell])]

    @property
    def done(self) -> bool:
        return False

    def reward(self, seat_id: str) -> float:
        return sum(p for _, p in self.sold)

    def baseline(self, seat_id: str):
        raise NotImplementedError


def seller(*sales: tuple[str, float], first: int = 0):
    """A script selling `sales` in turn (one per turn, counted by tool results after `first`), then answering."""
    def script(messages, tools):
        done = sum(m["role"] == "tool" for m in messages) - first
        if done < len(sales):
            item, price = sales[done]
            return {"tool_calls": [{"name": "sell", "arguments": {"item": item, "price": price}}]}
        return "all sold"
    return script


@pytest.fixture()
def shop_run(tmp_path):
    """A recorded shop episode: sell a, sell b, answer; reward 3 (1 + 2)."""
    store = Store(tmp_path / "shop.db")

    async def main():
        async with Runtime(model=ScriptedModel(seller(("a", 1.0), ("b", 2.0))), recorder=store) as rt:
            [r] = await run_environment(rt, Shop(), agent=Agent(name="seller"))
        await store.aflush()
        return r

    r = asyncio.run(main())
    yield store, r
    store.close()


def run_fork(store, env, script, policy=None):
    """reset `env` and run its seat as a fork episode on a scripted model."""
    async def main():
        [seat] = env.reset(0)
        agent = Agent(name=seat.id, tools=seat.tools, policy=policy)
        async with Runtime(model=ScriptedModel(script), recorder=store) as rt:
            [r] = await rt.run([Episode(agent, seat.task, messages=seat.messages, meta=env.fork_meta)])
        await store.aflush()
        return seat, r
    return asyncio.run(main())


def test_trajectory_env_restores_the_fork_point_and_serves_recorded_results(shop_run):
    store, original = shop_run
    path = store.messages(original.trajectory_id)
    assert [n.role for n in path] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    env = TrajectoryEnv(store, original.trajectory_id, fork_at=3)
    seat, r = run_fork(store, env, seller(("b", 2.0), ("c", 5.0), first=1))
    assert env.seat_messages == [n.message for n in path[:4]] == seat.messages
    assert (seat.id, seat.instructions, seat.task) == ("seller", "Sell things.", "Sell a and b.")
    assert [c.arguments for c in env.served] == [{"item": "b", "price": 2.0}]  # recorded after the fork point
    assert env.unrecorded == [("sell", {"item": "c", "price": 5.0})]
    results = store.tool_calls(r.trajectory_id)
    assert [c.content for c in results][0] == "sold b for 2"
    assert not results[1].ok and "not in the recording" in results[1].content and "on_unrecorded" in results[1].content
    assert env.reward(seat.id) == 3.0  # no world: the recorded reward
    assert [k.trajectory_id for k in store.children(path[3].id)] == [original.trajectory_id, r.trajectory_id]


def test_trajectory_env_runs_unrecorded_calls_live_and_scores_with_the_world(shop_run):
    store, original = shop_run
    world = Shop()
    env = TrajectoryEnv(store, original.trajectory_id, fork_at=3, world=world, on_unrecorded="live")
    seat, r = run_fork(store, env, seller(("b", 2.0), ("c", 5.0), first=1))
    assert r.status == "done"
    assert world.sold == [("c", 5.0)]  # b came from the recording, c ran live
    assert env.ran_live == [("sell", {"item": "c", "price": 5.0})] and len(env.served) == 1
    assert env.reward(seat.id) == 5.0 and env.reward_info(seat.id)["source"] == "world"
    assert [c.content for c in store.tool_calls(r.trajectory_id)] == ["sold b for 2", "sold c for 5"]


def test_trajectory_env_baseline_replays_the_recorded_actions(shop_run):
    store, original = shop_run
    env = TrajectoryEnv(store, original.trajectory_id, fork_at=1)  # the opening is system + task, as a Seat's

    async def main():
        async with Runtime(model=ScriptedModel(lambda m, t: "a model call"), recorder=store) as rt:
            [r] = await run_environment(rt, env, policy="baseline")
        await store.aflush()
        return r

    r = asyncio.run(main())
    assert r.status == "done" and r.output == original.output and r.rewards == {"trajectory": 3.0}
    assert [n.message for n in store.messages(r.trajectory_id)] == [n.message for n in
                                                                   store.messages(original.trajectory_id)]
    assert len(env.served) == 2 and not env.unrecorded and env.done


def test_trajectory_env_serves_recorded_failures_with_the_recorded_text(tmp_path):
    async def main():
        with Store(tmp_path / "s.db") as store:
            async with Runtime(model=ScriptedModel(seller(("a", 1.0), ("x", 0.0))), recorder=store) as rt:
                [r] = await run_environment(rt, Shop(), agent=Agent(name="seller"))
            await store.aflush()
            env = TrajectoryEnv(store, r.trajectory_id, fork_at=1, world=Shop())
            [seat] = env.reset(0)
            async with Runtime(model=ScriptedModel(lambda m, t: "unused"), recorder=store) as rt:
                [again] = await rt.run([Episode(Agent(name="seller", tools=seat.tools, policy=env.baseline("seller")),
                                                seat.task, messages=seat.messages, meta=env.fork_meta)])
            await store.aflush()
            return store.tool_calls(r.trajectory_id), store.tool_calls(again.trajectory_id), env

    old, new, env = asyncio.run(main())
    assert not old[1].ok and old[1].error == "tool_error" and "price must be positive" in old[1].content
    assert [(c.content, c.ok, c.error) for c in new] == [(c.content, c.ok, c.error) for c in old]
    assert env.world.sold == []  # served, not run


def test_trajectory_env_checks_its_arguments(shop_run):
    store, original = shop_run
    with pytest.raises(ValueError, match="fork_at=9"):
        TrajectoryEnv(store, original.trajectory_id, fork_at=9)
    with pytest.raises(ValueError, match="live_tools"):
        TrajectoryEnv(store, original.trajectory_id, fork_at=1, on_unrecorded="live")
