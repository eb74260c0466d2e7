"""Fleet: find the least fuel-efficient van and the overdue services in a telemetry CSV, chart it,
and submit a verifiable answer.

The world writes `telemetry.csv` into its work directory: one row per van per day (`COLUMNS`) for
a fleet of one van model. The ground truth is what the documented metrics say about the file:

- efficiency: litres per 100 km over the period, `100 * sum(fuel_l) / sum(distance_km)`; exactly
  one van burns about 30-40% more than the worst of the others.
- maintenance: a van is overdue when, on the report date (the last date in the file), more than
  `SERVICE_DAYS` days or more than `SERVICE_KM` km have passed since its last service, read from its
  last row (`last_service_date`, `odometer_km - last_service_odometer_km`). Vans are generated
  clearly on one side of both limits.

Reward: 0.5 for the right least-efficient van + 0.3 x F1 of the overdue set + 0.2 for a chart that
`plot` made in this episode and that is still a valid PNG; 0 without an answer.

>>> world = FleetWorld(vehicles=12, days=30)
>>> seats = world.reset(seed=0)
>>> [t.name for t in seats[0].tools]
['load_telemetry', 'query', 'summarize', 'plot', 'submit_answer']
"""

from __future__ import annotations

import csv
import random
import re
import tempfile
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from agentrt.tools import ToolError, tool

from .base import Environment, Policy, Seat

START = date(2025, 6, 1)
SERVICE_DAYS = 180
SERVICE_KM = 15_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEAT = "fleet_manager"
COLUMNS = ["date", "vehicle_id", "distance_km", "fuel_l", "engine_hours", "idle_hours", "odometer_km",
           "last_service_date", "last_service_odometer_km"]
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Metric(str, Enum):
    """A per-vehicle figure over the period (service figures as of the report date)."""

    l_per_100km = "l_per_100km"
    distance_km = "distance_km"
    fuel_l = "fuel_l"
    engine_hours = "engine_hours"
    km_since_service = "km_since_service"
    days_since_service = "days_since_service"


DEFINITIONS = {
    Metric.l_per_100km: "100 * total fuel_l / total distance_km over the period (higher = less efficient)",
    Metric.distance_km: "total distance_km over the period",
    Metric.fuel_l: "total fuel_l over the period",
    Metric.engine_hours: "total engine_hours over the period",
    Metric.km_since_service: "odometer_km - last_service_odometer_km on the vehicle's last row",
    Metric.days_since_service: "days from last_service_date on the vehicle's last row to the report date",
}


@dataclass(frozen=True, slots=True)
class Truth:
    least_efficient: str
    overdue: frozenset[str]


# -- data -------------------------------------------------------------------------------------------

def generate(vehicles: int, days: int, rng: random.Random) -> list[dict]:
    """Telemetry rows (dicts with `COLUMNS`, date-major): one bad van, 2-4 overdue for service."""
    ids = [f"V{i:02d}" for i in range(1, vehicles + 1)]
    bad = rng.choice(ids)
    overdue = rng.sample([v for v in ids if v != bad], min(rng.randint(2, 4), vehicles - 1))
    rates = {v: rng.uniform(8.5, 10.5) for v in ids}
    rates[bad] = max(rates.values()) * rng.uniform(1.3, 1.4)
    report = START + timedelta(days=days - 1)
    per_vehicle = {}
    for v in ids:
        trips = [_day(rng, rates[v]) for _ in range(days)]
        period_km = sum(t[0] for t in trips)
        odo = rng.randint(30_000, 150_000)
        kind = ("days" if overdue.index(v) % 2 == 0 else "km") if v in overdue else "ok"
        serviced_on = rng.randint(1, days - 1) if kind == "ok" and rng.random() < 0.4 else None
        if kind == "days":
            since_days, since_km = rng.randint(200, 300), rng.uniform(period_km, 12_500)
        elif kind == "km":
            since_days, since_km = rng.randint(days + 10, 150), rng.uniform(17_000, 22_000)
        else:
            since_days, since_km = rng.randint(days + 10, 150), rng.uniform(period_km, 12_500)
        service = (report - timedelta(days=since_days), round(odo + period_km - since_km))
        rows = []
        for d, (km, fuel, hours, idle) in enumerate(trips):
            if d == serviced_on:  # serviced that morning, before driving
                service = (START + timedelta(days=d), odo)
            odo += km
            rows.append({"date": (START + timedelta(days=d)).isoformat(), "vehicle_id": v, "distance_km": km,
                         "fuel_l": fuel, "engine_hours": hours, "idle_hours": idle, "odometer_km": odo,
                         "last_service_date": service[0].isoformat(), "last_service_odometer_km": service[1]})
        per_vehicle[v] = rows
    return [per_vehicle[v][d] for d in range(days) for v in ids]


