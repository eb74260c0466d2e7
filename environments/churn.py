"""Churn: find the customers about to leave in a SQLite database and win them back with emails a
rule-based reviewer approves.

The world writes `customers.db` (tables `customers` and `tickets`, made with `random.Random(seed)`)
into its work directory. Each customer carries a hidden churn label: the risk points of
`risk_points` (inactivity, recent support tickets, low NPS, short tenure, failed payments, low
feature use) plus a seeded noise of -1, 0 or +1 (8% each way), at risk when the sum reaches
`RISK_THRESHOLD`. The agent queries the database (`sql`), submits a strategy and an email per
customer (`submit`), revises rejected emails (at most `max_attempts` reviews per customer) and calls
`finish`. The reviewer (`review`) and the score (`rubric`) are pure functions of the outcome.

>>> world = ChurnWorld(customers=200)
>>> seats = world.reset(seed=0)
>>> [t.name for t in seats[0].tools]
['sql', 'submit', 'finish']
>>> results = await run_environment(rt, world, policy="baseline")   # doctest: +SKIP
>>> results[0].rewards["churn"]                                    # doctest: +SKIP
0.98
"""

from __future__ import annotations

import random
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from agentrt.tools import ToolError, tool
from agentrt.tools.builtin import sql_query

from .base import Environment, Policy, Seat

TODAY = date(2025, 6, 30)  # the database's "now": last logins and tickets are dated before it
RISK_THRESHOLD = 4
MAX_EMAIL_CHARS = 600
SEAT = "analyst"

FIRST = ["Ada", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Lars",
         "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Ximena",
         "Yusuf", "Zoe", "Anil", "Beatriz", "Carlos", "Dana"]
LAST = ["Abbott", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ivanova", "Jensen",
        "Kowalski", "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quist", "Rossi", "Sato", "Tanaka"]
SEGMENTS = {"consumer": 55, "smb": 30, "enterprise": 15}
PLANS = ["basic", "pro", "premium"]  # in price order: a downgrade goes one step left
PLAN_WEIGHTS = {"consumer": [5, 3, 2], "smb": [3, 5, 2], "enterprise": [0, 4, 6]}
PLAN_PRICE = {"basic": 19.0, "pro": 49.0, "premium": 99.0}
TICKET_TOPICS = ["billing", "login", "bug", "how-to", "performance", "integration"]


class Strategy(str, Enum):
    """A win-back strategy; `none` records a decision not to contact (and withdraws an approval)."""

    discount = "discount"
    plan_downgrade = "plan_downgrade"
    personal_call = "personal_call"
    feature_training = "feature_training"
    none = "none"


# What an email must offer for each strategy (case-insensitive), and must not offer for the others.
OFFERS = {
    Strategy.discount: re.compile(r"\bdiscount|\d+\s?% off\b", re.I),
    Strategy.plan_downgrade: re.compile(r"\bdowngrad", re.I),
    Strategy.personal_call: re.compile(r"\b(personal|phone) call\b|\bcall you\b", re.I),
    Strategy.feature_training: re.compile(r"\btraining\b|\bonboarding session\b|\bwalkthrough\b", re.I),
}
PLACEHOLDER = re.compile(r"\{[^}]*\}|\[[^\]]*\]|<[^>]*>")


@dataclass(frozen=True, slots=True)
class Customer:
    """One customer as the world knows them (`noise` is hidden from the agent)."""

    id: int
    name: str
    segment: str
    plan: str
    tenure_months: int
    monthly_spend: float
    last_login_days: int
    tickets_90d: int
    nps: int | None
    feature_usage_pct: int
    payment_failures_90d: int
    region: str
    noise: int = 0

    @property
    def first_name(self) -> str:
        return self.name.split()[0]

    @property
    def at_risk(self) -> bool:
        return risk_points(self) + self.noise >= RISK_THRESHOLD

    @property
    def ideal(self) -> Strategy:
        return playbook(self.segment, self.plan, self.tickets_90d, self.feature_usage_pct)


