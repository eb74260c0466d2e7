"""The engine: batching, prefix caching, memory pressure and cancellation change no numbers."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch

from agentrt.model import generate, load
from agentrt.model.engine import Engine, EngineConfig
from agentrt.model.request import Request, SamplingParams, ThinkingBudget
from agentrt.model.runner import run_batch
from agentrt.model.sequence import Sequence

TOL = 1e-4


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGENTRT_HOME", str(tmp_path_factory.mktemp("home")))
        return load("tiny")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(12, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def run(engine: Engine, requests: list[Request], cancel_after: dict[str, int] | None = None):
    """Run requests to completion on a started engine; optionally cancel some after k tokens."""

    async def one(handle):
        n = 0
        async for _ in handle:
            n += 1
            if cancel_after and n == cancel_after.get(handle.id):
                handle.cancel()
        return await handle.result()

    async def main():
        async with engine:
            return await asyncio.gather(*(one(engine.submit(r)) for r in requests))

    return asyncio.run(main())


@torch.no_grad()
def full_logits(lm, tokens: list[int]) -> torch.Tensor:
    return lm.model.logits(lm.model(torch.tensor(tokens)))


def teacher_forced(engine: Engine, streams: list[tuple[list[int], int]]) -> list[list[torch.Tensor]]:
    """Drive the scheduler and runner directly: stream i starts with its first p_i tokens as the
    prompt and then receives its next known token whenever it would sample. Returns, per stream,
    the logits of every position it fed, in order."""
    seqs = []
    for tokens, p in streams:
        seq = Sequence(Request(tokens[:p]), None, None)
        seq.teacher = tokens
        seqs.append(seq)
        engine.scheduler.waiting.append(seq)
    out = {id(s): [] for s in seqs}
    while engine.scheduler.running or engine.scheduler.waiting:
        batch = engine.scheduler.schedule()
        logits = run_batch(engine.model, engine.kv, engine.states, batch, all_logits=True)
        start = 0
        for seq, n in batch:
            out[id(seq)].extend(logits[start:start + n])
            start += n
            engine.scheduler.advance(seq, n)
            if seq.computed == len(seq.tokens):
                if len(seq.tokens) == len(seq.teacher):
                    engine.scheduler.finish(seq)
                else:
                    seq.tokens.append(seq.teacher[len(seq.tokens)])
    return [out[id(s)] for s in seqs]


@pytest.fixture(params=["c", "torch"])
def mamba_path(request, monkeypatch):
    """The engine's two CPU paths through Mamba layers: the C kernel on pooled states, or torch ops."""
    from agentrt.kernels import cpu

    monkeypatch.setenv(cpu.CPU_KERNELS_ENV, "1" if request.param == "c" else "0")
    if request.param == "c" and not cpu.available():
        pytest.skip("no C compiler here: the engine runs the torch path only")
    return request.param


def test_batching_changes_no_logits(lm, mamba_path):
    """32 requests, mixed prefill chunks and decodes in the same steps, match each request alone."""
    engine = Engine(lm, EngineConfig(token_budget=96, max_running=32))
    rng = random.Random(0)
    streams = []
    for i in range(32):
        prompt = rng.choice([1, 5, 40, 130])
        streams.append((ids(prompt + rng.randint(4, 12), 100 + i), prompt))
    got = teacher_forced(engine, streams)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    for (tokens, _), rows in zip(streams, got):
        assert len(rows) == len(tokens)
        torch.testing.assert_close(torch.stack(rows), full_logits(lm, tokens), atol=TOL, rtol=0)