def _day(rng: random.Random, rate: float) -> tuple[int, float, float, float]:
    """(km, litres, engine hours, idle hours) of one day; about one day in ten off the road."""
    if rng.random() < 0.1:
        return 0, 0.0, 0.0, 0.0
    km = rng.randint(60, 200)
    idle = round(rng.uniform(0.0, 1.2), 1)
    fuel = km * rate / 100 * rng.uniform(0.92, 1.08) + idle * 0.8
    return km, round(fuel, 2), round(km / rng.uniform(32, 48) + idle, 2), idle


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """Rows with numbers parsed back."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("distance_km", "odometer_km", "last_service_odometer_km"):
            r[k] = int(r[k])
        for k in ("fuel_l", "engine_hours", "idle_hours"):
            r[k] = float(r[k])
    return rows


def metric_values(rows: list[dict], metric: Metric) -> dict[str, float]:
    """`metric` per vehicle (see `DEFINITIONS`), highest first."""
    report = date.fromisoformat(max(r["date"] for r in rows))
    totals: dict[str, dict[str, float]] = {}
    last: dict[str, dict] = {}
    for r in rows:
        t = totals.setdefault(r["vehicle_id"], {"distance_km": 0, "fuel_l": 0.0, "engine_hours": 0.0})
        for k in t:
            t[k] += r[k]
        if r["vehicle_id"] not in last or r["date"] >= last[r["vehicle_id"]]["date"]:
            last[r["vehicle_id"]] = r
    values = {}
    for v, t in totals.items():
        if metric is Metric.l_per_100km:
            values[v] = round(100 * t["fuel_l"] / t["distance_km"], 2) if t["distance_km"] else 0.0
        elif metric is Metric.km_since_service:
            values[v] = last[v]["odometer_km"] - last[v]["last_service_odometer_km"]
        elif metric is Metric.days_since_service:
            values[v] = (report - date.fromisoformat(last[v]["last_service_date"])).days
        else:
            values[v] = round(t[metric.value], 2)
    return dict(sorted(values.items(), key=lambda kv: (-kv[1], kv[0])))


def truth(rows: list[dict]) -> Truth:
    """The answer the metrics give for `rows`."""
    efficiency = metric_values(rows, Metric.l_per_100km)
    days, km = metric_values(rows, Metric.days_since_service), metric_values(rows, Metric.km_since_service)
    return Truth(next(iter(efficiency)), frozenset(v for v in days if days[v] > SERVICE_DAYS or km[v] > SERVICE_KM))


def f1(got: set[str], want: set[str]) -> float:
    """F1 of two sets; 1.0 when both are empty."""
    if not got and not want:
        return 1.0
    hit = len(got & want)
    return 2 * hit / (len(got) + len(want))


def is_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(8) == PNG_MAGIC
    except OSError:
        return False


def draw(path: Path, values: dict[str, float], metric: Metric) -> None:
    """A bar chart of `values`, saved as PNG with matplotlib's Agg canvas (imported here: it is heavy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(list(values), list(values.values()), color="#4878a8")
    ax.set_title(f"{metric.value}: {DEFINITIONS[metric]}", fontsize=9)
    ax.set_xlabel("vehicle")
    ax.set_ylabel(metric.value)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path, format="png")


# -- the world --------------------------------------------------------------------------------------

