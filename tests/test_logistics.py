"""The logistics world: the auction's rules, batteries and charging, money, determinism, the tick
loop, and whole runs through the runtime (the scripted baseline, the embedded model, the example)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
import pytest

import agentrt
from agentrt.environments.base import run_environment
from agentrt.environments.logistics import LogisticsWorld, Order, Rules, play_until_done
from agentrt.store import StoreReader
from agentrt.tools import ToolError, ToolRegistry


def world_with(*orders: tuple[int, int, float, float], trucks: int = 3, at: int = 0, battery: float = 30.0,
               **rules) -> LogisticsWorld:
    """A world whose trucks all stand at node `at` with `battery` kWh, and whose only orders are
    `orders` (pickup, dropoff, kg, max price), ids o1, o2, ... open during ticks 1-2."""
    w = LogisticsWorld(trucks=trucks, ticks=2, rules=Rules(**rules))
    w.reset(0)
    w.orders = {f"o{i}": Order(f"o{i}", 1, 2, p, d, kg, m) for i, (p, d, kg, m) in enumerate(orders, 1)}
    for truck in w.trucks.values():
        truck.node, truck.battery = at, battery
    return w


def far_from(w: LogisticsWorld, node: int) -> int:
    return max(w.city.km[node], key=lambda n: (w.city.km[node][n], n))


# ---------------------------------------------------------------- the auction

def test_lowest_valid_bid_wins_and_ties_go_to_the_lower_truck_id() -> None:
    w = world_with((0, 5, 20, 10.0))
    w.place_bid("truck-02", "o1", 5.0)
    w.place_bid("truck-01", "o1", 5.0)
    w.place_bid("truck-00", "o1", 6.0)
    w.advance()
    assert (w.orders["o1"].winner, w.orders["o1"].price) == ("truck-01", 5.0)
    assert "won o1 at 5" in w.trucks["truck-01"].reports[1]
    assert "lost o1 (truck-01 bid 5)" in w.trucks["truck-02"].reports[1]
    assert "lost o1 (truck-01 bid 5)" in w.trucks["truck-00"].reports[1]


def test_a_lower_bid_over_capacity_is_skipped() -> None:
    w = world_with((0, 5, 60, 10.0), (0, 6, 60, 10.0))
    w.place_bid("truck-00", "o1", 3.0)
    w.place_bid("truck-00", "o2", 3.0)  # valid alone, but with o1 won its 100 kg hold only 40 more
    w.place_bid("truck-01", "o2", 4.0)
    w.advance()
    assert w.orders["o1"].winner == "truck-00"
    assert (w.orders["o2"].winner, w.orders["o2"].price) == ("truck-01", 4.0)
    assert "lost o2 (over capacity)" in w.trucks["truck-00"].reports[1]


def test_a_lower_bid_without_battery_for_the_whole_route_is_skipped() -> None:
    w = world_with((0, 5, 10, 10.0), (0, 6, 10, 10.0))
    km = w.city.km
    need_o1 = km[0][5] * w.rules.kwh_per_km
    w.trucks["truck-00"].battery = need_o1 + 0.1  # enough for o1, not for o1 then o2
    assert km[5][0] + km[0][6] > 0.2
    w.place_bid("truck-00", "o1", 2.0)
    w.trucks["truck-00"].bids["o2"] = 2.0
    w.place_bid("truck-01", "o2", 7.0)
    w.advance()
    assert w.orders["o1"].winner == "truck-00"
    assert (w.orders["o2"].winner, w.orders["o2"].price) == ("truck-01", 7.0)
    assert "lost o2 (not enough battery)" in w.trucks["truck-00"].reports[1]


def test_a_bid_above_the_max_price_never_wins() -> None:
    w = world_with((0, 5, 10, 8.0))
    w.trucks["truck-00"].bids["o1"] = 9.0  # the bid tool refuses it; the auction checks again
    w.advance()
    assert w.orders["o1"].winner is None
    assert "lost o1 (above the max price)" in w.trucks["truck-00"].reports[1]
    assert [o.id for o in w.open_orders()] == ["o1"]  # still open in tick 2


def test_the_bid_tool_refuses_what_could_never_win() -> None:
    w = world_with((0, 5, 10, 8.0), (0, 6, 80, 8.0), capacity_kg=50)
    for args, message in [
        (("o9", 5.0), "no order 'o9'; open now: o1, o2"),
        (("o1", 9.0), "price 9 is above the max price of o1 (8); bid at most 8"),
        (("o1", 0.0), "price must be a positive number"),
        (("o2", 5.0), "o2 weighs 80 kg, more than your capacity of 50 kg"),
    ]:
        with pytest.raises(ToolError, match=re.escape(message)):
            w.place_bid("truck-00", *args)
    w.trucks["truck-00"].battery = 0.1
    with pytest.raises(ToolError, match=r"o1 needs [\d.]+ kWh, your battery has 0.1; charge\(\) first"):
        w.place_bid("truck-00", "o1", 5.0)
    assert w.trucks["truck-00"].bids == {}


def test_tools_through_the_registry() -> None:
    w = LogisticsWorld(trucks=16, ticks=2)
    seat = w.reset(0)[0]
    registry = ToolRegistry(seat.tools)
    assert registry.names == ["status", "orders", "bid", "charge", "end_tick"]

    def call(name: str, **arguments):
        return asyncio.run(registry.dispatch({"id": "c", "name": name, "arguments": arguments}))

    status = call("status").value
    assert status["truck"] == seat.id and status["tick"] == 1 and not status["over"]
    views = call("orders").value
    assert len(views) == w.rules.listed and [v["km"] for v in views] == sorted(v["km"] for v in views)
    bad = call("bid", order_id="o1", price="cheap")
    assert bad.error == "invalid_arguments" and "argument `price`" in bad.content
    refused = call("bid", order_id="nope", price=3)
    assert refused.error == "tool_error" and "no order 'nope'" in refused.content
    placed = call("bid", order_id=views[0]["id"], price=views[0]["max_price"])
    assert placed.ok and w.trucks[seat.id].bids == {views[0]["id"]: views[0]["max_price"]}


# ---------------------------------------------------------------- batteries, charging, money

def test_a_delivery_drains_the_battery_moves_the_truck_and_pays() -> None:
    w = world_with((3, 8, 10, 20.0), at=0)
    r, km = w.rules, w.city.km[0][3] + w.city.km[3][8]
    w.place_bid("truck-00", "o1", 12.5)
    w.advance()
    t = w.trucks["truck-00"]
    assert t.node == 8 and t.delivered == 1
    assert t.battery == pytest.approx(30.0 - km * r.kwh_per_km)
    assert t.balance == pytest.approx(r.start_balance + 12.5 - km * r.km_cost)
    assert w.reward("truck-00") == pytest.approx(12.5 - km * r.km_cost)  # profit is the reward


def test_charging_at_the_nearest_station_refills_and_costs_money() -> None:
    w = world_with()
    start = next(n for n in sorted(w.city.graph) if n not in w.city.stations)
    t, r = w.trucks["truck-00"], w.rules
    t.node, t.battery = start, 5.0
    station, km = w.city.nearest_station(start)
    assert "nearest station (now" in w.request_charge("truck-00")
    w.advance()
    kwh = r.charge_kwh  # 5 kWh minus the drive, plus 15, stays under the 30 kWh of a full battery
    assert t.node == station
    assert t.battery == pytest.approx(5.0 - km * r.kwh_per_km + kwh)
    assert t.balance == pytest.approx(r.start_balance - kwh * r.energy_price - km * r.km_cost)
    assert f"charged {kwh:.1f} kWh at {station}" in t.reports[1]
    t.battery = r.battery_kwh
    with pytest.raises(ToolError, match="the battery is full"):
        w.request_charge("truck-00")


def test_a_truck_with_an_empty_battery_cannot_move() -> None:
    w = world_with((0, 5, 10, 10.0), battery=0.0)
    stranded = next(n for n in sorted(w.city.graph) if n not in w.city.stations)
    t = w.trucks["truck-00"]
    t.node = stranded
    with pytest.raises(ToolError, match="needs .* kWh, your battery has 0.0"):
        w.place_bid("truck-00", "o1", 5.0)
    with pytest.raises(ToolError, match="stranded"):
        w.request_charge("truck-00")
    t.bids["o1"], t.charging = 5.0, True  # forced past the tools: the tick still moves nothing
    w.advance()
    assert (t.node, t.battery, t.balance, w.orders["o1"].winner) == (stranded, 0.0, w.rules.start_balance, None)
    assert "lost o1 (not enough battery)" in t.reports[1] and "could not reach station" in t.reports[1]


# ---------------------------------------------------------------- the map and determinism

def test_the_same_seed_gives_the_same_world() -> None:
    def snapshot(seed: int) -> tuple:
        w = LogisticsWorld(trucks=5, ticks=4)
        w.reset(seed)
        edges = sorted((u, v, d["km"]) for u, v, d in w.city.graph.edges(data=True))
        return (edges, w.city.stations, w.city.depots, [(t.node, t.battery) for t in w.trucks.values()],
                [(o.id, o.tick, o.until, o.pickup, o.dropoff, o.kg, o.max_price) for o in w.orders.values()])

    assert snapshot(7) == snapshot(7)
    assert snapshot(7) != snapshot(8)
    w = LogisticsWorld(trucks=16, ticks=3)
    rows, cols = w.rules.grid
    assert 20 <= w.city.graph.number_of_nodes() == rows * cols <= 40 and nx.is_connected(w.city.graph)
    assert all(d["km"] > 0 for *_, d in w.city.graph.edges(data=True))
    assert len(w.orders) == 3 * 12 and {o.tick for o in w.orders.values()} == {1, 2, 3}


# ---------------------------------------------------------------- the tick loop

def test_ticks_advance_when_all_ended_or_on_timeout_and_leavers_are_not_waited_for() -> None:
    w = LogisticsWorld(trucks=2, ticks=3, tick_timeout=0.3)

    async def main() -> list:
        w.reset(0)
        ticks = asyncio.create_task(w.run_ticks())
        t0 = time.monotonic()
        first = await w.end_tick("truck-00")  # truck-01 never ends tick 1: the timeout advances it
        waited = time.monotonic() - t0
        t1 = time.monotonic()
        await asyncio.gather(w.end_tick("truck-00"), w.end_tick("truck-01"))  # both end tick 2: at once
        both = time.monotonic() - t1
        w.leave("truck-01")
        t2 = time.monotonic()
        last = await w.end_tick("truck-00")  # alone now: no waiting for the one who left
        alone = time.monotonic() - t2
        after = await w.end_tick("truck-00")
        await asyncio.wait_for(ticks, 1)
        return [first, waited, both, alone, last, after]

    first, waited, both, alone, last, after = asyncio.run(main())
    assert first.startswith("tick 1:") and first.endswith("Tick 2 is open.")
    assert 0.25 <= waited < 1.0 and both < 0.2 and alone < 0.2
    assert last.startswith("tick 3:") and "The simulation is over after 3 ticks" in last
    assert after.startswith("The simulation is over") and w.done
    with pytest.raises(ToolError, match="the simulation is over"):
        w.place_bid("truck-00", "o1", 1.0)


# ---------------------------------------------------------------- whole runs through the runtime

def test_the_baseline_runs_every_seat_to_the_end_and_earns() -> None:
    w = LogisticsWorld(trucks=8, ticks=5)

    async def main():
        async with agentrt.Runtime(model=agentrt.ScriptedModel(lambda m, t: "done")) as rt:
            return await run_environment(rt, w, seed=3, policy="baseline")

    results = asyncio.run(main())
    assert [r.status for r in results] == ["done"] * 8, [r.error for r in results]
    assert w.done
    for r in results:
        assert r.rewards["logistics"] == pytest.approx(w.trucks[r.agent].balance - w.rules.start_balance)
        assert r.output.startswith(f"{r.agent}: profit")
    assert max(r.rewards["logistics"] for r in results) > 0
    assert sum(r.rewards["logistics"] for r in results) > 0
    assert sum(t.delivered for t in w.trucks.values()) > 0


def test_the_embedded_model_plays_without_errors() -> None:
    """2 trucks x 2 ticks on the random embedded model: the built-in tool loop (which usually
    answers at once), then `play_until_done` (a tool call every turn). The model rarely ends its
    tick, so the short tick timeout advances the world."""
    plain, playing = (LogisticsWorld(trucks=2, ticks=2, tick_timeout=t) for t in (0.3, 1.0))
    template = agentrt.Agent(name="truck", max_turns=8, budget=agentrt.Budget(tool_calls=8, turns=8, think_tokens=8),
                             sampling=agentrt.Sampling(max_tokens=40, temperature=0.8, seed=1))
    rec = agentrt.MemoryRecorder()

    async def main():
        async with agentrt.Runtime(model="tiny", recorder=rec) as rt:
            first = await run_environment(rt, plain, seed=0, agent=template)
            return first, await run_environment(rt, playing, seed=0, agent=template, policy=play_until_done(playing))

    for results in asyncio.run(main()):
        assert [r.agent for r in results] == ["truck-00", "truck-01"]
        assert all(r.status in ("done", "max_turns", "budget") for r in results), [(r.status, r.error) for r in results]
        assert all(r.spent.turns >= 1 and "logistics" in r.rewards for r in results)
    calls = [c for r in results for c in rec.of("tool_call", r.trajectory_id)]
    assert len(calls) >= 2 and {c["call"]["name"] for c in calls} <= {"status", "orders", "bid", "charge", "end_tick"}
    assert any(c["result"].ok for c in calls)  # random choices, valid calls: some of them are allowed moves
    assert plain.done and playing.done  # ticks advanced by the timeout (or end_tick), then played out


def test_the_world_imports_neither_torch_nor_textual() -> None:
    code = "import sys, agentrt.environments.logistics; print(sorted({'torch', 'textual'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_example_runs_and_records_the_trajectories(tmp_path) -> None:
    db = tmp_path / "logistics.db"
    script = Path(__file__).resolve().parents[1] / "examples" / "logistics.py"
    proc = subprocess.run([sys.executable, str(script), "--trucks", "2", "--ticks", "2", "--tick-timeout", "0.5",
                           "--turns", "6", "--max-tokens", "32", "--db", str(db)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^truck-00 +(done|max_turns|budget) ", out, re.M) and re.search(r"^truck-01 ", out, re.M)
    assert "world: 2 of 2 ticks played" in out and "prefix-cache hit rate" in out and f"trajectories: {db}" in out
    reader = StoreReader(db)
    try:
        trajectories = reader.trajectories()
        assert sorted(t.agent for t in trajectories) == ["truck-00", "truck-01"]
        assert all([r.name for r in reader.rewards(t.id)] == ["logistics"] for t in trajectories)
    finally:
        reader.close()
