"""The logistics world: electric delivery trucks bid for orders on a city road graph.

    >>> world = LogisticsWorld(trucks=4, ticks=6)                        # doctest: +SKIP
    >>> results = await run_environment(rt, world, seed=0, policy="baseline")

Rules (all numbers are `Rules` fields; every random draw comes from `random.Random(seed)`, so a
seed fixes the map, the trucks' starts and the whole order stream, whatever the agents do):

- The city: a `grid` of intersections `block_km` apart, each moved a little; roads join
  neighbours (and a few diagonals), some are removed while the graph stays connected; a road's
  length in km is the straight distance times a detour factor. Trucks drive shortest paths.
  Some nodes are charging `stations`, some are `depots` (trucks start there, round robin, and
  about half of all pickups are there).
- A truck (one per seat, `truck-00`, `truck-01`, ...) has a node, a `capacity_kg`, a battery of
  `battery_kwh` (it starts 60-100% full) draining `kwh_per_km`, and a balance starting at
  `start_balance`. Driving also costs `km_cost` money per km. A truck cannot drive a leg its
  battery does not cover: with an empty battery it never moves again.
- Orders appear every tick (`orders_per_tick`): pickup node, dropoff node, load in kg, a max
  price, and the last tick it can be won (`until`, at most `order_life` ticks after it appears).
- Each tick is a sealed-bid auction. Trucks `bid(order_id, price)`; a new bid on the same order
  replaces the old one. When the tick ends, open orders are resolved in id order, each going to
  its lowest VALID bid, ties to the lower truck id. Valid: price <= the order's max price, the
  load fits in what is left of the truck's capacity this tick, and the battery covers the drive
  from where the truck's route this tick ends so far, to the pickup, then to the dropoff. A
  truck may win several orders: it serves them in that order, one tour, all within the tick
  (a tick is a shift), and is paid its bid price on each delivery.
- `charge()`: after this tick's deliveries the truck drives to its nearest station (if the
  battery reaches it) and charges `charge_kwh` (at most to full) at `energy_price` per kWh.
  The balance may go negative.
- Reward of a seat: its truck's profit, final balance - `start_balance`.

Ticks advance when every active seat called `end_tick()` or `tick_timeout` seconds passed.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field

import networkx as nx

from agentrt.tools import ToolError, tool

from .base import Environment, Policy, Seat, play_until_done  # noqa: F401  (re-exported: used with this world)

EPS = 1e-9


@dataclass(slots=True)
class Rules:
    """The numbers of the world; `orders_per_tick=None` means 3 per 4 trucks (at least 2)."""

    grid: tuple[int, int] = (5, 6)
    block_km: float = 2.0
    stations: int = 4
    depots: int = 3
    capacity_kg: float = 100.0
    battery_kwh: float = 30.0
    kwh_per_km: float = 0.5
    charge_kwh: float = 15.0
    energy_price: float = 0.3
    km_cost: float = 0.1
    start_balance: float = 100.0
    orders_per_tick: int | None = None
    order_life: int = 3
    listed: int = 6  # orders() shows this many, nearest first

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if rows < 2 or cols < 2:
            raise ValueError(f"grid={self.grid}: need at least 2 x 2 intersections")
        if not 1 <= self.stations <= rows * cols or not 1 <= self.depots <= rows * cols:
            raise ValueError(f"stations={self.stations} and depots={self.depots} must be between 1 and {rows * cols}")
        positive = ("block_km", "capacity_kg", "battery_kwh", "kwh_per_km", "charge_kwh", "order_life", "listed")
        if bad := [f"{k}={getattr(self, k)}" for k in positive if not getattr(self, k) > 0]:
            raise ValueError(f"{', '.join(bad)}: must be > 0")
        if self.energy_price < 0 or self.km_cost < 0:
            raise ValueError(f"energy_price={self.energy_price} and km_cost={self.km_cost} must be >= 0")
        if self.orders_per_tick is not None and self.orders_per_tick < 0:
            raise ValueError(f"orders_per_tick={self.orders_per_tick} must be >= 0 (or None)")

    @property
    def cost_per_km(self) -> float:
        """What a km really costs: the energy (bought when charging) plus `km_cost`."""
        return self.kwh_per_km * self.energy_price + self.km_cost


@dataclass(slots=True)
class City:
    graph: nx.Graph  # nodes 0..n-1; edge attribute "km"
    km: dict[int, dict[int, float]]  # shortest-path length between every pair of nodes
    stations: list[int]
    depots: list[int]

    def nearest_station(self, node: int) -> tuple[int, float]:
        return min(((s, self.km[node][s]) for s in self.stations), key=lambda sk: (sk[1], sk[0]))

    def route_km(self, *nodes: int) -> float:
        return sum(self.km[a][b] for a, b in zip(nodes, nodes[1:]))


def build_city(rng: random.Random, rules: Rules) -> City:
    """A perturbed grid of roads (see the module docstring), connected, the same for a seed."""
    rows, cols = rules.grid
    b = rules.block_km
    g = nx.Graph()
    for r in range(rows):
        for c in range(cols):
            g.add_node(r * cols + c, x=c * b + rng.uniform(-0.3, 0.3) * b, y=r * b + rng.uniform(-0.3, 0.3) * b)

    def road(u: int, v: int) -> None:
        dx, dy = g.nodes[u]["x"] - g.nodes[v]["x"], g.nodes[u]["y"] - g.nodes[v]["y"]
        g.add_edge(u, v, km=round(math.hypot(dx, dy) * rng.uniform(1.0, 1.25), 1))

    for r in range(rows):
        for c in range(cols):
            n = r * cols + c
            if c + 1 < cols:
                road(n, n + 1)
            if r + 1 < rows:
                road(n, n + cols)
            if r + 1 < rows and c + 1 < cols and rng.random() < 0.15:
                road(n, n + cols + 1)
    edges = sorted(g.edges())
    rng.shuffle(edges)
    for u, v in edges[: len(edges) // 8]:  # close some roads, never cutting the city in two
        km = g.edges[u, v]["km"]
        g.remove_edge(u, v)
        if not nx.is_connected(g):
            g.add_edge(u, v, km=km)
    km = {u: {v: round(d, 1) for v, d in lengths.items()}
          for u, lengths in nx.all_pairs_dijkstra_path_length(g, weight="km")}
    nodes = sorted(g.nodes)
    return City(g, km, sorted(rng.sample(nodes, rules.stations)), sorted(rng.sample(nodes, rules.depots)))


@dataclass(slots=True)
class Order:
    id: str
    tick: int  # the tick it appears
    until: int  # the last tick it can be won
    pickup: int
    dropoff: int
    kg: float
    max_price: float
    winner: str | None = None
    price: float = 0.0

    def view(self, city: City, node: int, rules: Rules) -> dict:
        km = city.route_km(node, self.pickup, self.dropoff)
        return {"id": self.id, "pickup": self.pickup, "dropoff": self.dropoff, "kg": self.kg, "max_price": self.max_price,
                "km": round(km, 1), "kwh": round(km * rules.kwh_per_km, 1), "until": self.until}


@dataclass(slots=True)
class Truck:
    id: str
    node: int
    battery: float
    balance: float
    bids: dict[str, float] = field(default_factory=dict)  # order id -> price, this tick
    charging: bool = False
    delivered: int = 0
    km: float = 0.0
    reports: dict[int, str] = field(default_factory=dict)  # tick -> what happened


class LogisticsWorld(Environment):
    """Trucks (one per seat) bid for delivery orders tick by tick; reward = profit.

    `trucks` seats, `ticks` auctions, `tick_timeout` seconds at most per tick, `rules` the numbers.
    After `reset(seed)`: `city`, `trucks` (id -> Truck), `orders` (id -> Order, every tick's,
    made up front), `tick` (1-based; `ticks + 1` once done). `place_bid`, `request_charge` and
    `advance` are the rules; the seat tools are thin async wrappers of them.
    """

    name = "logistics"

    def __init__(self, trucks: int = 16, ticks: int = 8, *, tick_timeout: float = 5.0, rules: Rules | None = None):
        if trucks < 1 or ticks < 1 or not tick_timeout > 0:
            raise ValueError(f"trucks={trucks}, ticks={ticks} must be >= 1 and tick_timeout={tick_timeout} > 0")
        self.n_trucks, self.ticks, self.tick_timeout = trucks, ticks, tick_timeout
        self.rules = rules or Rules()
        self.reset(0)

    # -- Environment -------------------------------------------------------------------------------
    def reset(self, seed: int = 0) -> list[Seat]:
        rules, rng = self.rules, random.Random(seed)
        self.seed = seed
        self.city = city = build_city(rng, rules)
        self.trucks = {}
        for i in range(self.n_trucks):
            tid = f"truck-{i:02d}"
            battery = round(rules.battery_kwh * rng.uniform(0.6, 1.0), 1)
            self.trucks[tid] = Truck(tid, city.depots[i % len(city.depots)], battery, rules.start_balance)
        per_tick = rules.orders_per_tick if rules.orders_per_tick is not None else max(2, 3 * self.n_trucks // 4)
        nodes = sorted(city.graph.nodes)
        self.orders: dict[str, Order] = {}
        for t in range(1, self.ticks + 1):
            for _ in range(per_tick):
                pickup = rng.choice(city.depots) if rng.random() < 0.5 else rng.choice(nodes)
                dropoff = rng.choice([n for n in nodes if n != pickup])
                price = round(3.0 + city.km[pickup][dropoff] * rng.uniform(0.5, 0.9), 1)
                oid = f"o{len(self.orders) + 1}"
                self.orders[oid] = Order(oid, t, t + rng.randrange(rules.order_life), pickup, dropoff,
                                         float(rng.randint(1, 12) * 5), price)
        self.tick = 1
        self.ended: set[str] = set()
        self.left: set[str] = set()
        self._changed: asyncio.Event | None = None  # asyncio objects: made lazily, in the running loop
        self._advanced: dict[int, asyncio.Event] = {}
        self.failure: str | None = None  # why run_ticks stopped early
        return [Seat(tid, INSTRUCTIONS, self._task(t), self._tools(tid)) for tid, t in self.trucks.items()]

    @property
    def done(self) -> bool:
        return self.tick > self.ticks

    def reward(self, seat_id: str) -> float:
        """The truck's profit: its balance now minus `start_balance`, to the cent."""
        return round(self._truck(seat_id).balance - self.rules.start_balance, 2)

    def baseline(self, seat_id: str) -> Policy:
        self._truck(seat_id)
        return baseline_policy

    # -- the rules ---------------------------------------------------------------------------------
    def open_orders(self) -> list[Order]:
        """Orders that can be bid on now, in id order."""
        return [o for o in self.orders.values() if o.tick <= self.tick <= o.until and o.winner is None]

    def place_bid(self, truck_id: str, order_id: str, price: float) -> str:
        """A bid for this tick's auction; ToolError when it could never win."""
        truck, r = self._truck(truck_id), self.rules
        self._check_open()
        order = self.orders.get(order_id)
        if order is None or order.tick > self.tick:
            ids = ", ".join(o.id for o in self.open_orders()[:8]) or "none"
            raise ToolError(f"no order {order_id!r}; open now: {ids} (call orders())")
        if order.winner is not None or order.until < self.tick:
            raise ToolError(f"order {order_id} is closed ({'won by ' + order.winner if order.winner else 'expired'}); "
                            "call orders() for open ones")
        if not math.isfinite(price) or price <= 0:
            raise ToolError(f"price must be a positive number, got {price}")
        if price > order.max_price + EPS:
            raise ToolError(f"price {price:g} is above the max price of {order_id} ({order.max_price:g}); "
                            f"bid at most {order.max_price:g}")
        if order.kg > r.capacity_kg:
            raise ToolError(f"{order_id} weighs {order.kg:g} kg, more than your capacity of {r.capacity_kg:g} kg")
        need = self.city.route_km(truck.node, order.pickup, order.dropoff) * r.kwh_per_km
        if need > truck.battery + EPS:
            raise ToolError(f"{order_id} needs {need:.1f} kWh, your battery has {truck.battery:.1f}; charge() first")
        truck.bids[order_id] = float(price)
        return f"bid {price:g} on {order_id}: the auction resolves when tick {self.tick} ends"

    def request_charge(self, truck_id: str) -> str:
        truck, r = self._truck(truck_id), self.rules
        self._check_open()
        if truck.battery >= r.battery_kwh - EPS:
            raise ToolError(f"the battery is full ({truck.battery:.1f} kWh)")
        station, km = self.city.nearest_station(truck.node)
        if km * r.kwh_per_km > truck.battery + EPS:
            raise ToolError(f"stranded: {truck.battery:.1f} kWh cannot reach station {station} ({km:g} km)")
        truck.charging = True
        return (f"after this tick's deliveries you drive to the nearest station (now {station}, {km:g} km) and "
                f"charge up to {r.charge_kwh:g} kWh at {r.energy_price:g}/kWh")

    def advance(self) -> None:
        """Play the current tick: the auction, the deliveries, the charging; then open the next."""
        if self.done:
            return
        r, notes = self.rules, {tid: [] for tid in self.trucks}
        won = self._auction(notes)
        for tid, truck in self.trucks.items():
            start_km, delivered = truck.km, []
            for order in won[tid]:
                self._drive(truck, order.pickup, order.dropoff)
                truck.balance += order.price
                truck.delivered += 1
                delivered.append(f"{order.id} +{order.price:g}")
            if delivered:
                notes[tid].append(f"delivered {', '.join(delivered)}")
            if truck.charging:
                notes[tid].append(self._charge(truck))
            if truck.km > start_km:
                notes[tid].append(f"drove {truck.km - start_km:.1f} km")
            notes[tid].append(f"now at {truck.node}, battery {truck.battery:.1f}/{r.battery_kwh:g} kWh, "
                              f"balance {truck.balance:.2f}")
            truck.reports[self.tick] = f"tick {self.tick}: " + "; ".join(notes[tid])
            truck.bids.clear()
            truck.charging = False
        self.ended.clear()
        if event := self._advanced.pop(self.tick, None):
            event.set()
        self.tick += 1

    def _auction(self, notes: dict[str, list[str]]) -> dict[str, list[Order]]:
        """Each open order, in id order, to its lowest valid bid (ties: lower truck id)."""
        r = self.rules
        won: dict[str, list[Order]] = {tid: [] for tid in self.trucks}
        plan = {tid: [t.node, t.battery, r.capacity_kg] for tid, t in self.trucks.items()}  # end node, kWh, kg left
        for order in self.open_orders():
            bids = sorted((t.bids[order.id], tid) for tid, t in self.trucks.items() if order.id in t.bids)
            for price, tid in bids:
                node, kwh, kg = plan[tid]
                need = self.city.route_km(node, order.pickup, order.dropoff) * r.kwh_per_km
                why = ("above the max price" if price > order.max_price + EPS else
                       "over capacity" if order.kg > kg + EPS else
                       "not enough battery" if need > kwh + EPS else None)
                if order.winner is not None:
                    notes[tid].append(f"lost {order.id} ({order.winner} bid {order.price:g})")
                elif why:
                    notes[tid].append(f"lost {order.id} ({why})")
                else:
                    order.winner, order.price = tid, price
                    plan[tid] = [order.dropoff, kwh - need, kg - order.kg]
                    won[tid].append(order)
                    notes[tid].append(f"won {order.id} at {price:g}")
        return won

    def _drive(self, truck: Truck, *stops: int) -> None:
        km = self.city.route_km(truck.node, *stops)
        truck.battery = max(0.0, truck.battery - km * self.rules.kwh_per_km)
        truck.balance -= km * self.rules.km_cost
        truck.km += km
        truck.node = stops[-1]

    def _charge(self, truck: Truck) -> str:
        r = self.rules
        station, km = self.city.nearest_station(truck.node)
        if km * r.kwh_per_km > truck.battery + EPS:
            return f"could not reach station {station} ({km:g} km) to charge"
        self._drive(truck, station)
        kwh = min(r.charge_kwh, r.battery_kwh - truck.battery)
        truck.battery += kwh
        truck.balance -= kwh * r.energy_price
        return f"charged {kwh:.1f} kWh at {station} (-{kwh * r.energy_price:.2f})"

    def status(self, truck_id: str) -> dict:
        truck, r = self._truck(truck_id), self.rules
        station, km = self.city.nearest_station(truck.node)
        return {"truck": truck.id, "tick": min(self.tick, self.ticks), "ticks": self.ticks, "over": self.done,
                "node": truck.node, "battery_kwh": round(truck.battery, 1), "battery_max_kwh": r.battery_kwh,
                "capacity_kg": r.capacity_kg, "balance": round(truck.balance, 2),
                "profit": self.reward(truck_id), "cost_per_km": round(r.cost_per_km, 3),
                "station": station, "station_km": km, "bids": dict(truck.bids), "charging": truck.charging}

    def order_views(self, truck_id: str) -> list[dict]:
        """The open orders as a truck sees them: nearest first (km it would drive), `rules.listed` at most."""
        self._check_open()
        node = self._truck(truck_id).node
        views = [o.view(self.city, node, self.rules) for o in self.open_orders()]
        return sorted(views, key=lambda v: (v["km"], int(v["id"][1:])))[: self.rules.listed]

    def _check_open(self) -> None:
        if self.done:
            raise ToolError("the simulation is over; give your final answer")

    def _truck(self, truck_id: str) -> Truck:
        if truck_id not in self.trucks:
            raise KeyError(f"no truck {truck_id!r}; trucks: {', '.join(self.trucks)}")
        return self.trucks[truck_id]

    def _task(self, truck: Truck) -> str:
        return (f"You are {truck.id} at node {truck.node}, battery {truck.battery:g}/{self.rules.battery_kwh:g} kWh, "
                f"balance {truck.balance:g}. {self.ticks} ticks. Earn as much as you can.")

    # -- ticks -------------------------------------------------------------------------------------
    def leave(self, seat_id: str) -> None:
        self.left.add(seat_id)
        if self._changed is not None:
            self._changed.set()

    async def end_tick(self, truck_id: str) -> str:
        """End the seat's tick, wait until the world advanced, and say what happened."""
        truck = self._truck(truck_id)
        if self.done:
            return self._over(truck)
        tick = self.tick
        advanced = self._advanced.setdefault(tick, asyncio.Event())
        self.ended.add(truck_id)
        self._changed_event().set()
        await advanced.wait()
        if tick not in truck.reports:
            raise RuntimeError(f"the world's tick loop stopped: {self.failure}")
        report = truck.reports[tick]
        return f"{report}. " + (self._over(truck) if self.done else f"Tick {self.tick} is open.")

    async def run_ticks(self) -> None:
        loop, changed = asyncio.get_running_loop(), self._changed_event()
        try:
            while not self.done:
                deadline = loop.time() + self.tick_timeout
                while not all(tid in self.ended or tid in self.left for tid in self.trucks):
                    changed.clear()
                    try:
                        async with asyncio.timeout_at(deadline):
                            await changed.wait()
                    except TimeoutError:
                        break
                self.advance()
                if not self.left.issuperset(self.trucks):  # with every seat gone the rest plays out at once
                    await asyncio.sleep(0)  # let the seats that waited read their reports
        except BaseException as e:  # a bug or a cancellation: seats waiting in end_tick must not hang
            self.failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            for event in self._advanced.values():
                event.set()
            raise

    def _changed_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _over(self, truck: Truck) -> str:
        return (f"The simulation is over after {self.ticks} ticks: profit {self.reward(truck.id):+.2f}. "
                "Give your final answer now.")

    # -- the seat's tools --------------------------------------------------------------------------
    def _tools(self, truck_id: str) -> list:
        world = self

        async def status() -> dict:
            """Your truck: node, battery, balance, profit, tick, bids."""
            return world.status(truck_id)

        async def orders() -> list[dict]:
            """Open orders, nearest first, with the km and kWh you would drive."""
            return world.order_views(truck_id)

        async def bid(order_id: str, price: float) -> str:
            """Bid on an order; the lowest valid bid wins when the tick ends.

            Args:
                order_id: An open order's id, e.g. "o3".
                price: At most the order's max_price.
            """
            return world.place_bid(truck_id, order_id, price)

        async def charge() -> str:
            """Charge at the nearest station after this tick's deliveries."""
            return world.request_charge(truck_id)

        async def end_tick() -> str:
            """End your tick; returns what happened."""
            return await world.end_tick(truck_id)

        wait = max(30.0, 3 * self.tick_timeout)  # end_tick waits up to a tick; the registry default is 30 s
        return [tool(status), tool(orders), tool(bid), tool(charge), tool(end_tick, timeout=wait)]