INSTRUCTIONS = f"""You are a fleet manager analysing a month of telemetry from delivery vans of one model.
Find (1) the least fuel-efficient van: the highest litres per 100 km over the period, and
(2) every van overdue for service: more than {SERVICE_DAYS} days or more than {SERVICE_KM} km since its
last service, as of the last date in the data. Make a chart with `plot`, then call `submit_answer`
once with the van id, the overdue van ids and the chart's path."""


class FleetWorld(Environment):
    """Van telemetry, analysis tools and one fleet-manager seat (see the module docstring).

    `vehicles` (3-99) vans over `days` (7-60) days; `workdir`: where the CSV and charts go (a
    temporary directory by default, removed with the world).
    """

    name = "fleet"

    def __init__(self, vehicles: int = 12, days: int = 30, *, workdir: str | Path | None = None):
        if not 3 <= vehicles <= 99:
            raise ValueError(f"vehicles must be between 3 and 99, got {vehicles}")
        if not 7 <= days <= 60:
            raise ValueError(f"days must be between 7 and 60 (service limits assume a short period), got {days}")
        self.vehicles, self.days = vehicles, days
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="agentrt-fleet-")
        self.workdir = Path(workdir or self._tmp.name).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.workdir / "telemetry.csv"
        self.charts: set[Path] = set()  # the PNGs plot made this episode

    def reset(self, seed: int = 0) -> list[Seat]:
        for old in self.charts:  # the last episode's charts; other files in workdir are left alone
            old.unlink(missing_ok=True)
        write_csv(self.csv_path, generate(self.vehicles, self.days, random.Random(seed)))
        self.rows = read_csv(self.csv_path)
        self.truth = truth(self.rows)
        self.answer: tuple[str, frozenset[str], Path | None] | None = None
        self.charts = set()
        task = (f"Telemetry of {self.vehicles} vans over {self.days} days is in {self.csv_path.name}. "
                "Which van is least efficient, and which are overdue for service?")
        tools = [self._load_telemetry(), self._query(), self._summarize(), self._plot(), self._submit_answer()]
        return [Seat(SEAT, INSTRUCTIONS, task, tools)]

    @property
    def done(self) -> bool:
        return self.answer is not None

    def reward(self, seat_id: str) -> float:
        _check_seat(seat_id)
        if self.answer is None:
            return 0.0
        least, overdue, chart = self.answer
        return (0.5 * (least == self.truth.least_efficient) + 0.3 * f1(set(overdue), set(self.truth.overdue))
                + 0.2 * (chart is not None and is_png(chart)))

    # -- tools ---------------------------------------------------------------------------------
    def _load_telemetry(self):
        @tool
        def load_telemetry() -> dict:
            """Describe the telemetry file: columns, row count, vehicles and period."""
            dates = [r["date"] for r in self.rows]
            return {"file": self.csv_path.name, "rows": len(self.rows), "columns": COLUMNS,
                    "vehicles": sorted({r["vehicle_id"] for r in self.rows}), "period": [min(dates), max(dates)],
                    "service_rule": f"overdue: > {SERVICE_DAYS} days or > {SERVICE_KM} km since last service"}
        return load_telemetry

    def _query(self):
        @tool
        def query(vehicle_id: str | None = None, columns: list[str] | None = None, limit: int = 20) -> str:
            """Rows of the telemetry as CSV text, in date order.

            Args:
                vehicle_id: Only this vehicle's rows (e.g. "V03"); all vehicles when omitted.
                columns: The columns to show; all when omitted.
                limit: At most this many rows (1-500), the latest ones.
            """
            wanted = self._vehicle(vehicle_id) if vehicle_id else None
            rows = [r for r in self.rows if r["vehicle_id"] == wanted] if wanted else self.rows
            if unknown := [c for c in columns or [] if c not in COLUMNS]:
                raise ToolError(f"unknown columns {unknown}; the columns are {COLUMNS}")
            if not 1 <= limit <= 500:
                raise ToolError(f"limit must be between 1 and 500, got {limit}")
            cols = columns or COLUMNS
            shown = rows[-limit:]
            lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in shown]
            return "\n".join(lines) + f"\n[{len(shown)} of {len(rows)} rows]"
        return query

    def _summarize(self):
        @tool
        def summarize(metric: Metric) -> dict:
            """One figure per vehicle, highest first.

            Args:
                metric: l_per_100km, distance_km, fuel_l, engine_hours (over the period), or
                    km_since_service, days_since_service (as of the last date in the data).
            """
            return {"metric": metric.value, "definition": DEFINITIONS[metric],
                    "values": metric_values(self.rows, metric)}
        return summarize

    def _plot(self):
        @tool(side_effects=True, timeout=60.0)
        def plot(metric: Metric, path_name: str) -> str:
            """Draw a bar chart of a metric per vehicle into a PNG file in the work directory.

            Args:
                metric: The figure to chart (as in summarize).
                path_name: A file name such as "efficiency.png": letters, digits, '_', '-', '.'; no folders.
            """
            if not SAFE_NAME.match(path_name) or ".." in path_name:
                raise ToolError(f"path_name {path_name!r} is not a plain file name: use letters, digits, '_', "
                                "'-' and '.' (up to 64), no folders, e.g. 'efficiency.png'")
            suffix = Path(path_name).suffix.lower()
            if suffix not in ("", ".png"):
                raise ToolError(f"path_name {path_name!r} must end in .png (or have no extension); charts are PNG")
            path = self.workdir / (path_name if suffix else path_name + ".png")
            draw(path, metric_values(self.rows, metric), metric)
            self.charts.add(path)
            return str(path)
        return plot

    def _submit_answer(self):
        @tool(side_effects=True)
        async def submit_answer(least_efficient: str, overdue: list[str], chart: str) -> str:
            """Submit the final answer (once).

            Args:
                least_efficient: The id of the least fuel-efficient vehicle, e.g. "V07".
                overdue: The ids of all vehicles overdue for service ([] if none).
                chart: The path `plot` returned (or its file name); "" for no chart.
            """
            if self.answer is not None:
                raise ToolError("an answer was already submitted; the episode is over")
            least = self._vehicle(least_efficient)
            due = frozenset(self._vehicle(v) for v in overdue)
            path = self._chart(chart) if chart else None
            self.answer = (least, due, path)
            shown = path.name if path else "none"
            return f"answer recorded: least efficient {least}, {len(due)} overdue, chart {shown}"
        return submit_answer

    def _vehicle(self, vehicle_id: str) -> str:
        v = vehicle_id.strip().upper()
        known = sorted({r["vehicle_id"] for r in self.rows})
        if v not in known:
            raise ToolError(f"unknown vehicle {vehicle_id!r}; the vehicles are {', '.join(known)}")
        return v

    def _chart(self, chart: str) -> Path:
        path = (self.workdir / (chart if Path(chart).suffix else chart + ".png")).resolve()  # absolute stays
        if path not in self.charts:
            made = ", ".join(sorted(str(p) for p in self.charts)) or "none yet; call plot first"
            raise ToolError(f"chart {chart!r} was not made by plot in this episode; charts: {made}")
        return path

    # -- the scripted baseline -----------------------------------------------------------------
    def baseline(self, seat_id: str) -> Policy:
        _check_seat(seat_id)

        async def policy(ctx: Any) -> str:
            async def value(name: str, **args: Any) -> Any:
                result = await ctx.call_tool(name, args)
                if not result.ok:
                    raise RuntimeError(f"baseline call {name} failed: {result.content}")
                return result.value

            await value("load_telemetry")
            efficiency = (await value("summarize", metric="l_per_100km"))["values"]
            days = (await value("summarize", metric="days_since_service"))["values"]
            km = (await value("summarize", metric="km_since_service"))["values"]
            overdue = sorted(v for v in days if days[v] > SERVICE_DAYS or km[v] > SERVICE_KM)
            chart = await value("plot", metric="l_per_100km", path_name="efficiency.png")
            least = max(efficiency, key=efficiency.get)
            return await value("submit_answer", least_efficient=least, overdue=overdue, chart=chart)
        return policy


def _check_seat(seat_id: str) -> None:
    if seat_id != SEAT:
        raise KeyError(f"the fleet world has one seat, {SEAT!r}; got {seat_id!r}")
