"""The `agentrt` command line: one click group, a subgroup or command per job.

Commands import what they need (torch, transformers, the engine) when they run, so `agentrt --help`
stays instant. Every option can also come from the environment: `AGENTRT_<COMMAND>_<OPTION>`,
e.g. `AGENTRT_BENCH_ENGINE_AGENTS=8 agentrt bench engine`.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from agentrt import __version__
# light: the module imports torch only when a benchmark runs
from agentrt.bench.engine import CONTESTANTS
from agentrt.bench.engine import DTYPES as ENGINE_DTYPES

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
@click.option("--repeat", **_count(1, "rounds: every contestant runs this many times, interleaved, and is "
                                      "reported by its median run (for noisy machines)"))
@click.option("--dtype", type=click.Choice(ENGINE_DTYPES), default="auto", show_default=True,
              help="the model's dtype, for every contestant: auto is float32 on CPU and bfloat16 on CUDA")
def bench_engine(agents: int, turns: int, system_tokens: int, user_tokens: int, gen_tokens: int, seed: int,
                 only: list[str], json_path: Path | None, markdown: bool, hf_dt_clamp: bool, repeat: int,
                 dtype: str) -> None:
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
    report = run_benchmark(workload, only, hf_dt_clamp=hf_dt_clamp, repeat=repeat, dtype=dtype,
                           log=lambda line: click.echo(line, err=True))
    click.echo(format_text(report))
    if markdown:
        command = ["agentrt", "bench", "engine", "--agents", agents, "--turns", turns, "--system-tokens",
                   system_tokens, "--user-tokens", user_tokens, "--gen-tokens", gen_tokens, "--seed", seed,
                   "--only", ",".join(only), *(["--json", json_path] if json_path else []),
                   *([] if hf_dt_clamp else ["--no-hf-dt-clamp"]), *(["--repeat", repeat] if repeat > 1 else []),
                   *(["--dtype", dtype] if dtype != "auto" else []), "--markdown"]
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
@click.option("--writers", default="thread,process", show_default=True,
              help="the store's writers to measure, comma-separated (Store(writer=...))")
@click.option("--markdown", is_flag=True, help="also print a table for docs/BENCHMARKS.md, with this command line")
def bench_store(agents: int, turns: int, batch_size: int, url: str | None, writers: str, markdown: bool) -> None:
    """The trajectory store under the runtime's full speed: the bench-agents workload recording into a Store.

    Runs the workload without a recorder, then with a Store on a fresh SQLite file (or --url) for
    each writer: a thread of this process, or a child process. Reports recorder calls committed
    per second (to the final flush), event-loop lag p50/p99 and the file's size; targets
    (reported, never fatal): 20,000 events/s, lag p99 under 10 ms.
    """
    from agentrt.bench.store import format_markdown as store_markdown
    from agentrt.bench.store import format_text as store_text
    from agentrt.bench.store import run_benchmark as run_store

    from agentrt.bench.store import WRITERS

    chosen = tuple(w.strip() for w in writers.split(",") if w.strip())
    if not chosen or any(w not in WRITERS for w in chosen):
        raise click.BadParameter(f"{writers!r}: choose one or more of {', '.join(WRITERS)}", param_hint="--writers")
    report = run_store(agents, turns, batch_size, url, chosen, log=lambda line: click.echo(line, err=True))
    click.echo(store_text(report))
    if markdown:
        command = ["agentrt", "bench", "store", "--agents", agents, "--turns", turns, "--batch-size", batch_size,
                   *(["--url", url] if url else []), "--writers", ",".join(chosen), "--markdown"]
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


# -- run, watch, serve ------------------------------------------------------------------------------
WORLDS = ("logistics", "churn", "fleet")
TARGET_FORMS = ("a Python script (e.g. examples/calculator.py), a world (logistics, churn, fleet), "
                "or module:attribute naming an agentrt.Agent or a list of them (e.g. mypkg.agents:calc)")
SCRIPT_OPTIONS = ("model", "seed", "db", "policy")  # forwarded to a script target when given
DISPLAY_HELP = ("live display: tui (a terminal), plain (summary lines; the default when stdout is not a terminal) "
                "or none")


def _default_display(display: str | None) -> str:
    return display or ("tui" if sys.stdout.isatty() else "plain")


def _model(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value != "tiny" and not Path(value).exists():
        raise click.BadParameter(f"{value!r} is neither 'tiny' nor an existing checkpoint directory")
    return value


@cli.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--model", default="tiny", callback=_model, help="'tiny' (the embedded model) or a checkpoint directory")
@click.option("--db", default=None, help="SQLite file (or SQLAlchemy URL) for trajectories, '' for none "
                                         "[default: runs/<world or attribute>.db]")
@click.option("--display", type=click.Choice(["tui", "plain", "none"]), default=None, help=DISPLAY_HELP)
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, help="seconds between plain display lines")
@click.option("--seed", type=int, default=0, help="world and sampling seed")
@click.option("--agents", type=click.IntRange(min=1), default=None,
              help="logistics: trucks (default 16); churn, fleet: worlds run side by side (default 1); "
                   "module:attribute: copies of each agent (default 1)")
@click.option("--policy", type=click.Choice(["model", "baseline"]), default="model",
              help="worlds: the model's tool loop, or the world's scripted baseline (loads no model)")
@click.option("--task", default=None, help="module:attribute targets: the task given to every agent")
@click.pass_context
def run(ctx: click.Context, target: str, script_args: tuple[str, ...], model: str, db: str | None,
        display: str | None, interval: float, seed: int, agents: int | None, policy: str, task: str | None) -> None:
    """Run TARGET: a script, a world, or agents named by module:attribute.

    \b
    agentrt run logistics --policy baseline           a world: logistics, churn or fleet
    agentrt run mypkg.agents:calc --task "2 + 3?"     an agentrt.Agent, or a list of them
    agentrt run examples/calculator.py --seed 3       a script, run in this process (runpy)

    A script runs as __main__ with the options `run` does not know as its sys.argv, plus --model,
    --seed, --db and --policy when given (the examples share them); everything after `--` is passed
    verbatim. Worlds and agents record into --db and end with a summary; --display chooses what is
    shown while they run.
    """
    kind = _target_kind(target)
    if kind == "script":
        given = [name for name in SCRIPT_OPTIONS if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        _run_script(Path(target), [*script_args, *(f"--{name}={ctx.params[name]}" for name in given)])
        return
    if script_args:
        raise click.BadParameter(f"unexpected arguments {' '.join(script_args)!r}: only a script target takes "
                                 "arguments after TARGET", param_hint="TARGET")
    if kind == "world":
        if task is not None:
            raise click.BadParameter("a world sets each agent's task itself; --task is for module:attribute targets",
                                     param_hint="--task")
        name, items = target, None
    else:
        if policy == "baseline":
            raise click.BadParameter("--policy baseline is for worlds; a module:attribute agent acts on the model",
                                     param_hint="--policy")
        name, items = target.rpartition(":")[2], _agents(target, agents or 1, task)
    db = f"runs/{name}.db" if db is None else db
    display = _default_display(display)
    import asyncio

    try:
        summary = asyncio.run(_run_target(target, items, model, db, display, interval, seed, agents, policy))
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; what was recorded is in {db or '(nothing: --db was empty)'}")
    click.echo(summary)


def _target_kind(target: str) -> str:
    if target in WORLDS:
        return "world"
    if target.endswith(".py") or Path(target).is_file():
        if not Path(target).is_file():
            raise click.BadParameter(f"no script {target!r} (the file does not exist); TARGET is {TARGET_FORMS}",
                                     param_hint="TARGET")
        return "script"
    module, sep, attr = target.partition(":")
    if sep and module and attr:
        return "agents"
    raise click.BadParameter(f"{target!r} is not a target; TARGET is {TARGET_FORMS}", param_hint="TARGET")


def _run_script(path: Path, args: list[str]) -> None:
    """Run a script as __main__ in this process, with sys.argv and sys.path[0] as python would set them."""
    import runpy

    argv, syspath = sys.argv[:], sys.path[:]
    sys.argv, sys.path[0:0] = [str(path), *args], [str(path.resolve().parent)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise click.exceptions.Exit(e.code if isinstance(e.code, int) else 1)
    finally:
        sys.argv, sys.path[:] = argv, syspath


def _agents(target: str, copies: int, task: str | None) -> list:
    """The (agent, task) pairs named by module:attribute (dotted attributes allowed)."""
    import importlib

    from agentrt import Agent

    module_name, _, attr = target.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise click.BadParameter(f"cannot import module {module_name!r} of {target!r} ({e}); TARGET is "
                                 f"{TARGET_FORMS}", param_hint="TARGET")
    for part in attr.split("."):
        if not hasattr(value, part):
            raise click.BadParameter(f"module {module_name!r} has no attribute {attr!r}", param_hint="TARGET")
        value = getattr(value, part)
    found = [value] if isinstance(value, Agent) else list(value) if isinstance(value, (list, tuple)) else None
    if not found or not all(isinstance(a, Agent) for a in found):
        raise click.BadParameter(f"{target!r} is {type(value).__name__} {value!r:.80}, not an agentrt.Agent or a "
                                 "list of them", param_hint="TARGET")
    return [(a, task) for a in found for _ in range(copies)]


async def _run_target(target: str, items: list | None, model: str, db: str, display: str, interval: float,
                      seed: int, agents: int | None, policy: str) -> str:
    """Run a world or agents with a store and a display; returns the final summary."""
    import asyncio
    import time

    from agentrt import Runtime, ScriptedModel
    from agentrt.display import format_summary, progress_from_results

    store = _open_store(db)
    worlds: list = []
    try:
        spec = ScriptedModel(lambda m, t: "done", name="baseline") if policy == "baseline" and items is None else model
        async with Runtime(model=spec, recorder=store) as rt:
            if items is None:
                worlds = _worlds(target, agents)
                work = asyncio.gather(*(_play(rt, w, seed + i, policy) for i, w in enumerate(worlds)))
            else:
                work = rt.run(items)
            started = time.monotonic()
            outcome = await _show(rt, work, display, interval)
            seconds = time.monotonic() - started
            results = [r for group in outcome for r in group] if items is None else outcome
            stats = rt.model.stats() if hasattr(rt.model, "stats") else None
    finally:
        for w in worlds:
            w.close()
        if store is not None:
            await asyncio.to_thread(store.close)  # writes what is still queued
    run_id = rt.last_summary.run_id if rt.last_summary and len(worlds) <= 1 else None
    where = db
    if store is not None:
        from agentrt.store import StoreReader

        with StoreReader(db) as reader:
            where = f"{db} ({len(reader.trajectories())} trajectories in the store)"
    summary = format_summary(progress_from_results(results, seconds, run_id), title=f"{target} ({rt.model.name})",
                             db=where)
    if stats is not None and hasattr(stats, "prefix_hit_rate"):
        summary += f"\nengine: prefix-cache hit rate {stats.prefix_hit_rate:.1%}"
    return summary


def _open_store(db: str):
    if not db:
        return None
    from agentrt.store import Store

    if "://" not in db:
        Path(db).parent.mkdir(parents=True, exist_ok=True)
    return Store(db)


def _worlds(target: str, agents: int | None) -> list:
    from agentrt.environments import ChurnWorld, FleetWorld, LogisticsWorld

    if target == "logistics":
        return [LogisticsWorld(trucks=agents or 16)]
    return [(ChurnWorld if target == "churn" else FleetWorld)() for _ in range(agents or 1)]


async def _play(rt, world, seed: int, policy: str) -> list:
    from agentrt.environments import Environment, play_until_done, run_environment

    if policy == "baseline":
        return await run_environment(rt, world, seed=seed, policy="baseline")
    from agentrt import Sampling

    ticked = type(world).advance is not Environment.advance  # ticked worlds need a call every turn
    return await run_environment(rt, world, seed=seed, policy=play_until_done(world) if ticked else None,
                                 sampling=Sampling(seed=seed))


async def _show(rt, work, display: str, interval: float):
    """Await `work` under the chosen display: the TUI app (when it is built), plain lines, or nothing."""
    if display == "tui":
        try:
            from agentrt.tui.data import RuntimeSource
            from agentrt.tui.remote import TuiProcess
        except ImportError as e:
            click.echo(f"note: the TUI is not available ({e}); showing the plain display", err=True)
        else:
            import asyncio

            work = asyncio.ensure_future(work)
            # the app renders in a child process: repainting never delays the agents on this loop
            app = await TuiProcess.start(RuntimeSource(rt), refresh_hz=3.0)
            await app.wait()  # until the user quits it; a run still going on continues in plain lines
            if work.done():
                return work.result()
        display = "plain"
    if display == "plain":
        from agentrt.display import PlainDisplay

        return await PlainDisplay(rt, interval=interval).run_while(work)
    return await work


def _tui_app(source: Callable[[Any], Any]):
    """`agentrt.tui.app.make_app(source(agentrt.tui.data))`, or None (with a note) when the TUI is not available."""
    try:
        from agentrt.tui import data
        from agentrt.tui.app import make_app

        return make_app(source(data), refresh_hz=3.0)
    except ImportError as e:
        click.echo(f"note: the TUI is not available ({e}); showing the plain display", err=True)
        return None


@cli.command("watch")
@click.argument("db", required=False, type=click.Path(path_type=Path))
@click.option("--display", type=click.Choice(["tui", "plain"]), default=None, help=DISPLAY_HELP.replace(" or none", ""))
@click.option("--run", "run_id", default=None, help="the run to watch [default: the newest run in DB]")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, help="seconds between polls")
def watch(db: Path | None, display: str | None, run_id: str | None, interval: float) -> None:
    """Watch a store that another process is writing (default DB: the newest runs/*.db): summary
    lines until its run is finished (or Ctrl-C), then the summary."""
    import time

    from agentrt.display import PlainDisplay, format_summary, newest_run

    if db is None:
        found = sorted(Path("runs").glob("*.db"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise click.BadParameter("no runs/*.db here to watch; pass the store file a run is writing",
                                     param_hint="DB")
        db = found[-1]
    reader = _reader(db)
    try:
        runs = [r.id for r in reader.runs()]
        if run_id is not None and run_id not in runs:
            raise click.BadParameter(f"no run {run_id!r} in {db}; runs: {', '.join(runs) or '(none yet)'}",
                                     param_hint="--run")
        if _default_display(display) == "tui":
            app = _tui_app(lambda data: data.StoreSource(str(db), run_id=run_id))
            if app is not None:
                app.run()
                return
        while run_id is None and (run_id := newest_run(reader)) is None:
            click.echo(f"{db}: no run recorded yet; waiting", err=True)
            time.sleep(interval)
        plain = PlainDisplay(reader, interval=interval, run_id=run_id)
        try:
            last = plain.follow()
        except KeyboardInterrupt:
            click.echo("stopped watching (the run goes on)", err=True)
            return
        click.echo(format_summary(last, title="run", db=db))
    finally:
        reader.close()


@cli.command("serve")
@click.option("--model", default="tiny", help="'tiny' (the embedded model) or a checkpoint directory")
@click.option("--host", default="127.0.0.1", help="address to listen on (loopback by default; 0.0.0.0 exposes it)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="port to listen on (0: any free port)")
@click.option("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
@click.option("--served-model-name", default=None, help="the model id clients send [default: tiny, or the "
              "checkpoint directory's name]")
@click.option("--max-active", type=click.IntRange(min=1), default=None,
              help="requests in the engine at once [default: twice its max running sequences]")
@click.option("--max-waiting", type=click.IntRange(min=0), default=1024,
              help="requests queued beyond --max-active before new ones get HTTP 429")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=8.0,
              help="larger request bodies get HTTP 413")
def serve(model: str, host: str, port: int, api_key: str | None, served_model_name: str | None,
          max_active: int | None, max_waiting: int, max_body_mb: float) -> None:
    """Serve the engine over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions,
    /v1/models, /health and /metrics (Prometheus). Runs until Ctrl-C or SIGTERM."""
    if model != "tiny" and not Path(model).expanduser().is_dir():
        raise click.BadParameter(f"{model!r} is neither 'tiny' nor a checkpoint directory", param_hint="--model")
    from agentrt.server import ServerConfig, run_server, served_name

    config = ServerConfig(model_name=served_model_name or served_name(model), api_key=api_key,
                          max_active=max_active, max_waiting=max_waiting,
                          max_body_bytes=int(max_body_mb * (1 << 20)))
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)
    run_server(model, host=host, port=port, config=config, announce=lambda line: click.echo(line))


@bench.command("tui")
@click.option("--agents", **_count(500, "agents running concurrently"))
@click.option("--turns", **_count(40, "tool-loop turns per agent (model call, tool call sleeping 10-50 ms, result)"))
@click.option("--refresh-hz", type=click.FloatRange(min=0.1), default=3.0, help="the dashboard's polls per second")
@click.option("--markdown", is_flag=True, help="also print a table for docs/BENCHMARKS.md, with this command line")
def bench_tui(agents: int, turns: int, refresh_hz: float, markdown: bool) -> None:
    """What the TUI costs a run it watches: the same workload without a display, then with the
    dashboard attached headless (120x36) in the same process and event loop.

    Reports wall time, agent turns/s, event-loop lag p50/p99, the dashboard's real refresh rate and
    what a snapshot costs to take and to apply; targets (reported, never fatal): at least 2
    refreshes per second; the lag difference is reported.
    """
    from agentrt.bench.tui import format_markdown as tui_markdown
    from agentrt.bench.tui import format_text as tui_text
    from agentrt.bench.tui import run_benchmark as run_tui

    report = run_tui(agents, turns, refresh_hz, log=lambda line: click.echo(line, err=True))
    click.echo(tui_text(report))
    if markdown:
        command = ["agentrt", "bench", "tui", "--agents", agents, "--turns", turns, "--refresh-hz", f"{refresh_hz:g}",
                   "--markdown"]
        click.echo("\n" + tui_markdown(report, shlex.join(map(str, command))))


@bench.command("serve")
@click.option("--clients", **_count(200, "concurrent streaming clients"))
@click.option("--seconds", type=click.FloatRange(min=1), default=60.0, help="how long the clients keep asking")
@click.option("--max-tokens", **_count(32, "tokens generated per request"))
@click.option("--model", default="tiny", help="'tiny' or a checkpoint directory, served by a child process")
@click.option("--markdown", is_flag=True, help="also print a table for docs/BENCHMARKS.md, with this command line")
def bench_serve(clients: int, seconds: float, max_tokens: int, model: str, markdown: bool) -> None:
    """`agentrt serve` under load: concurrent streaming clients over loopback for a fixed time.

    Reports requests/s, output tokens/s, time to first token, latency, the engine's mean batch size
    and prefix-cache hit rate over the run, and every error (exit 1 if there was any).
    """
    from agentrt.bench.serve import format_markdown as serve_markdown
    from agentrt.bench.serve import format_text as serve_text
    from agentrt.bench.serve import run_benchmark as run_serve

    report = run_serve(clients, seconds, max_tokens, model, log=lambda line: click.echo(line, err=True))
    click.echo(serve_text(report))
    if markdown:
        command = ["agentrt", "bench", "serve", "--clients", clients, "--seconds", f"{seconds:g}",
                   "--max-tokens", max_tokens, "--markdown"]
        click.echo("\n" + serve_markdown(report, shlex.join(map(str, command))))
    if report.errors:
        raise click.exceptions.Exit(1)


@bench.command("kernels")
@click.option("--shapes", type=click.Choice(["nano", "small"]), default=None,
              help="model shapes: Nemotron 3 Nano's, or the embedded tiny model's  [default: nano on CUDA, small on CPU]")
@click.option("--layers", **_count(4, "layers of the random model the engine row runs (hybrid pattern M*ME...)"))
@click.option("--iters", **_count(20, "timed calls per kernel (the median is reported)"))
@click.option("--skip-engine", is_flag=True, help="only the kernels, not the engine against transformers")
@click.option("--markdown", is_flag=True, help="also print a table for docs/BENCHMARKS.md, with this command line")
def bench_kernels(shapes: str | None, layers: int, iters: int, skip_engine: bool, markdown: bool) -> None:
    """Each NemotronH kernel against the device's measured copy bandwidth and matmul rate.

    Reports achieved GB/s (inputs read once + outputs written once) and TFLOP/s per kernel, as
    shares of the device's copy bandwidth and matmul rate, with the targets (decode attention and
    the state update >= 70% of copy bandwidth, MoE experts at batch 64 >= 60% of its bandwidth
    roofline); then our engine's decode tokens/s against transformers' batched generate on the
    same random weights. Triton kernels in bf16 on CUDA, the torch paths in fp32 on CPU.
    """
    from agentrt.bench.kernels import format_markdown as kernels_markdown
    from agentrt.bench.kernels import format_text as kernels_text
    from agentrt.bench.kernels import run_benchmark as run_kernels

    report = run_kernels(shapes, layers, iters, skip_engine, log=lambda line: click.echo(line, err=True))
    click.echo(kernels_text(report))
    if markdown:
        command = ["agentrt", "bench", "kernels", "--shapes", report.shapes.name, "--layers", layers,
                   "--iters", iters, *(["--skip-engine"] if skip_engine else []), "--markdown"]
        click.echo("\n" + kernels_markdown(report, shlex.join(map(str, command))))


def main() -> None:
    cli(prog_name="agentrt")


if __name__ == "__main__":
    main()