def test_decoding_over_a_shared_prefix_changes_no_logits(lm, mamba_path, monkeypatch):
    """Sequences that share a cached system prompt decode together: every decode step reads the
    prefix once for all of them (the C kernel, or the torch cascade), and every logit matches a
    from-scratch run of that sequence."""
    from agentrt.kernels import cpu

    calls = []
    real = cpu.decode_attention
    monkeypatch.setattr(cpu, "decode_attention", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    engine = Engine(lm, EngineConfig(max_running=16))
    system = ids(100, 9)
    streams = [(system + ids(3 + i % 5, 300 + i) + ids(14, 400 + i), 100 + 3 + i % 5) for i in range(12)]
    run(engine, [Request(system, greedy(1))])  # caches the system prompt, with its Mamba state
    got = teacher_forced(engine, streams)
    for (tokens, _), rows in zip(streams, got):
        assert 14 < len(rows) < len(tokens) - 64  # the prefix came from the cache
        torch.testing.assert_close(torch.stack(rows), full_logits(lm, tokens)[-len(rows):], atol=TOL, rtol=0)
    if mamba_path == "c":  # the all-decode steps ran the C kernel with the prefix as their shared keys
        assert calls and all(len(t.shared) >= 100 for t in calls)
    else:
        assert not calls


def test_seeded_sampling_is_the_same_alone_and_batched(lm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, seed=7, max_tokens=24, ignore_eos=True)
    target = Request(ids(30, 1), params)
    (alone,) = run(Engine(lm), [target])
    others = [Request(ids(10 + 7 * i, 50 + i), SamplingParams(temperature=1.0, seed=i, max_tokens=30)) for i in range(15)]
    batched = run(Engine(lm), others[:8] + [Request(target.prompt_ids, params)] + others[8:])[8]
    assert alone.token_ids == batched.token_ids and len(alone.token_ids) == 24
    other_seed = run(Engine(lm), [Request(target.prompt_ids, dataclasses.replace(params, seed=8))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_greedy_engine_output_equals_the_single_sequence_loop(lm):
    prompts = [ids(n, 200 + n) for n in (3, 17, 64, 150)]
    results = run(Engine(lm), [Request(p, greedy(12)) for p in prompts])
    for p, r in zip(prompts, results):
        expected = list(generate(lm.model, p, 12))
        assert r.token_ids == [t for t, _ in expected]
        assert r.logprobs == pytest.approx([lp for _, lp in expected], abs=1e-4)
        assert r.finish_reason == "length" and r.counts.output == 12


def test_multi_turn_session_resumes_from_the_cache(lm, mamba_path):
    """Turn 2 prefills only its new tokens and gives the logits of a from-scratch run."""
    engine = Engine(lm)
    turn1 = ids(80, 3)
    (r1,) = run(engine, [Request(turn1, greedy(10), session="a")])
    history = turn1 + r1.token_ids
    turn2 = history + ids(15, 4)
    (r2,) = run(engine, [Request(turn2, greedy(5), session="a")])
    assert r2.counts.cached_prompt == len(history) - 1  # all but the last sampled token, never fed
    # teacher-forced: the resumed sequence feeds exactly the new tokens, with from-scratch logits
    extra = ids(6, 5)
    full = turn2 + r2.token_ids + extra
    prompt_len = len(turn2) + len(r2.token_ids) + 1
    (rows,) = teacher_forced(engine, [(full, prompt_len)])
    fed = len(rows)
    assert fed == len(full) - (len(turn2) + len(r2.token_ids) - 1)
    torch.testing.assert_close(torch.stack(rows), full_logits(lm, full)[-fed:], atol=TOL, rtol=0)


def test_shared_system_prompt_is_prefilled_once(lm):
    engine = Engine(lm, EngineConfig(token_budget=4096))
    system = ids(1024, 9)
    suffixes = [[12 + i] + ids(20, 300 + i) for i in range(32)]  # distinct first tokens
    results = run(engine, [Request(system + s, greedy(1)) for s in suffixes])
    stats = engine.stats()
    assert all(r.counts.output == 1 for r in results)
    assert sorted(r.counts.cached_prompt for r in results) == [0] + [1024] * 31
    assert stats.tokens_fed == 1024 + 32 * 21  # max_tokens=1: nothing but prompts was fed
    assert stats.prefix_hit_rate == pytest.approx(31 * 1024 / (32 * 1045))


def test_memory_pressure_changes_no_output(lm):
    prompts = [ids(150 + 10 * i, 400 + i) for i in range(16)]
    need = sum(len(p) + 40 for p in prompts)
    roomy = run(Engine(lm), [Request(p, greedy(40)) for p in prompts])
    tight = Engine(lm, EngineConfig(kv_slots=need // 4, state_slots=6, max_running=16))
    squeezed = run(tight, [Request(p, greedy(40)) for p in prompts])
    assert [r.token_ids for r in squeezed] == [r.token_ids for r in roomy]
    assert all(r.finish_reason == "length" for r in squeezed)
    assert tight.stats().preemptions > 0


def test_cancel_returns_every_slot(lm):
    engine = Engine(lm, EngineConfig(max_running=8))
    kv_free, state_free = engine.kv.num_free, engine.states.num_free
    requests = [Request(ids(60 + i, 500 + i), greedy(80)) for i in range(12)]
    results = run(engine, requests, cancel_after={r.id: 3 + i for i, r in enumerate(requests[:6])})
    assert [r.finish_reason for r in results] == ["cancelled"] * 6 + ["length"] * 6
    assert all(3 + i <= len(r.token_ids) < 80 for i, r in enumerate(results[:6]))
    assert engine.cache.root.lock == 1  # nothing left locked
    engine.cache.clear()
    assert (engine.kv.num_free, engine.states.num_free) == (kv_free, state_free)


@pytest.mark.slow
def test_no_leak_after_a_thousand_requests(lm):
    engine = Engine(lm, EngineConfig(max_running=64, kv_slots=20000, state_slots=96))
    rng = random.Random(1)
    shared = ids(40, 11)
    requests = [Request((shared if i % 3 == 0 else []) + ids(rng.randint(2, 24), 1000 + i), greedy(rng.randint(1, 5)))
                for i in range(1000)]
    cancel = {r.id: 1 for r in requests[::7]}
    results = run(engine, requests, cancel_after=cancel)
    assert len(results) == 1000 and {r.finish_reason for r in results} <= {"length", "cancelled"}
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine._seqs
    assert engine.cache.root.lock == 1
    engine.cache.clear()
    assert engine.kv.num_free == engine.kv.capacity and engine.states.num_free == engine.states.capacity
    assert engine.cache.num_tokens == 0 and engine.cache.num_snapshots == 0


def test_a_closed_engine_frees_its_pools(lm):
    """Once an engine has run and closed, nothing keeps it (and its pools: most of a GPU's memory)
    alive; the compute thread every engine shares once held its last step's engine until the next
    task came."""
    import gc
    import time
    import weakref

    engine = Engine(lm, EngineConfig(max_running=4))
    run(engine, [Request(ids(30 + i, 40 + i), greedy(3)) for i in range(3)])
    refs = [weakref.ref(engine), weakref.ref(engine.kv), weakref.ref(engine.states)]
    del engine
    deadline = time.monotonic() + 5  # the compute thread may still be unwinding its last step
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert [r() for r in refs] == [None, None, None]


def test_the_torch_paths_run_in_bf16(lm, monkeypatch):
    """bf16 through the engine's torch paths (what CUDA runs with AGENTRT_KERNELS=ref): teacher-
    forced logits of a mixed prefill/decode batch are as close to the fp32 model's as transformers'
    own bf16 model is. Per position: most within about 2%, a few far off where bf16 rounding flips
    an expert in a router's top-k, on either side."""
    from transformers import AutoModelForCausalLM

    from agentrt.kernels import cpu

    monkeypatch.setenv(cpu.CPU_KERNELS_ENV, "0")  # the C kernel is fp32-only; bf16 takes torch ops
    lm16 = load(lm.path, dtype=torch.bfloat16)
    hf16 = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.bfloat16).eval()
    streams = [(ids(p + 6, 300 + i), p) for i, p in enumerate([1, 40, 130, 7])]
    got = teacher_forced(Engine(lm16, EngineConfig(token_budget=64, max_running=8)), streams)

    def errors(rows: torch.Tensor, want: torch.Tensor) -> list[float]:
        return ((rows.float() - want).norm(dim=-1) / want.norm(dim=-1)).tolist()

    ours, theirs = [], []
    with torch.no_grad():
        for (tokens, _), rows in zip(streams, got):
            want = full_logits(lm, tokens)
            ours += errors(torch.stack(rows), want)
            theirs += errors(hf16(torch.tensor([tokens])).logits[0], want)
    ours, theirs = torch.tensor(ours), torch.tensor(theirs)
    assert ours.median() < 1.5 * theirs.median() and ours.mean() < 2.5 * theirs.mean(), (ours, theirs)


def test_thinking_budget(lm):
    open_prompt = lm.chat_format.render([{"role": "user", "content": "plan the route"}], enable_thinking=True)
    end = lm.tokenizer.token_to_id("</think>")
    budgets = [(0, 0), (0, 8), (5, 0), (12, 4), (30, 10)]
    requests = [Request(open_prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=80, ignore_eos=True),
                        thinking=ThinkingBudget(b, g)) for s, (b, g) in enumerate(budgets)]
    for r, (budget, grace) in zip(run(Engine(lm), requests), budgets):
        assert end in r.token_ids, "end-think must be present"
        closed_at = r.token_ids.index(end)
        assert r.counts.thinking == closed_at <= budget + grace
        if budget == 0:
            assert closed_at == 0  # budget 0 skips thinking
    closed_prompt = lm.chat_format.render([{"role": "user", "content": "x"}], enable_thinking=False)
    (r,) = run(Engine(lm), [Request(closed_prompt, greedy(10), thinking=ThinkingBudget(0))])
    assert r.counts.thinking == 0  # not inside a think block; a <think> the model opens is closed at once


def test_stop_tokens_and_strings(lm):
    prompt = ids(20, 12)
    (free,) = run(Engine(lm), [Request(prompt, greedy(20))])
    stop_tok = free.token_ids[5]
    (a,) = run(Engine(lm), [Request(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]))])
    assert a.finish_reason == "stop" and a.token_ids == free.token_ids[: free.token_ids.index(stop_tok) + 1]
    text = lm.tokenizer.decode(free.token_ids)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    (b,) = run(Engine(lm), [Request(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop]))])
    assert b.finish_reason == "stop" and stop in lm.tokenizer.decode(b.token_ids)
    assert len(b.token_ids) < 20


