"""Analyst agents answer business questions over a small SQLite shop with the built-in `sql` tool.

    python examples/sql_analyst.py
    python examples/sql_analyst.py --agents 2 --workdir /tmp/shop --seed 7
    python examples/sql_analyst.py --model /path/to/NVIDIA-Nemotron-3-Nano-30B-A3B --max-tokens 1024

The script writes `shop.db` (customers, products, orders: a few hundred rows drawn from a seeded
`random.Random`) into `--workdir`, then runs the analysts concurrently on one engine, each with its
own question and budget. An analyst must query before it answers (its first turn requires a tool
call), may query again, and gets no tools on its last turn, so it has to answer then. For every
question the script also runs a reference query of its own and prints the answer a correct
analyst would give.

The embedded model ("tiny") has random weights. Its tool calls are produced under constrained
decoding, so they always parse and always match the tool's schema, and the tool really runs them,
but the SQL inside is random text: expect SQL errors as tool results, answers that are noise, and
"answer mentions ...: no" on every line. What the run shows is the machinery (turns, budgets,
concurrent tool calls, prefix caching), not analysis. A real checkpoint runs unchanged via `--model`.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import click

THINK_TOKENS = 16  # per episode; a turn may think THINK_GRACE tokens more to finish its line
THINK_GRACE = 32  # the engine's default (ChatOptions.think_grace)
CALL_TOKENS = 16  # the call around the query: <tool_call>{"name": "sql", "arguments": {"query": "..."}}</tool_call>


def max_query_chars(max_tokens: int) -> int:
    """A query length that fits in what a turn has left after thinking, at one character per token, so
    that even a model that rambles closes its call before `max_tokens` (a real model writes far more)."""
    return max(40, min(600, max_tokens - THINK_TOKENS - THINK_GRACE - CALL_TOKENS))


INSTRUCTIONS = """You are a data analyst for an online shop. Answer the question with numbers taken
from the shop database: look at the data with the `sql` tool first (one SELECT per call, short
queries), then reply with a one-sentence answer that names the value you found."""


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    reference_sql: str  # one row; its first cell is what a correct answer must mention


QUESTIONS = (
    Question("Which city has the most customers, and how many customers live there?",
             "SELECT city, COUNT(*) FROM customers GROUP BY city ORDER BY 2 DESC, 1 LIMIT 1"),
    Question("What was the shop's total revenue (quantity times unit price) in 2024, rounded to a whole number?",
             "SELECT ROUND(SUM(o.quantity * p.price)) FROM orders o JOIN products p ON p.id = o.product_id "
             "WHERE o.ordered_at LIKE '2024-%'"),
    Question("Which product category brings in the most revenue overall?",
             "SELECT p.category, ROUND(SUM(o.quantity * p.price), 2) FROM orders o "
             "JOIN products p ON p.id = o.product_id GROUP BY p.category ORDER BY 2 DESC LIMIT 1"),
    Question("Which customer has spent the most in total, and how much?",
             "SELECT c.name, ROUND(SUM(o.quantity * p.price), 2) FROM orders o "
             "JOIN customers c ON c.id = o.customer_id JOIN products p ON p.id = o.product_id "
             "GROUP BY c.id ORDER BY 2 DESC LIMIT 1"),
    Question("How many orders have a quantity of 5 or more?",
             "SELECT COUNT(*) FROM orders WHERE quantity >= 5"),
    Question("What is the average value of an order, rounded to 2 decimals?",
             "SELECT ROUND(AVG(o.quantity * p.price), 2) FROM orders o JOIN products p ON p.id = o.product_id"),
)

FIRST_NAMES = "Ada Bruno Chloe Dmitri Elena Farid Greta Hiro Ines Jonas Kaia Luis Mira Nils Olga Pavel".split()
LAST_NAMES = "Berg Costa Dahl Evans Fischer Garcia Holm Ito Jensen Kowalski Lund Moreau Novak Okafor".split()
CITIES = "Oslo Lisbon Kraków Lyon Porto Bergen Gdańsk Toulouse".split()
CATALOG = {
    "books": ["atlas", "cookbook", "field guide", "novel", "phrasebook"],
    "kitchen": ["kettle", "pan", "knife set", "grinder", "teapot"],
    "outdoor": ["tent", "lantern", "stove", "sleeping bag", "backpack"],
    "office": ["desk lamp", "notebook", "pen set", "monitor arm", "stapler"],
}


def build_shop(path: Path, seed: int, customers: int = 60, orders: int = 400) -> dict[str, int]:
    """Write a fresh shop database at `path`; returns the row count of each table."""
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript("""
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL,
                                    joined TEXT NOT NULL);
            CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
                                   price REAL NOT NULL);
            CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                                 product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL,
                                 ordered_at TEXT NOT NULL);
        """)
        start = date(2023, 1, 1)
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", [
            (i, f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", rng.choice(CITIES),
             (start + timedelta(days=rng.randrange(365))).isoformat())
            for i in range(1, customers + 1)])
        products = [(category, item) for category, items in CATALOG.items() for item in items]
        conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", [
            (i, item, category, round(rng.uniform(4, 250), 2)) for i, (category, item) in enumerate(products, 1)])
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", [
            (i, rng.randint(1, customers), rng.randint(1, len(products)), min(rng.randint(1, 4), rng.randint(1, 8)),
             (start + timedelta(days=rng.randrange(730))).isoformat())
            for i in range(1, orders + 1)])
        conn.commit()
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("customers", "products", "orders")}
    finally:
        conn.close()


def reference_answer(path: Path, question: Question) -> tuple[str, ...]:
    """The reference query's row, each cell as text (whole floats without '.0')."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(question.reference_sql).fetchone()
    finally:
        conn.close()
    return tuple(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in row)