INSTRUCTIONS = ("You drive an electric delivery truck in a city. Each tick: orders() lists open orders; "
                "bid(order_id, price) on ones you can serve (lowest valid bid wins, paid on delivery; driving "
                "costs money and battery); charge() when the battery is low; then end_tick(). Repeat until "
                "end_tick says the simulation is over, then answer with your profit.")

LOW_BATTERY = 0.4  # the baseline charges below this fraction of a full battery
MARKUP, FEE, RESERVE_KWH, MAX_BIDS = 1.25, 1.0, 3.0, 3


async def baseline_policy(ctx) -> str:
    """Cost-plus bids on the nearest orders the truck can carry; charge when low; end the tick."""
    while True:
        st = (await ctx.call_tool("status")).value
        if st["over"]:
            break
        if st["battery_kwh"] < LOW_BATTERY * st["battery_max_kwh"] and st["tick"] < st["ticks"]:
            await ctx.call_tool("charge")
        else:
            kg, kwh, bids = 0.0, 0.0, 0
            for o in (await ctx.call_tool("orders")).value or []:
                cost = o["km"] * st["cost_per_km"]
                price = round(min(o["max_price"], cost * MARKUP + FEE), 2)
                fits = kg + o["kg"] <= st["capacity_kg"] and kwh + o["kwh"] <= st["battery_kwh"] - RESERVE_KWH
                if fits and price > cost + 0.1:
                    if (await ctx.call_tool("bid", {"order_id": o["id"], "price": price})).ok:
                        kg, kwh, bids = kg + o["kg"], kwh + o["kwh"], bids + 1
                if bids == MAX_BIDS:
                    break
        await ctx.call_tool("end_tick")
    return f"{st['truck']}: profit {st['profit']:+.2f}, balance {st['balance']:.2f}, battery {st['battery_kwh']} kWh"