def test_bad_requests_are_refused_clearly(lm):
    async def main():
        engine = Engine(lm)
        with pytest.raises(RuntimeError, match="not running"):
            engine.submit(Request([1, 2]))
        async with engine:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                engine.submit(Request([5, 99999]))
        small = Engine(lm, EngineConfig(kv_slots=1024))
        async with small:
            with pytest.raises(ValueError, match=r"need 1100 KV slots, but the pool has 1024"):
                small.submit(Request(ids(1000, 1), greedy(100)))
            fits = await small.submit(Request(ids(1000, 1), greedy(24))).result()
            assert fits.finish_reason == "length"

    asyncio.run(main())
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Request([])
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(top_p=0)


def test_waiting_order_priority_then_cached_prefix(lm):
    engine = Engine(lm, EngineConfig(max_running=1))
    (warm,) = run(engine, [Request(ids(100, 21), greedy(2))])
    cold = Sequence(Request(ids(30, 22)), None, None)
    cached = Sequence(Request(ids(100, 21) + warm.token_ids + [40, 41]), None, None)
    urgent = Sequence(Request(ids(30, 23), priority=5), None, None)
    engine.scheduler.waiting.extend([cold, cached])
    assert [s for s, _ in engine.scheduler.schedule()] == [cached]  # longest cached prefix first
    engine.scheduler.release(cached)
    engine.scheduler.waiting = type(engine.scheduler.waiting)([cold, cached, urgent])
    assert [s for s, _ in engine.scheduler.schedule()] == [urgent]