def risk_points(c: Customer) -> int:
    """The churn rule before noise: at risk from `RISK_THRESHOLD` points."""
    points = 2 if c.last_login_days > 30 else 1 if c.last_login_days >= 15 else 0
    points += 2 if c.tickets_90d >= 3 else 1 if c.tickets_90d == 2 else 0
    if c.nps is not None:
        points += 2 if c.nps <= 4 else 1 if c.nps <= 6 else 0
    points += (c.tenure_months < 6) + (c.payment_failures_90d >= 1) + (c.feature_usage_pct < 30)
    return points


def playbook(segment: str, plan: str, tickets_90d: int, feature_usage_pct: int) -> Strategy:
    """The strategy that fits an at-risk customer best (first rule that matches)."""
    if segment == "enterprise":
        return Strategy.personal_call
    if tickets_90d >= 3:
        return Strategy.feature_training
    if plan != "basic" and feature_usage_pct < 30:
        return Strategy.plan_downgrade
    return Strategy.discount


def review(c: Customer, strategy: Strategy, email: str) -> list[str]:
    """The reviewer's reasons to reject a submission; empty means approved."""
    reasons = []
    if strategy is Strategy.personal_call and c.segment == "consumer":
        reasons.append("personal calls are for smb and enterprise accounts; this customer is a consumer")
    if strategy is Strategy.discount and c.segment == "enterprise":
        reasons.append("enterprise contracts are negotiated, not discounted: offer a personal call instead")
    if strategy is Strategy.plan_downgrade and c.plan == "basic":
        reasons.append("the customer is on the basic plan: there is no cheaper plan to downgrade to")
    if not email.strip():
        return reasons + ["the email is empty"]
    if len(email) > MAX_EMAIL_CHARS:
        reasons.append(f"the email is too long ({len(email)} characters); keep it under {MAX_EMAIL_CHARS}")
    if not re.search(rf"\b{re.escape(c.first_name)}\b", email, re.I):
        reasons.append(f"the email does not greet the customer by name; use their first name {c.first_name!r}")
    if m := PLACEHOLDER.search(email):
        reasons.append(f"the email has an unfilled placeholder {m.group()!r}")
    if not OFFERS[strategy].search(email):
        reasons.append(f"the email does not make the {strategy.value} offer (pattern: {OFFERS[strategy].pattern})")
    others = [s.value for s, pattern in OFFERS.items() if s is not strategy and pattern.search(email)]
    if others:
        reasons.append(f"the email also offers {', '.join(others)}; make only the {strategy.value} offer")
    return reasons


@dataclass(frozen=True, slots=True)
class Score:
    """The rubric's parts and total (see `rubric`)."""

    precision: float
    recall: float
    f1: float
    fit: float
    approval: float
    spam: float
    total: float


def rubric(at_risk: set[int], ideal: dict[int, Strategy], contacts: dict[int, Strategy], reviewed: int,
           approved: int) -> Score:
    """Score an outcome: `contacts` maps customers with an approved email to its strategy;
    `reviewed`/`approved` count the reviews of the episode.

    total = (0.5 F1(contacted, at risk) + 0.3 fit + 0.2 approval rate) x (1 - spam), where fit is
    the share of at-risk customers contacted with the playbook's strategy and spam the share of
    contacts who were not at risk. Nothing contacted scores 0.
    """
    hit = at_risk & set(contacts)
    precision = len(hit) / len(contacts) if contacts else 0.0
    recall = len(hit) / len(at_risk) if at_risk else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    fit = sum(contacts[i] is ideal[i] for i in hit) / len(at_risk) if at_risk else 0.0
    approval = approved / reviewed if reviewed else 0.0
    spam = 1.0 - precision if contacts else 0.0
    total = (0.5 * f1 + 0.3 * fit + 0.2 * approval) * (1.0 - spam) if contacts else 0.0
    return Score(precision, recall, f1, fit, approval, spam, min(1.0, max(0.0, total)))


