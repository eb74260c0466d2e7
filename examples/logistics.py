"""Sixteen electric trucks bid for deliveries in a city, each one an agent on the embedded model.

    python examples/logistics.py
    python examples/logistics.py --policy baseline --ticks 8
    python examples/logistics.py --trucks 32 --max-tokens 64 --db runs/big.db
    python examples/logistics.py --model /path/to/NVIDIA-Nemotron-3-Nano-30B-A3B --max-tokens 1024 --turns 40

The world is `agentrt.environments.logistics.LogisticsWorld` (rules in docs/worlds.md): each tick
the trucks read open orders, bid, charge and end their tick; the lowest valid bid wins each order;
a truck's reward is its profit. `--policy model` runs every truck on `play_until_done`, the tool
loop of ticked worlds (the model must call one tool per turn until the simulation ends, then
answers); `--policy baseline` runs the world's scripted cost-plus bidder through the same tools,
for comparison (no model is loaded). Every model and tool call goes to the trajectory store
(`--db`, a SQLite file, read it with `agentrt.store.StoreReader`; `--db ''` records nothing).

The embedded model ("tiny") has random weights: its tool calls are well-formed (the engine
constrains them to the tools' schemas) but its choices are noise, so expect errors such as unknown
order ids, and ticks that advance by `--tick-timeout` rather than by `end_tick`. The run is about
the runtime: 16 agents sharing one engine, their common prompt prefix cached once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import click


async def run(trucks: int, ticks: int, model_name: str, db: str, policy: str, seed: int, max_tokens: int,
              turns: int, tick_timeout: float) -> tuple[list, object, object, float]:
    from agentrt import Agent, Budget, Runtime, Sampling, ScriptedModel
    from agentrt.environments.base import run_environment
    from agentrt.environments.logistics import LogisticsWorld, play_until_done

    world = LogisticsWorld(trucks=trucks, ticks=ticks, tick_timeout=tick_timeout)
    template = Agent(name="truck", max_turns=turns,
                     budget=Budget(think_tokens=16, tool_calls=2 * turns, turns=turns, seconds=20 * ticks),
                     sampling=Sampling(temperature=0.7, max_tokens=max_tokens, seed=seed))
    model = model_name if policy == "model" else ScriptedModel(lambda messages, tools: "")  # the baseline never asks
    store = open_store(db)
    t0 = time.perf_counter()
    try:
        async with Runtime(model=model, recorder=store) as rt:
            click.echo(f"model {rt.model.name} ready in {time.perf_counter() - t0:.1f}s; {trucks} trucks, "
                       f"{ticks} ticks, policy {policy}, seed {seed}")
            t1 = time.perf_counter()
            if policy == "model":
                results = await run_environment(rt, world, seed=seed, agent=template, policy=play_until_done(world))
            else:
                results = await run_environment(rt, world, seed=seed, policy="baseline")
            wall = time.perf_counter() - t1
            stats = rt.model.stats() if hasattr(rt.model, "stats") else None
    finally:
        if store is not None:
            await asyncio.to_thread(store.close)  # writes what is still queued
    return results, world, stats, wall


def open_store(db: str):
    """The trajectory store at `db`, or None (no recording) for ''."""
    if not db:
        return None
    try:
        from agentrt.store import Store
    except ImportError as e:
        raise click.ClickException(f"the trajectory store is not available ({e}); run with --db '' to skip it")
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    return Store(db)


def report(results: list, world, stats, wall: float, db: str) -> None:
    """Per truck: status, turns, tool calls (failed), tokens, orders won, profit; then the totals."""
    click.echo(f"\n{'truck':9} {'status':10} {'turns':>5} {'tools':>5} {'failed':>6} {'prompt':>7} {'cached':>7} "
               f"{'gen':>5} {'won':>4} {'profit':>8}")
    for r in results:
        s = r.spent
        won = sum(o.winner == r.agent for o in world.orders.values())
        click.echo(f"{r.agent:9} {r.status:10} {s.turns:5d} {s.tool_calls:5d} {sum(r.tool_failures.values()):6d} "
                   f"{s.prompt_tokens:7d} {s.cached_tokens:7d} {s.output_tokens:5d} {won:4d} "
                   f"{r.rewards[world.name]:+8.2f}")
        if r.status == "failed":
            click.echo(f"  error: {(r.reason or '')[:200]}")
    statuses = Counter(r.status for r in results)
    profits = [r.rewards[world.name] for r in results]
    delivered = sum(o.winner is not None for o in world.orders.values())
    generated = sum(r.spent.output_tokens for r in results)
    click.echo(f"\nworld: {world.tick - 1} of {world.ticks} ticks played, {delivered} of {len(world.orders)} orders "
               f"delivered, total profit {sum(profits):+.2f} (best {max(profits):+.2f}, worst {min(profits):+.2f})")
    click.echo(f"agents: {len(results)} ({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}); "
               f"turns {sum(r.spent.turns for r in results)}, tool calls {sum(r.spent.tool_calls for r in results)}")
    line = f"run: {wall:.1f}s wall, {generated} tokens generated ({generated / max(wall, 1e-9):.1f} tokens/s)"
    if stats is not None:
        line += (f", prefix-cache hit rate {stats.prefix_hit_rate:.1%} ({stats.cached_prompt_tokens} of "
                 f"{stats.prompt_tokens} prompt tokens), mean batch {stats.mean_batch_size:.1f}")
    click.echo(line)
    click.echo(f"trajectories: {db}" if db else "trajectories: not recorded (--db '')")


@click.command()
@click.option("--trucks", default=16, show_default=True, type=click.IntRange(1), help="agents, one truck each")
@click.option("--ticks", default=6, show_default=True, type=click.IntRange(1), help="auction rounds")
@click.option("--model", "model_name", default="tiny", show_default=True, help="'tiny' or a checkpoint directory")
@click.option("--db", default="runs/logistics.db", show_default=True, help="SQLite file for trajectories; '' for none")
@click.option("--policy", type=click.Choice(["model", "baseline"]), default="model", show_default=True,
              help="the model's tool loop, or the world's scripted bidder")
@click.option("--seed", default=0, show_default=True, help="world and sampling seed")
@click.option("--max-tokens", default=48, show_default=True, type=click.IntRange(8), help="per model turn")
@click.option("--turns", default=24, show_default=True, type=click.IntRange(1), help="model turns per truck")
@click.option("--tick-timeout", default=3.0, show_default=True, type=click.FloatRange(0.01),
              help="seconds a tick waits for trucks that did not call end_tick")
def main(trucks: int, ticks: int, model_name: str, db: str, policy: str, seed: int, max_tokens: int, turns: int,
         tick_timeout: float) -> None:
    results, world, stats, wall = asyncio.run(run(trucks, ticks, model_name, db, policy, seed, max_tokens, turns,
                                                  tick_timeout))
    report(results, world, stats, wall, db)


if __name__ == "__main__":
    main()
