"""The fleet world: seeded telemetry whose ground truth is what the documented metrics say, the
tools (plot writes real PNGs, names are checked), the reward on right, wrong and partial answers,
and the baseline and the embedded model run through the runtime."""

from __future__ import annotations

import asyncio
import csv
from collections import defaultdict
from datetime import date

import pytest

from agentrt import Runtime, ScriptedModel
from agentrt.environments import run_environment
from agentrt.environments.fleet import COLUMNS, PNG_MAGIC, SERVICE_DAYS, SERVICE_KM, FleetWorld, f1
from agentrt.tools import ToolRegistry


def call(registry: ToolRegistry, name: str, **arguments):
    return asyncio.run(registry.dispatch({"id": "c", "name": name, "arguments": arguments}))


def recompute(path):
    """The ground truth straight from the CSV, independently of the world's code."""
    fuel, km, last = defaultdict(float), defaultdict(float), {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        fuel[r["vehicle_id"]] += float(r["fuel_l"])
        km[r["vehicle_id"]] += float(r["distance_km"])
        last[r["vehicle_id"]] = r  # rows are in date order
    report = date.fromisoformat(max(r["date"] for r in rows))
    rate = {v: 100 * fuel[v] / km[v] for v in fuel}
    overdue = {v for v, r in last.items()
               if (report - date.fromisoformat(r["last_service_date"])).days > SERVICE_DAYS
               or int(r["odometer_km"]) - int(r["last_service_odometer_km"]) > SERVICE_KM}
    return rows, rate, overdue


@pytest.mark.parametrize("vehicles, days, seed", [(12, 30, 0), (12, 30, 1), (3, 7, 2), (40, 60, 3)])
def test_the_ground_truth_is_what_the_metrics_say(vehicles, days, seed):
    world = FleetWorld(vehicles, days)
    world.reset(seed)
    rows, rate, overdue = recompute(world.csv_path)
    assert list(rows[0]) == COLUMNS and len(rows) == vehicles * days
    worst, second = sorted(rate.values(), reverse=True)[:2]
    assert max(rate, key=rate.get) == world.truth.least_efficient and worst > 1.15 * second  # one clear outlier
    assert overdue == world.truth.overdue and 2 <= len(overdue) <= 4
    odometers = defaultdict(list)
    for r in rows:
        odometers[r["vehicle_id"]].append(int(r["odometer_km"]))
        assert r["last_service_date"] <= r["date"] and int(r["last_service_odometer_km"]) <= int(r["odometer_km"])
    assert all(o == sorted(o) for o in odometers.values())


def test_generation_is_deterministic_per_seed(tmp_path):
    a, b, c = FleetWorld(workdir=tmp_path / "a"), FleetWorld(workdir=tmp_path / "b"), FleetWorld()
    a.reset(5), b.reset(5), c.reset(6)
    assert a.csv_path.read_bytes() == b.csv_path.read_bytes() != c.csv_path.read_bytes()


def test_reward_on_right_wrong_and_partial_answers():
    world = FleetWorld()
    (seat,) = world.reset(0)
    tools = ToolRegistry(seat.tools)
    assert world.reward("fleet_manager") == 0.0 and not world.done  # no answer yet
    least, overdue = world.truth.least_efficient, sorted(world.truth.overdue)
    wrong = next(v for v in sorted(world.truth.overdue) if v != least)
    chart = call(tools, "plot", metric="l_per_100km", path_name="eff").value

    def score(least_efficient, due, chart_path):
        world.answer = None
        result = call(tools, "submit_answer", least_efficient=least_efficient, overdue=due, chart=chart_path)
        assert result.ok, result.content
        return world.reward("fleet_manager")

    assert score(least, overdue, chart) == pytest.approx(1.0)
    assert score(least.lower(), overdue, "eff.png") == pytest.approx(1.0)  # ids and names are forgiving
    assert score(wrong, overdue, chart) == pytest.approx(0.5)
    assert score(least, overdue[:1], chart) == pytest.approx(0.5 + 0.3 * f1(set(overdue[:1]), set(overdue)) + 0.2)
    assert score(least, overdue + [least], "") == pytest.approx(0.5 + 0.3 * f1(set(overdue) | {least}, set(overdue)))
    assert score(wrong, [], "") == 0.0
    assert f1(set(), set()) == 1.0 and f1({"a", "b"}, {"b"}) == pytest.approx(2 / 3)
    again = call(tools, "submit_answer", least_efficient=least, overdue=overdue, chart=chart)
    assert again.error == "tool_error" and "already submitted" in again.content


def test_tools_validate_and_plot_writes_png(tmp_path):
    world = FleetWorld(vehicles=5, days=10, workdir=tmp_path)
    (seat,) = world.reset(1)
    tools = ToolRegistry(seat.tools)
    info = call(tools, "load_telemetry").value
    assert info["rows"] == 50 and info["vehicles"] == ["V01", "V02", "V03", "V04", "V05"]
    text = call(tools, "query", vehicle_id="v02", columns=["date", "distance_km"], limit=3).content
    assert text.splitlines()[0] == "date,distance_km" and text.endswith("[3 of 10 rows]")
    assert "the vehicles are V01" in call(tools, "query", vehicle_id="V9").content
    assert "unknown columns ['speed']" in call(tools, "query", columns=["speed"]).content
    assert "between 1 and 500" in call(tools, "query", limit=0).content
    values = call(tools, "summarize", metric="l_per_100km").value["values"]
    assert list(values)[0] == world.truth.least_efficient
    path = call(tools, "plot", metric="km_since_service", path_name="service.png").value
    assert path == str(tmp_path.resolve() / "service.png")
    assert (tmp_path / "service.png").read_bytes()[:8] == PNG_MAGIC
    for bad in ("../x.png", "sub/x.png", "/tmp/x.png", ".hidden", "x.jpg", ""):
        result = call(tools, "plot", metric="fuel_l", path_name=bad)
        assert result.error == "tool_error", bad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["service.png", "telemetry.csv"]
    (tmp_path / "notes.png").write_text("not a png")
    for chart in ("notes.png", "/etc/passwd", "../service.png"):
        result = call(tools, "submit_answer", least_efficient="V01", overdue=[], chart=chart)
        assert result.error == "tool_error" and "not made by plot" in result.content, chart
    assert "unknown vehicle 'V77'" in call(tools, "submit_answer", least_efficient="V77", overdue=[], chart="").content
    assert not world.done
    right = world.truth.least_efficient, sorted(world.truth.overdue)
    assert call(tools, "submit_answer", least_efficient=right[0], overdue=right[1], chart="service").ok
    assert world.done and world.reward("fleet_manager") == pytest.approx(1.0)
    (tmp_path / "service.png").write_text("overwritten")  # no longer a PNG: no chart credit
    assert world.reward("fleet_manager") == pytest.approx(0.8)
    world.reset(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png", "telemetry.csv"]  # old charts removed


def test_the_baseline_through_the_runtime_scores_one():
    world = FleetWorld()

    async def main():
        async with Runtime(model=ScriptedModel(lambda messages, tools: "done")) as rt:
            return await run_environment(rt, world, seed=0, policy="baseline")

    (result,) = asyncio.run(main())
    assert result.status == "done", result.error
    assert world.done and result.rewards["fleet"] == 1.0
    assert result.spent.tool_calls == 6