# -- the database -----------------------------------------------------------------------------------

def generate(n: int, rng: random.Random) -> tuple[list[Customer], list[tuple]]:
    """`n` customers (about 30% drifting away) and their ticket rows (id, customer_id, opened, topic, resolved)."""
    customers, tickets = [], []
    for i in range(1, n + 1):
        drifting = rng.random() < 0.3
        segment = rng.choices(list(SEGMENTS), list(SEGMENTS.values()))[0]
        plan = rng.choices(PLANS, PLAN_WEIGHTS[segment])[0]
        seats = {"consumer": 1, "smb": rng.randint(3, 25), "enterprise": rng.randint(30, 400)}[segment]
        recent = rng.choices(range(6), [2, 2, 2, 2, 1, 1] if drifting else [12, 6, 2, 1, 0, 0])[0]
        nps = None if rng.random() < 0.12 else rng.randint(0, 7) if drifting else rng.randint(5, 10)
        c = Customer(
            id=i, name=f"{rng.choice(FIRST)} {rng.choice(LAST)}", segment=segment, plan=plan,
            tenure_months=rng.randint(1, 24) if drifting and rng.random() < 0.4 else rng.randint(1, 72),
            monthly_spend=round(PLAN_PRICE[plan] * seats * rng.uniform(0.9, 1.1), 2),
            last_login_days=rng.randint(8, 90) if drifting else rng.randint(0, 9) if rng.random() < 0.8
            else rng.randint(10, 25),
            tickets_90d=recent, nps=nps,
            feature_usage_pct=rng.randint(5, 60) if drifting else rng.randint(25, 95),
            payment_failures_90d=rng.choices([0, 1, 2], [6, 3, 1] if drifting else [19, 1, 0])[0],
            region=rng.choice(["north", "south", "east", "west"]),
            noise=rng.choices([-1, 0, 1], [8, 84, 8])[0])
        customers.append(c)
        ages = [rng.randint(0, 89) for _ in range(recent)] + [rng.randint(91, 400) for _ in range(rng.randint(0, 3))]
        for age in sorted(ages, reverse=True):
            tickets.append((len(tickets) + 1, i, (TODAY - timedelta(days=age)).isoformat(),
                            rng.choice(TICKET_TOPICS), int(age > 7 or rng.random() < 0.5)))
    return customers, tickets


def write_db(path: Path, customers: list[Customer], tickets: list[tuple]) -> None:
    """Write the customers and tickets tables (the label and noise stay out)."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript("""
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, segment TEXT, plan TEXT,
                region TEXT, tenure_months INTEGER, monthly_spend REAL, last_login DATE, nps INTEGER,
                feature_usage_pct INTEGER, payment_failures_90d INTEGER);
            CREATE TABLE tickets (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id),
                opened DATE, topic TEXT, resolved INTEGER);""")
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (c.id, c.name, f"{c.name.lower().replace(' ', '.')}.{c.id}@example.com", c.segment, c.plan, c.region,
             c.tenure_months, c.monthly_spend, (TODAY - timedelta(days=c.last_login_days)).isoformat(), c.nps,
             c.feature_usage_pct, c.payment_failures_90d) for c in customers])
        conn.executemany("INSERT INTO tickets VALUES (?, ?, ?, ?, ?)", tickets)
        conn.commit()
    finally:
        conn.close()


# -- the world --------------------------------------------------------------------------------------

INSTRUCTIONS = f"""You are a customer-retention analyst. Today is {TODAY.isoformat()}.
Find the customers likely to churn, using the `sql` tool on the customer database. Signs of churn:
no login for weeks, several support tickets in the last 90 days, a low NPS score (0-10), a short
tenure, failed payments, low feature usage. Loyal customers must not be contacted.