def capped(t, argument: str, max_chars: int):
    """`t` with its string `argument` limited to `max_chars` characters in the schema the model sees.

    (Under Nemotron's XML call format a length-bounded string cannot hold '<': queries use `NOT a >= b`.)"""
    from agentrt import tool

    parameters = {**t.parameters, "properties": {**t.parameters["properties"]}}
    parameters["properties"][argument] = {**parameters["properties"][argument], "maxLength": max_chars}
    return tool(t.fn, name=t.name, description=t.description, timeout=t.timeout, schema=parameters)


async def analyst(ctx) -> str | None:
    """Query first, then query or answer; the last turn offers no tools, so it must answer."""
    note = None
    for turn in range(ctx.agent.max_turns):
        last = turn == ctx.agent.max_turns - 1
        reply = await ctx.chat(note, tools=not last, require_call=turn == 0)
        note = None
        if reply.errors:  # a call that did not parse (e.g. cut by max_tokens): say what was wrong
            ctx.tools.failures["invalid_tool_call"] += len(reply.errors)
            note = "Your tool call could not be read: " + "; ".join(str(e.arguments) for e in reply.errors)
        if reply.tool_calls:
            await ctx.call_tools(reply.tool_calls)
        elif note is None:
            return reply.content
    return None


def excerpt(text: str | None, limit: int = 150) -> str:
    """One printable line of at most `limit` characters."""
    if not text:
        return "(empty)"
    flat = " ".join("".join(c if c.isprintable() or c.isspace() else "\ufffd" for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def run_analysts(model_name: str, db: Path, agents: int, max_tokens: int, seed: int):
    from agentrt import Agent, Budget, MemoryRecorder, Runtime, Sampling
    from agentrt.tools.builtin import sql_query

    sql = capped(sql_query(db, max_rows=20, timeout=5.0), "query", max_query_chars(max_tokens))
    budget = Budget(think_tokens=THINK_TOKENS, tool_calls=3, turns=3, seconds=40)
    team = [Agent(name=f"analyst-{i + 1}", instructions=INSTRUCTIONS, tools=[sql], policy=analyst, budget=budget,
                  sampling=Sampling(temperature=0.7, max_tokens=max_tokens, seed=seed + i), max_turns=3)
            for i in range(agents)]
    recorder = MemoryRecorder()
    t0 = time.perf_counter()
    async with Runtime(model=model_name, recorder=recorder) as rt:
        loaded = time.perf_counter() - t0
        click.echo(f"model: {rt.model.name}, loaded in {loaded:.1f}s; {agents} analysts start")
        if model_name == "tiny":
            click.echo("note: 'tiny' has random weights: its calls are well-formed but its SQL and answers are noise")
        t1 = time.perf_counter()
        results = await rt.run([(a, q.text) for a, q in zip(team, QUESTIONS)])
        wall = time.perf_counter() - t1
        stats = rt.model.stats()
    return results, recorder, stats, wall


def report(results, recorder, stats, wall: float, db: Path) -> None:
    ok_calls = failed_calls = malformed = 0
    for r, question in zip(results, QUESTIONS):
        calls = recorder.of("tool_call", r.trajectory_id)
        ok = sum(c["result"].ok for c in calls)
        bad = r.tool_failures.get("invalid_tool_call", 0)
        ok_calls, failed_calls, malformed = ok_calls + ok, failed_calls + len(calls) - ok, malformed + bad
        s = r.spent
        ending = r.status + (f" ({r.reason})" if r.reason else "")
        click.echo(f"\n[{r.agent}] {question.text}")
        malformed_note = f", {bad} malformed" if bad else ""
        click.echo(f"  status: {ending} | turns {s.turns} | tool calls {s.tool_calls} ({ok} ok, {len(calls) - ok} "
                   f"failed{malformed_note}) | tokens {s.prompt_tokens} prompt ({s.cached_tokens} cached), "
                   f"{s.output_tokens} generated ({s.thinking_tokens} thinking) | {s.seconds:.1f}s")
        if calls:
            last = calls[-1]
            click.echo(f"  last query: {excerpt(last['call']['arguments'].get('query'), 110)}")
            click.echo(f"  last result: {excerpt(last['result'].content)}")
        else:
            click.echo("  last result: (no tool call ran)")
        if r.status == "failed":
            click.echo(f"  error: {excerpt(r.error, 300)}")
        answer = r.output if isinstance(r.output, str) else None
        click.echo(f"  answer: {excerpt(answer) if answer is not None else '(none)'}")
        expected = reference_answer(db, question)
        mentions = answer is not None and expected[0].lower() in answer.lower()
        click.echo(f"  reference: {' | '.join(expected)} "
                   f"(answer mentions {expected[0]!r}: {'yes' if mentions else 'no'})")

    by_status = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.status for r in results).items()))
    prompt = sum(r.spent.prompt_tokens for r in results)
    generated = sum(r.spent.output_tokens for r in results)
    click.echo(f"\nsummary: {len(results)} analyst{'s' * (len(results) != 1)} in {wall:.1f}s wall ({by_status}); "
               f"tool calls {ok_calls + failed_calls} ({ok_calls} ok, {failed_calls} failed, {malformed} malformed)")
    click.echo(f"tokens: {prompt} prompt, {generated} generated; {generated / wall:.0f} generated tok/s, "
               f"{stats.tokens_fed / wall:.0f} tok/s fed to the model; "
               f"engine prefix-cache hit rate {stats.prefix_hit_rate:.0%} ({stats.cached_prompt_tokens} of "
               f"{stats.prompt_tokens} prompt tokens), mean batch {stats.mean_batch_size:.1f}")


@click.command()
@click.option("--model", "model_name", default="tiny", show_default=True, help="'tiny' or a checkpoint directory")
@click.option("--agents", default=4, show_default=True, type=click.IntRange(1, len(QUESTIONS)),
              help="analysts, one question each")
@click.option("--max-tokens", default=160, show_default=True, type=click.IntRange(16), help="per model turn")
@click.option("--seed", default=0, show_default=True, help="seeds the database and the sampling")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where shop.db is written  [default: a temporary directory]")
def main(model_name: str, agents: int, max_tokens: int, seed: int, workdir: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="agentrt-shop-") if workdir is None else nullcontext(workdir) as root:
        db = Path(root) / "shop.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        counts = build_shop(db, seed)
        click.echo(f"database: {db} (" + ", ".join(f"{n} {t}" for t, n in counts.items()) + ")")
        results, recorder, stats, wall = asyncio.run(run_analysts(model_name, db, agents, max_tokens, seed))
        report(results, recorder, stats, wall, db)


if __name__ == "__main__":
    main()