def test_a_failing_step_fails_only_its_batch(lm, monkeypatch):
    import agentrt.model.engine as engine_module

    real, calls = engine_module.run_batch, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "run_batch", flaky)
    engine = Engine(lm)

    async def main():
        async with engine:
            first = await engine.submit(Request(ids(20, 30), greedy(4))).result()
            second = await engine.submit(Request(ids(20, 31), greedy(4))).result()
            return first, second

    first, second = asyncio.run(main())
    assert first.finish_reason == "error" and "simulated kernel fault" in first.error
    assert second.finish_reason == "length" and len(second.token_ids) == 4
    assert engine.cache.root.lock == 1
    engine.cache.clear()
    assert engine.kv.num_free == engine.kv.capacity and engine.states.num_free == engine.states.capacity


def test_a_bug_outside_the_forward_fails_requests_not_the_engine(lm, monkeypatch):
    engine = Engine(lm)
    real, calls = engine._sample_and_postprocess, []

    def broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("simulated bookkeeping bug")
        return real(*args)

    monkeypatch.setattr(engine, "_sample_and_postprocess", broken)

    async def main():
        async with engine:
            first = await engine.submit(Request(ids(12, 40), greedy(3))).result()
            second = await engine.submit(Request(ids(12, 41), greedy(3))).result()
            return first, second

    first, second = asyncio.run(main())
    assert first.finish_reason == "error" and "simulated bookkeeping bug" in first.error
    assert second.finish_reason == "length" and len(second.token_ids) == 3
