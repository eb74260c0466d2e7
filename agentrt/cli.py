"""The `agentrt` command line: one click group, a subgroup or command per job.

Commands import what they need (torch, transformers, the engine) when they run, so `agentrt --help`
stays instant. Every option can also come from the environment: `AGENTRT_<COMMAND>_<OPTION>`,
e.g. `AGENTRT_BENCH_ENGINE_AGENTS=8 agentrt bench engine`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from agentrt import __version__
from agentrt.bench.engine import CONTESTANTS  # light: the module imports torch only when a benchmark runs

CONTEXT = {"auto_envvar_prefix": "AGENTRT", "show_default": True, "help_option_names": ["-h", "--help"]}


@click.group(name="agentrt", context_settings=CONTEXT)
@click.version_option(__version__, prog_name="agentrt")
def cli() -> None:
    """agentrt: many agents, one in-process NemotronH engine.

    Options can be set in the environment as AGENTRT_<COMMAND>_<OPTION>
    (for example AGENTRT_BENCH_ENGINE_AGENTS=8).
    """


@cli.group()
def bench() -> None:
    """Measure the engine and the runtime against their peers."""


def _contestants(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown or not names:
        what = f"unknown contestant {', '.join(map(repr, unknown))}" if unknown else "no contestant given"
        raise click.BadParameter(f"{what}; choose one or more of {','.join(CONTESTANTS)}, comma-separated")
    return [n for n in CONTESTANTS if n in names]


def _count(default: int, help: str, low: int = 1):
    return dict(type=click.IntRange(min=low), default=default, help=help)


@bench.command("engine")
@click.option("--agents", **_count(32, "agents running concurrently"))
@click.option("--turns", **_count(4, "turns per agent"))
@click.option("--system-tokens", **_count(1024, "tokens in the system prompt all agents share", low=0))
@click.option("--user-tokens", **_count(64, "tokens in each turn's user message"))
@click.option("--gen-tokens", **_count(32, "tokens generated per turn (greedy, end-of-turn ignored)"))
@click.option("--seed", type=int, default=0, help="seed of the workload's token ids")
@click.option("--only", default=",".join(CONTESTANTS), callback=_contestants,
              help="contestants to run, comma-separated")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write the results, every generated token included, to this JSON file")
@click.option("--markdown", is_flag=True, help="also print a table for docs/BENCHMARKS.md, with this command line")
@click.option("--hf-dt-clamp/--no-hf-dt-clamp", default=True,
              help="add to transformers' one-token Mamba step the dt >= time_step_min clamp its prefill applies; "
                   "without it transformers' cached greedy tokens drift from its own full forward")
def bench_engine(agents: int, turns: int, system_tokens: int, user_tokens: int, gen_tokens: int, seed: int,
                 only: list[str], json_path: Path | None, markdown: bool, hf_dt_clamp: bool) -> None:
    """Agents sharing a system prompt, several turns each: agentrt against transformers.

    Each agent's next prompt is its previous prompt, the tokens generated for it and a new user
    message. Contestants: agentrt (our batching engine with its prefix cache), hf-per-agent (one
    transformers generate per agent and turn) and hf-batched (one generate per turn over all
    agents). The tokens of all of them must be equal; the run fails (exit 1) if they are not.
    Targets (reported, never fatal): 20x hf-per-agent and 5x hf-batched in tokens/s, 90% prefix hits.
    """
    from agentrt.bench.engine import Workload, engine_import_error, format_markdown, format_text, run_benchmark

    if "agentrt" in only and (why := engine_import_error()):
        raise click.ClickException(
            f"the agentrt contestant needs agentrt.model.engine, which does not import ({why}); "
            "run the peers alone with --only hf-per-agent,hf-batched")
    workload = Workload(agents=agents, turns=turns, system_tokens=system_tokens, user_tokens=user_tokens,
                        gen_tokens=gen_tokens, seed=seed)
    report = run_benchmark(workload, only, hf_dt_clamp=hf_dt_clamp, log=lambda line: click.echo(line, err=True))
    click.echo(format_text(report))
    if markdown:
        command = ["agentrt", "bench", "engine", "--agents", agents, "--turns", turns, "--system-tokens",
                   system_tokens, "--user-tokens", user_tokens, "--gen-tokens", gen_tokens, "--seed", seed,
                   "--only", ",".join(only), *(["--json", json_path] if json_path else []),
                   *([] if hf_dt_clamp else ["--no-hf-dt-clamp"]), "--markdown"]
        click.echo("\n" + format_markdown(report, shlex.join(map(str, command))))
    if json_path:
        json_path.write_text(json.dumps(report.to_json()) + "\n")
    if not report.ok:
        raise click.ClickException("a correctness check failed (see checks above): the numbers compare "
                                   "different outputs; fix that before trusting them")


@bench.command("agents")
@click.option("--agents", **_count(1000, "agents running concurrently"))
@click.option("--turns", **_count(10, "tool-loop turns per agent (model call, tool call, result)"))
@click.option("--only", default="agentrt,pydantic-ai", help="contestants to run, comma-separated")
@click.option("--markdown", is_flag=True, help="also print a table for docs/BENCHMARKS.md, with this command line")
def bench_agents(agents: int, turns: int, only: str, markdown: bool) -> None:
    """The runtime's overhead: many agents in the tool loop against a zero-latency scripted model.

    Contestants: agentrt's Runtime and PydanticAI's Agent with its FunctionModel, same workload,
    same process. Reports agent turns/s and event-loop lag (p50/p99); targets (reported, never
    fatal): agentrt at least as fast as PydanticAI, lag p99 under 20 ms.
    """
    from agentrt.bench.agents import CONTESTANTS as AGENT_CONTESTANTS
    from agentrt.bench.agents import format_markdown as agents_markdown
    from agentrt.bench.agents import format_text as agents_text
    from agentrt.bench.agents import run_benchmark as run_agents

    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in AGENT_CONTESTANTS]
    if unknown or not names:
        raise click.BadParameter(f"unknown contestants {unknown}; choose from {sorted(AGENT_CONTESTANTS)}",
                                 param_hint="--only")
    report = run_agents(agents, turns, names, log=lambda line: click.echo(line, err=True))
    click.echo(agents_text(report))
    if markdown:
        command = ["agentrt", "bench", "agents", "--agents", agents, "--turns", turns, "--only", ",".join(names),
                   "--markdown"]
        click.echo("\n" + agents_markdown(report, shlex.join(map(str, command))))


@bench.command("store")
@click.option("--agents", **_count(1000, "agents running concurrently"))
@click.option("--turns", **_count(10, "tool-loop turns per agent (model call, tool call, result)"))
@click.option("--batch-size", **_count(500, "recorder calls per writer transaction"))
@click.option("--url", default=None, help="record into this SQLAlchemy URL or path instead of a temporary SQLite file")
@click.option("--markdown", is_flag=True, help="also print a table for docs/BENCHMARKS.md, with this command line")
def bench_store(agents: int, turns: int, batch_size: int, url: str | None, markdown: bool) -> None:
    """The trajectory store under the runtime's full speed: the bench-agents workload recording into a Store.

    Runs the workload without a recorder, then with a Store on a fresh SQLite file (or --url).
    Reports recorder calls committed per second (to the final flush), event-loop lag p50/p99 and
    the file's size; targets (reported, never fatal): 20,000 events/s, lag p99 under 10 ms.
    """
    from agentrt.bench.store import format_markdown as store_markdown
    from agentrt.bench.store import format_text as store_text
    from agentrt.bench.store import run_benchmark as run_store

    report = run_store(agents, turns, batch_size, url, log=lambda line: click.echo(line, err=True))
    click.echo(store_text(report))
    if markdown:
        command = ["agentrt", "bench", "store", "--agents", agents, "--turns", turns, "--batch-size", batch_size,
                   *(["--url", url] if url else []), "--markdown"]
        click.echo("\n" + store_markdown(report, shlex.join(map(str, command))))


def _reader(db: Path):
    from agentrt.store import StoreReader

    if "://" not in str(db) and not db.exists():
        raise click.BadParameter(f"{db} does not exist; pass the SQLite file a run recorded "
                                 "(e.g. runs/logistics.db) or a SQLAlchemy URL", param_hint="DB")
    return StoreReader(db if "://" not in str(db) else str(db))


@cli.command("export")
@click.argument("db", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run", "run_id", default=None, help="only the branches of this run (default: every run)")
def export(db: Path, out: Path, run_id: str | None) -> None:
    """Write the trajectories of DB to OUT as JSONL for RL trainers: one line per root-to-leaf
    branch (messages, tools, the engine's token ids and logprobs, a loss mask, rewards; see
    docs/export.md)."""
    from agentrt.export import export_jsonl

    with _reader(db) as reader:
        if run_id is not None:
            try:
                reader.run(run_id)
            except KeyError:
                raise click.BadParameter(f"no run {run_id!r} in {db}; runs: "
                                         f"{', '.join(r.id for r in reader.runs()) or '(none)'}", param_hint="--run")
        lines = export_jsonl(reader, out, run_id=run_id)
    click.echo(f"{lines} branches written to {out}")


@cli.command("replay")
@click.argument("db", type=click.Path(path_type=Path))
@click.argument("trajectory", required=False)
def replay(db: Path, trajectory: str | None) -> None:
    """Show a recorded TRAJECTORY of DB as a transcript; without one, list the runs and their
    trajectories. (A trajectory id may be given by any unique prefix.)"""
    from agentrt.replay import render

    with _reader(db) as reader:
        if trajectory is None:
            for run in reader.runs():
                click.echo(f"run {run.id}  {run.status}")
                for t in reader.trajectories(run.id):
                    click.echo(f"  {t.id}  {t.agent:<16} {t.status or '-':<10} reward {t.reward or 0:g}")
            return
        matches = [t.id for t in reader.trajectories() if t.id.startswith(trajectory)]
        if len(matches) != 1:
            raise click.BadParameter(f"{trajectory!r} matches {len(matches)} trajectories in {db}; "
                                     "run `agentrt replay DB` to list them", param_hint="TRAJECTORY")
        click.echo(render(reader, matches[0]))


def main() -> None:
    cli(prog_name="agentrt")
