"""`agentrt bench engine`: many agents, one shared system prompt, several turns each.

Every agent's turn t prompt is its turn t-1 prompt, the tokens it generated, and a new user
message. Three contestants run that workload one after the other in one process, on the same
weights: our `Engine` (batching + prefix cache), transformers' `generate` called once per agent
and turn (what a local-model agent framework does), and transformers' `generate` over all agents
at once per turn. Greedy decoding makes the outputs comparable token for token; a difference is a
bug and fails the run.

>>> from agentrt.bench.engine import Workload, run_benchmark, format_text   # doctest: +SKIP
>>> report = run_benchmark(Workload(agents=4, turns=2), ["hf-per-agent", "hf-batched"])
>>> print(format_text(report))
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

Transcript = list[list[list[int]]]  # [agent][turn] -> generated token ids
TARGETS = {"hf-per-agent": 20.0, "hf-batched": 5.0}  # agentrt tokens/s over the peer's, at least
TARGET_HIT_RATE = 0.90


@dataclass(frozen=True, slots=True)
class Workload:
    """The agent workload: ids are drawn from [first_id, vocab_size), seeded, so every run sees the same tokens.

    User messages depend only on (seed, agent, turn), so a smaller workload with the same sizes is
    a prefix of a larger one: its transcripts must equal the larger run's first agents and turns.
    """

    agents: int = 32
    turns: int = 4
    system_tokens: int = 1024
    user_tokens: int = 64
    gen_tokens: int = 32
    seed: int = 0
    first_id: int = 12  # ids below are special tokens (the embedded model's 0-11)
    vocab_size: int = 2048

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)} must be >= {lo}" for k, lo in
                    (("agents", 1), ("turns", 1), ("system_tokens", 0), ("user_tokens", 1), ("gen_tokens", 1))
                    if getattr(self, k) < lo]
        if not 0 <= self.first_id < self.vocab_size:
            problems.append(f"first_id={self.first_id} must be in [0, vocab_size={self.vocab_size})")
        if problems:
            raise ValueError("invalid workload: " + "; ".join(problems))

    def _ids(self, label: str, n: int) -> list[int]:
        rng = random.Random(f"agentrt-bench/{self.seed}/{label}")
        return [rng.randrange(self.first_id, self.vocab_size) for _ in range(n)]

    def system_prompt(self) -> list[int]:
        return self._ids("system", self.system_tokens)

    def user_message(self, agent: int, turn: int) -> list[int]:
        return self._ids(f"user/{agent}/{turn}", self.user_tokens)

    def prompt(self, agent: int, turn: int, previous: list[int] | None = None,
               generated: list[int] | None = None) -> list[int]:
        """Turn 0: system + user message; later turns: the previous prompt + its generated tokens + a user message."""
        if turn == 0:
            return self.system_prompt() + self.user_message(agent, 0)
        return previous + generated + self.user_message(agent, turn)

    def prompt_lengths(self) -> list[int]:
        """Prompt length of each turn (the same for every agent)."""
        return [self.system_tokens + (t + 1) * self.user_tokens + t * self.gen_tokens for t in range(self.turns)]

    def ideal_hit_rate(self) -> float:
        """The best prefix-cache hit rate: only the system prompt once and each user message are new."""
        total = self.agents * sum(self.prompt_lengths())
        return 1 - (self.system_tokens + self.agents * self.turns * self.user_tokens) / total

    def short(self) -> Workload:
        return replace(self, agents=min(self.agents, 2), turns=min(self.turns, 2))


# --- measurement ---------------------------------------------------------------------------------

class Stopwatch:
    """`with clock:` times the block; a contestant wraps exactly its workload, not its setup or warm-up.

    `cpu_seconds` is this process's CPU time over the block: far below wall x threads means the
    machine was busy with something else.
    """

    def __init__(self) -> None:
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Resident-set high-water mark above its value at `__enter__`.

    On Linux the kernel keeps the mark: `__enter__` resets it (`/proc/self/clear_refs`) and
    `__exit__` reads it (`VmHWM`), so nothing runs meanwhile. Elsewhere a thread samples the RSS
    every `interval` s, which costs the measured code some GIL time.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        if not _reset_high_water_mark():
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_bytes(), _high_water_mark() if self._thread is None else 0)

    @property
    def above_start(self) -> int:
        return self.peak - self.start


def _reset_high_water_mark() -> bool:
    """Set the kernel's peak-RSS mark of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() > 0
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        line = next((line for line in f if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else 0


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (and cached blocks back to CUDA), so the
    next contestant starts low."""
    from agentrt.model.compute import compute

    compute.call(lambda: None)  # a barrier: the compute thread has let go of the last engine's step
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# --- contestants ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Models:
    lm: Any        # agentrt.model.LoadedModel
    hf: Any = None  # transformers' NemotronHForCausalLM on the same weights, device and dtype


@dataclass(slots=True)
class Outcome:
    tokens: Transcript
    prompt_tokens: int    # every prompt token of every turn
    computed_tokens: int  # prompt tokens the contestant ran through the model (prompt - cached)
    engine_stats: dict = field(default_factory=dict)


def run_agentrt(models: Models, workload: Workload, clock: Stopwatch) -> Outcome:
    """Our engine: all agents as concurrent asyncio tasks, each with its turns in sequence."""
    import asyncio

    from agentrt.model.engine import Engine, EngineConfig
    from agentrt.model.request import Request, SamplingParams

    engine = Engine(models.lm, EngineConfig())

    async def agent(i: int, wl: Workload) -> tuple[list[list[int]], list]:
        prompt, generated, counts = None, [], []
        for turn in range(wl.turns):
            prompt = wl.prompt(i, turn, prompt, generated[-1] if generated else None)
            sampling = SamplingParams(temperature=0, max_tokens=wl.gen_tokens, ignore_eos=True)
            result = await engine.submit(Request(prompt_ids=prompt, sampling=sampling, session=f"agent-{i}")).result()
            generated.append(list(result.token_ids))
            counts.append(result.counts)
        return generated, counts

    async def main() -> list:
        async with engine:
            # warm-up on unrelated tokens (another seed), so one-off costs stay out of the timing
            await agent(-1, replace(workload, turns=1, system_tokens=16, user_tokens=16, gen_tokens=2,
                                    seed=-1 - workload.seed))
            with clock:
                return await asyncio.gather(*(agent(i, workload) for i in range(workload.agents)))

    agents = asyncio.run(main())
    counts = [c for _, cs in agents for c in cs]
    stats = engine.stats()
    return Outcome(
        tokens=[g for g, _ in agents],
        prompt_tokens=sum(c.prompt for c in counts),
        computed_tokens=sum(c.prompt - c.cached_prompt for c in counts),
        engine_stats={k: getattr(stats, k) for k in ("prefix_hit_rate", "mean_batch_size") if hasattr(stats, k)},
    )


def hf_greedy(hf: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' `generate`, greedy, exactly `n` new tokens per prompt (left-padded, with a mask).

    `eos_token_id=None` is our `ignore_eos`: end-of-turn ids may be generated and do not stop
    generation. (`min_new_tokens` would instead forbid them, changing the greedy choice.)
    """
    import torch

    width = max(map(len, prompts))
    pad = hf.generation_config.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=pad)
    if out.shape[1] != width + n:
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, expected {n}")
    return out[:, width:].tolist()


@contextmanager
def hf_decode_clamp(hf: Any, notes: list[str]) -> Iterator[None]:
    """Add to transformers' one-token Mamba step the `dt >= time_step_min` clamp its prefill applies.

    Without it (transformers 5.x), cached decoding drifts from transformers' own full-sequence
    forward, and greedy picks flip where the top two logits are close (docs/model.md).
    """
    import torch.nn.functional as F
    from transformers.models.nemotron_h import modeling_nemotron_h as nemotron_h

    original = getattr(nemotron_h, "mamba2_selective_state_update", None)
    if original is None:
        notes.append("transformers has no mamba2_selective_state_update to add the dt clamp to; ran it as shipped")
        yield
        return
    floor = hf.config.time_step_min

    def clamped(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        return original(state, hidden_states, dt.clamp(min=floor), A, B, C, D, z=z, **kwargs)

    notes.append(f"transformers' one-token Mamba step ran with the dt >= time_step_min ({floor:g}) clamp its "
                 "prefill applies (--no-hf-dt-clamp runs it as shipped)")
    nemotron_h.mamba2_selective_state_update = clamped
    try:
        yield
    finally:
        nemotron_h.mamba2_selective_state_update = original


def run_hf_per_agent(models: Models, workload: Workload, clock: Stopwatch) -> Outcome:
    """One `generate` per agent and turn, no cache kept between calls."""
    tokens, prompt_tokens = [], 0
    with clock:
        for i in range(workload.agents):
            prompt, generated = None, []
            for turn in range(workload.turns):
                prompt = workload.prompt(i, turn, prompt, generated[-1] if generated else None)
                generated.append(hf_greedy(models.hf, [prompt], workload.gen_tokens)[0])
                prompt_tokens += len(prompt)
            tokens.append(generated)
    return Outcome(tokens, prompt_tokens, prompt_tokens)


def run_hf_batched(models: Models, workload: Workload, clock: Stopwatch) -> Outcome:
    """One `generate` per turn over all agents' prompts."""
    prompts: list = [None] * workload.agents
    tokens: Transcript = [[] for _ in range(workload.agents)]
    prompt_tokens = 0
    with clock:
        for turn in range(workload.turns):
            prompts = [workload.prompt(i, turn, prompts[i], tokens[i][-1] if turn else None)
                       for i in range(workload.agents)]
            for i, generated in enumerate(hf_greedy(models.hf, prompts, workload.gen_tokens)):
                tokens[i].append(generated)
            prompt_tokens += sum(map(len, prompts))
    return Outcome(tokens, prompt_tokens, prompt_tokens)


CONTESTANTS: dict[str, Callable[[Models, Workload, Stopwatch], Outcome]] = {
    "agentrt": run_agentrt,
    "hf-per-agent": run_hf_per_agent,
    "hf-batched": run_hf_batched,
}


def engine_import_error() -> str | None:
    """Why the agentrt contestant cannot run (its engine does not import), or None."""
    try:
        from agentrt.model.engine import Engine, EngineConfig  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


# --- the run and its report ----------------------------------------------------------------------

@dataclass(slots=True)
class Result:
    name: str
    generated_tokens: int
    wall_s: float
    cpu_s: float
    tokens_per_s: float
    prompt_tokens: int
    computed_prompt_tokens: int
    hit_rate: float
    peak_rss_mb: float
    tokens: Transcript
    engine_stats: dict = field(default_factory=dict)
    runs_s: list[float] = field(default_factory=list)  # wall seconds of every repeat, in run order


@dataclass(slots=True)
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class Report:
    workload: Workload
    machine: dict
    results: dict[str, Result]
    checks: list[Check]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def speedup(self, peer: str) -> float | None:
        """agentrt tokens/s over `peer`'s, when both ran."""
        if "agentrt" not in self.results or peer not in self.results:
            return None
        return self.results["agentrt"].tokens_per_s / self.results[peer].tokens_per_s

    def targets(self) -> list[tuple[str, float, float, bool]]:
        """(what, value, goal, passed) for each target whose contestants ran."""
        out = [(f"agentrt / {peer} tokens/s", s, goal, s >= goal)
               for peer, goal in TARGETS.items() if (s := self.speedup(peer)) is not None]
        if "agentrt" in self.results:
            hit = self.results["agentrt"].hit_rate
            out.append(("agentrt prefix-cache hit rate", hit, TARGET_HIT_RATE, hit >= TARGET_HIT_RATE))
        return out

    def to_json(self) -> dict:
        return {
            "workload": asdict(self.workload), "machine": self.machine,
            "contestants": {name: asdict(r) for name, r in self.results.items()},
            "speedup": {peer: self.speedup(peer) for peer in TARGETS if self.speedup(peer) is not None},
            "targets": [dict(zip(("what", "value", "goal", "passed"), t)) for t in self.targets()],
            "checks": [asdict(c) for c in self.checks], "notes": self.notes, "ok": self.ok,
        }


def first_difference(a: Transcript, b: Transcript, names: tuple[str, str]) -> str | None:
    """Where two transcripts first differ (over the agents and turns both have), or None."""
    for i, (ta, tb) in enumerate(zip(a, b)):
        for t, (ga, gb) in enumerate(zip(ta, tb)):
            if ga != gb:
                k = next((k for k, (x, y) in enumerate(zip(ga, gb)) if x != y), min(len(ga), len(gb)))
                show = lambda g: g[k] if k < len(g) else f"end after {len(g)} tokens"  # noqa: E731
                return f"agent {i}, turn {t}, token {k}: {names[0]} {show(ga)}, {names[1]} {show(gb)}"
    return None


def machine_info(lm: Any) -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    device = lm.model.device
    return {
        "cpu": cpu or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # others' work skews timings
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


DTYPES = ("auto", "float32", "bfloat16")


def load_models(model: str = "tiny", dtype: str = "auto") -> Models:
    """Our model and transformers' oracle on the same weights, device and dtype ("auto": fp32 on
    CPU, bf16 on CUDA)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from agentrt.model import load

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from agentrt.model.compute import compute

    lm = load(model, dtype=None if dtype == "auto" else getattr(torch, dtype))
    hf = compute.call(lambda: AutoModelForCausalLM.from_pretrained(lm.path, dtype=lm.model.dtype)
                      .to(lm.model.device).eval())
    return Models(lm, hf)


def measure(name: str, models: Models, workload: Workload) -> Result:
    release_memory()
    clock = Stopwatch()
    from agentrt.model.compute import compute

    # transformers runs on agentrt's compute thread too: one OpenMP team per process (see
    # agentrt/model/compute.py), so neither side pays for the other's idle threads
    run = CONTESTANTS[name] if name == "agentrt" else partial(compute.call, CONTESTANTS[name])
    with PeakRSS() as memory:
        outcome = run(models, workload, clock)
    generated = sum(len(g) for turns in outcome.tokens for g in turns)
    return Result(
        name=name, generated_tokens=generated, wall_s=clock.seconds, cpu_s=clock.cpu_seconds,
        tokens_per_s=generated / clock.seconds,
        prompt_tokens=outcome.prompt_tokens, computed_prompt_tokens=outcome.computed_tokens,
        hit_rate=1 - outcome.computed_tokens / outcome.prompt_tokens, peak_rss_mb=memory.above_start / 2**20,
        tokens=outcome.tokens, engine_stats=outcome.engine_stats,
    )


def run_benchmark(workload: Workload, names: list[str], *, models: Models | None = None, hf_dt_clamp: bool = True,
                  repeat: int = 1, dtype: str = "auto", log: Callable[[str], None] = lambda _: None) -> Report:
    """Check the oracle on a short version of the workload, then run and measure each contestant.

    With `repeat` > 1 the contestants run in `repeat` interleaved rounds (all of them once, then all
    again), so that a slow phase of the machine falls on every contestant alike; each is reported
    by its median run, every run's time kept in `runs_s`.
    """
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown or not names:
        raise ValueError(f"contestants {names}: choose one or more of {', '.join(CONTESTANTS)}")
    if repeat < 1:
        raise ValueError(f"repeat={repeat}: run each contestant at least once")
    log("loading the embedded model and its transformers twin")
    models = models or load_models(dtype=dtype)
    workload = replace(workload, vocab_size=models.lm.config.vocab_size,
                       first_id=max(models.lm.tokenizer.special_token_ids, default=-1) + 1)
    machine, notes = machine_info(models.lm), []
    with hf_decode_clamp(models.hf, notes) if hf_dt_clamp else nullcontext():
        checks, results = _run(models, workload, names, log, repeat)
    if repeat > 1:
        notes.append(f"{repeat} interleaved rounds; each contestant's row is its median run (runs in order: "
                     + "; ".join(f"{n} " + ", ".join(f"{t:.2f}" for t in r.runs_s) + " s" for n, r in results.items())
                     + ")")
    return Report(workload, machine, results, checks, notes)


def _run(models: Models, workload: Workload, names: list[str], log: Callable[[str], None],
         repeat: int = 1) -> tuple[list[Check], dict[str, Result]]:
    from agentrt.model.generate import generate

    short = workload.short()
    log(f"checking the oracle on {short.agents} agents x {short.turns} turns (also warms transformers up)")
    from agentrt.model.compute import compute

    reference = compute.call(run_hf_per_agent, models, short, Stopwatch()).tokens
    batched = compute.call(run_hf_batched, models, short, Stopwatch()).tokens
    ours = compute.call(lambda: [t for t, _ in generate(models.lm.model, short.prompt(0, 0), short.gen_tokens)])
    checks = [
        Check(f"transformers generate == agentrt.model.generate (1 prompt, {short.gen_tokens} tokens)",
              ours == reference[0][0], first_difference([[ours]], reference, ("ours", "transformers")) or ""),
        Check(f"hf-per-agent == hf-batched ({short.agents} agents x {short.turns} turns)",
              batched == reference, first_difference(reference, batched, ("hf-per-agent", "hf-batched")) or ""),
    ]

    runs: dict[str, list[Result]] = {n: [] for n in CONTESTANTS if n in names}
    for round_ in range(repeat):
        for name, done in runs.items():
            log(f"running {name}" + (f" (round {round_ + 1} of {repeat})" if repeat > 1 else ""))
            done.append(r := measure(name, models, workload))
            log(f"  {r.generated_tokens} tokens in {r.wall_s:.2f} s ({r.tokens_per_s:.1f} tokens/s)")
    results = {}
    for name, done in runs.items():
        results[name] = sorted(done, key=lambda r: r.wall_s)[(len(done) - 1) // 2]  # the median (lower) run
        results[name].runs_s = [r.wall_s for r in done]
        diffs = [d for r in done[1:] if (d := first_difference(done[0].tokens, r.tokens, (name, f"{name} again")))]
        if repeat > 1:
            checks.append(Check(f"{name}: the same tokens in all {repeat} rounds", not diffs, "; ".join(diffs)))
    if len(results) == 1:  # nothing to compare the full run with: compare its start with the oracle's
        (name, r), = results.items()
        diff = first_difference(r.tokens, reference, (name, "hf-per-agent"))
        checks.append(Check(f"{name} == hf-per-agent on the first {short.agents} agents x {short.turns} turns",
                            diff is None, diff or ""))
    else:
        (first, a), *rest = results.items()
        diffs = [d for n, r in rest if (d := first_difference(a.tokens, r.tokens, (first, n)))]
        checks.append(Check(f"{' == '.join(results)} on all {workload.agents} agents x {workload.turns} turns",
                            not diffs, "; ".join(diffs)))
    return checks, results


# --- formatting ----------------------------------------------------------------------------------

COLUMNS = ("contestant", "generated tokens", "wall s", "cpu s", "tokens/s", "prompt tokens computed",
           "prefix hit rate", "peak RSS MB", "agentrt speedup")


def _rows(report: Report) -> list[list[str]]:
    rows = []
    for name, r in report.results.items():
        speedup = report.speedup(name) if name != "agentrt" else None
        rows.append([name, f"{r.generated_tokens:,}", f"{r.wall_s:.2f}", f"{r.cpu_s:.1f}", f"{r.tokens_per_s:,.1f}",
                     f"{r.computed_prompt_tokens:,} of {r.prompt_tokens:,}", f"{r.hit_rate:.1%}",
                     f"{r.peak_rss_mb:,.1f}", f"{speedup:.1f}x" if speedup is not None else "-"])
    return rows


def _describe(report: Report) -> tuple[str, str]:
    w, m = report.workload, report.machine
    workload = (f"{w.agents} agents x {w.turns} turns; shared system prompt {w.system_tokens} tokens, "
                f"{w.user_tokens}-token user message and {w.gen_tokens} generated tokens (greedy) per turn; "
                f"seed {w.seed}")
    machine = (f"{m['cpu']}, {m['usable_cores']} of {m['cores']} cores, torch {m['torch']} "
               f"({m['torch_threads']} threads), transformers {m['transformers']}, {m['device']} {m['dtype']}; "
               f"load average {m['load_average']:.2f} before the run; {m['date']}")
    return workload, machine


def _target_lines(report: Report) -> list[str]:
    lines = []
    for what, value, goal, passed in report.targets():
        fmt = (lambda v: f"{v:.1%}") if "hit rate" in what else (lambda v: f"{v:.1f}x")
        extra = f" (ideal {report.workload.ideal_hit_rate():.1%})" if "hit rate" in what else ""
        lines.append(f"{what}: {fmt(value)}, target >= {fmt(goal)}{extra}: {'PASS' if passed else 'FAIL'}")
    if "agentrt" in report.results and report.results["agentrt"].engine_stats:
        lines.append("agentrt engine stats: " + ", ".join(
            f"{k} {v:.3g}" for k, v in report.results["agentrt"].engine_stats.items()))
    return lines


def format_text(report: Report) -> str:
    workload, machine = _describe(report)
    rows = [list(COLUMNS)] + _rows(report)
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    table = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    checks = [f"{'ok  ' if c.ok else 'FAIL'} {c.what}" + (f": {c.detail}" if c.detail else "") for c in report.checks]
    targets = _target_lines(report)
    return "\n".join([f"workload: {workload}", f"machine:  {machine}", "", *table, "", *targets, *[""][:len(targets)],
                      "checks:", *checks, *(f"note: {n}" for n in report.notes)])


def format_markdown(report: Report, command: str) -> str:
    workload, machine = _describe(report)
    rows = [list(COLUMNS), ["---"] + ["---:"] * (len(COLUMNS) - 1)] + _rows(report)
    table = ["| " + " | ".join(r) + " |" for r in rows]
    checks = [f"- {'ok' if c.ok else '**FAIL**'}: {c.what}" + (f" ({c.detail})" if c.detail else "")
              for c in report.checks]
    return "\n".join([f"```\n{command}\n```", "", f"Workload: {workload}.", "", f"Machine: {machine}.", "",
                      *table, "", *(f"- {line}" for line in _target_lines(report)), *checks,
                      *(f"- note: {n}" for n in report.notes)])