For each at-risk customer, submit one strategy and an email with `submit`. Playbook (first match):
1. enterprise accounts -> personal_call
2. three or more tickets opened in the last 90 days -> feature_training
3. pro or premium plan with feature usage under 30% -> plan_downgrade
4. everyone else -> discount

A reviewer checks every email: greet the customer by first name, make exactly the offer of the
strategy, no placeholders, under {MAX_EMAIL_CHARS} characters. A rejected email comes back with reasons:
fix it and submit again (a few attempts per customer). Strategy `none` withdraws a contact.
Call `finish` when you are done."""


class ChurnWorld(Environment):
    """A customer database, a reviewer and one analyst seat (see the module docstring).

    `customers`: how many to generate; `workdir`: where `customers.db` goes (a temporary
    directory by default, removed with the world); `max_attempts`: reviews per customer.
    """

    name = "churn"

    def __init__(self, customers: int = 200, *, workdir: str | Path | None = None, max_attempts: int = 3):
        if customers < 10:
            raise ValueError(f"customers must be at least 10, got {customers}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.n_customers, self.max_attempts = customers, max_attempts
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="agentrt-churn-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.workdir / "customers.db"
        self.customers: dict[int, Customer] = {}

    def reset(self, seed: int = 0) -> list[Seat]:
        customers, tickets = generate(self.n_customers, random.Random(seed))
        write_db(self.db_path, customers, tickets)
        self.customers = {c.id: c for c in customers}
        self.contacts: dict[int, Strategy] = {}   # approved, not withdrawn
        self.attempts: dict[int, int] = {}
        self.reviewed = self.approved = 0
        self.finished = False
        task = (f"The database has {len(customers)} customers (ids 1-{len(customers)}). Win back the ones "
                "at risk of churning, then call finish.")
        return [Seat(SEAT, INSTRUCTIONS, task, [sql_query(self.db_path, max_rows=250), self._submit(), self._finish()])]

    @property
    def done(self) -> bool:
        return self.finished

    def score(self) -> Score:
        at_risk = {i for i, c in self.customers.items() if c.at_risk}
        return rubric(at_risk, {i: c.ideal for i, c in self.customers.items()}, self.contacts,
                      self.reviewed, self.approved)

    def reward(self, seat_id: str) -> float:
        _check_seat(seat_id)
        return self.score().total

    # -- tools (async: they run on the event loop, so parallel calls never interleave) ---------
    def _submit(self):
        @tool(side_effects=True)
        async def submit(customer_id: int, strategy: Strategy, email: str) -> dict:
            """Submit a win-back strategy and email for one customer; the reviewer approves or rejects it.

            Args:
                customer_id: The customer's id (customers.id).
                strategy: The win-back strategy; `none` means do not contact (withdraws an approval).
                email: The email to send: greet by first name and make the strategy's offer.
            """
            c = self._customer(customer_id)
            if strategy is Strategy.none:
                withdrawn = self.contacts.pop(c.id, None)
                note = f"; the approved {withdrawn.value} email is withdrawn" if withdrawn else ""
                return {"customer_id": c.id, "approved": True, "reasons": [],
                        "message": f"customer {c.id} will not be contacted{note}"}
            if c.id in self.contacts:
                raise ToolError(f"customer {c.id} already has an approved {self.contacts[c.id].value} email; "
                                "submit strategy none first to withdraw it")
            used = self.attempts.get(c.id, 0)
            if used >= self.max_attempts:
                raise ToolError(f"customer {c.id} has used all {self.max_attempts} review attempts; move on")
            self.attempts[c.id] = used + 1
            reasons = review(c, strategy, email)
            self.reviewed += 1
            if not reasons:
                self.approved += 1
                self.contacts[c.id] = strategy
            return {"customer_id": c.id, "approved": not reasons, "reasons": reasons,
                    "attempts_left": self.max_attempts - used - 1}
        return submit

    def _finish(self):
        @tool(side_effects=True)
        async def finish() -> str:
            """End the episode: the approved emails are sent."""
            self._open()
            self.finished = True
            return f"finished: {len(self.contacts)} approved emails will be sent"
        return finish

    def _open(self) -> None:
        if self.finished:
            raise ToolError("the episode is finished; nothing more can be submitted")

    def _customer(self, customer_id: int) -> Customer:
        self._open()
        if customer_id not in self.customers:
            raise ToolError(f"no customer with id {customer_id}; ids run from 1 to {len(self.customers)}")
        return self.customers[customer_id]

    # -- the scripted baseline -----------------------------------------------------------------
    def baseline(self, seat_id: str) -> Policy:
        _check_seat(seat_id)

        async def policy(ctx: Any) -> str:
            found = await ctx.call_tool("sql", {"query": BASELINE_QUERY})
            if not found.ok:
                raise RuntimeError(f"baseline query failed: {found.content}")
            for row in parse_table(found.value):
                strategy = playbook(row["segment"], row["plan"], int(row["tickets"]), int(row["feature_usage_pct"]))
                email = draft(row["name"].split()[0], row["plan"], strategy)
                await ctx.call_tool("submit", {"customer_id": int(row["id"]), "strategy": strategy.value,
                                               "email": email})
            return (await ctx.call_tool("finish")).content
        return policy


def _check_seat(seat_id: str) -> None:
    if seat_id != SEAT:
        raise KeyError(f"the churn world has one seat, {SEAT!r}; got {seat_id!r}")


# The baseline applies the rule without noise, in SQL.
BASELINE_QUERY = f"""
WITH t AS (SELECT customer_id, COUNT(*) AS n FROM tickets
           WHERE julianday('{TODAY}') - julianday(opened) < 90 GROUP BY customer_id),
s AS (SELECT c.id, c.name, c.segment, c.plan, c.feature_usage_pct, COALESCE(t.n, 0) AS tickets,
        CAST(julianday('{TODAY}') - julianday(c.last_login) AS INTEGER) AS idle
      FROM customers c LEFT JOIN t ON t.customer_id = c.id)
SELECT s.id, s.name, s.segment, s.plan, s.feature_usage_pct, s.tickets,
  (CASE WHEN idle > 30 THEN 2 WHEN idle >= 15 THEN 1 ELSE 0 END)
  + (CASE WHEN tickets >= 3 THEN 2 WHEN tickets = 2 THEN 1 ELSE 0 END)
  + (CASE WHEN nps <= 4 THEN 2 WHEN nps <= 6 THEN 1 ELSE 0 END)
  + (tenure_months < 6) + (payment_failures_90d >= 1) + (s.feature_usage_pct < 30) AS points
FROM s JOIN customers USING (id) WHERE points >= {RISK_THRESHOLD} ORDER BY s.id"""


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of an `sql` result (`a | b` header, rows, a count footer)."""
    header, *rows, _footer = text.split("\n")
    names = header.split(" | ")
    return [dict(zip(names, line.split(" | "), strict=True)) for line in rows]


def draft(first: str, plan: str, strategy: Strategy) -> str:
    """A short email that makes `strategy`'s offer."""
    lower = PLANS[max(PLANS.index(plan) - 1, 0)]
    offer = {
        Strategy.discount: f"we would like to thank you with a 20% discount on your {plan} plan for three months.",
        Strategy.plan_downgrade: f"you can downgrade to the {lower} plan at any time and keep all your data.",
        Strategy.personal_call: "your account manager would like to schedule a personal call with you this week.",
        Strategy.feature_training: "we would like to offer you a free one-to-one training session with our team.",
    }[strategy]
    return f"Hi {first},\n\nWe have missed you lately, and {offer}\nJust reply to this email.\n\nThe Customer Team"
