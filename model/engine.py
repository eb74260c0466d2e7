"""The async inference engine many agents share.

`Engine.submit(request)` returns a handle at once; the compute thread (`model/compute.py`) runs
the model steps (schedule → forward → sample → postprocess) and hands tokens back to the
caller's event loop, which never blocks on the model.

>>> async with Engine(load("tiny")) as engine:                           # doctest: +SKIP
...     handle = engine.submit(Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=32)))
...     async for event in handle:
...         print(event.token_id, event.logprob)
...     result = await handle.result()
"""

from __future__ import annotations

import asyncio
import queue
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .compute import compute
from .loading import LoadedModel
from .pools import KVPool, StatePool
from .radix import RadixCache
from .request import Counts, Request, Result, TokenEvent
from .runner import run_batch
from .sampler import sample
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, ThinkState
from .state import cached_layers


@dataclass(slots=True)
class EngineConfig:
    """Pool sizes and step shape. Defaults: 1 GiB of pools on CPU, 60% of free memory on CUDA."""

    memory_bytes: int | None = None
    max_running: int = 64
    token_budget: int = 2048
    state_slots: int | None = None  # default 3 * max_running: working states plus snapshots
    kv_slots: int | None = None  # override the count derived from memory_bytes

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.token_budget < 1:
            raise ValueError(f"max_running={self.max_running} and token_budget={self.token_budget} must be >= 1")
        if self.state_slots is not None and self.state_slots < 1:
            raise ValueError(f"state_slots={self.state_slots} must be >= 1 (one per running sequence at least)")


@dataclass(slots=True)
class EngineStats:
    tokens_per_s: float  # prefill + decode tokens fed, over the last few seconds
    output_tokens_per_s: float
    batch_size: int  # sequences in the last step
    mean_batch_size: float
    queue_len: int
    running: int
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens
    prompt_tokens: int
    cached_prompt_tokens: int
    output_tokens: int
    tokens_fed: int  # every token the model has read (prefill and decode)
    kv_used: int
    kv_total: int
    state_used: int
    state_total: int
    preemptions: int
    steps: int


class RequestHandle:
    """Stream of `TokenEvent`s for one request, then its `Result`."""

    def __init__(self, engine: Engine, request: Request):
        self.engine, self.request, self.id = engine, request, request.id
        self._events: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = asyncio.get_running_loop().create_future()

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self._events.get()
        if isinstance(item, Result):
            raise StopAsyncIteration
        return item

    async def result(self) -> Result:
        return await asyncio.shield(self._result)

    def cancel(self) -> None:
        self.engine.cancel(self.id)

    def _push(self, item) -> None:
        self._events.put_nowait(item)
        if isinstance(item, Result) and not self._result.done():
            self._result.set_result(item)


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None):
        self.lm, self.model, self.config = lm, lm.model, config or EngineConfig()
        cfg, device, dtype = self.model.config, self.model.device, self.model.dtype
        attn, mamba = cached_layers(cfg)
        attn = [i for i in attn if i < cfg.num_layers]  # the engine runs the backbone only
        mamba = [i for i in mamba if i < cfg.num_layers]
        c = self.config
        state_slots = (c.state_slots or 3 * c.max_running) if mamba else 0
        memory = c.memory_bytes or _default_memory(device)
        state_bytes = StatePool.bytes_per_slot(cfg, mamba, dtype) * state_slots
        kv_slots = c.kv_slots or max(1024, (memory - state_bytes) // max(1, KVPool.bytes_per_slot(cfg, attn, dtype)))
        if not attn:
            kv_slots = c.kv_slots or 1 << 22  # attention-free: slots are bookkeeping only
        self.kv = compute.call(KVPool, cfg, attn, int(kv_slots), device, dtype)
        self.states = compute.call(StatePool, cfg, mamba, state_slots, device, dtype) if mamba else None
        self.cache = RadixCache(self.kv, self.states)
        self.scheduler = Scheduler(SchedulerConfig(c.token_budget, c.max_running), self.kv, self.states, self.cache)
        tok, fmt = lm.tokenizer, lm.chat_format
        self.eos = set(lm.eos_token_ids)
        self.think_start = tok.token_to_id(fmt.think_start)
        end = tok.token_to_id(fmt.think_end)
        self.think_end = [end] if end is not None else tok.encode(fmt.think_end)
        self._newline: dict[int, bool] = {}
        self._grammar = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._seqs: dict[str, Sequence] = {}
        self._handles: dict[str, RequestHandle] = {}
        self._running = False
        self._stopped: Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._masker: ThreadPoolExecutor | None = None  # fills grammar masks during the forward pass
        self._mask_job: Future | None = None
        self._stopping = False
        # statistics
        self._window: deque[tuple[float, int, int]] = deque()
        self._steps = self._batch_total = self._last_batch = 0
        self._prompt = self._cached = self._output = self._fed = 0

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def start(self) -> None:
        """Start stepping on the compute thread; tokens go back to the running event loop."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._masker = ThreadPoolExecutor(1, thread_name_prefix="agentrt-masks")
        self._running = True
        compute.add_loop(self)

    async def stop(self) -> None:
        """Cancel what is left and stop stepping."""
        if not self._running:
            return
        self._stopped = Future()
        self._inbox.put(("stop", None))
        compute.wake()
        await asyncio.wrap_future(self._stopped)
        compute.remove_loop(self)
        self._masker.shutdown(wait=False)
        self._running = False

    # -- API -----------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request; returns at once. Must be called from the engine's event loop."""
        if not self._running:
            raise RuntimeError("the engine is not running; use `async with engine:` or `engine.start()` first")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise ValueError(f"request {request.id}: token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.model.config.vocab_size})")
        need = len(request.prompt_ids) + request.sampling.max_tokens
        if need > self.kv.capacity:
            raise ValueError(
                f"request {request.id}: {len(request.prompt_ids)} prompt tokens + max_tokens="
                f"{request.sampling.max_tokens} need {need} KV slots, but the pool has {self.kv.capacity}; "
                "shorten the prompt, lower max_tokens, or give the engine more memory "
                "(EngineConfig(memory_bytes=...) or kv_slots=...)"
            )
        handle = RequestHandle(self, request)
        self._handles[request.id] = handle
        self._inbox.put(("submit", request))
        compute.wake()
        return handle

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        compute.wake()

    @property
    def load(self) -> int:
        """Requests queued or running; the runtime uses it for backpressure."""
        return len(self._handles)

    def stats(self) -> EngineStats:
        now = time.perf_counter()
        window = [w for w in self._window if now - w[0] <= 5.0]
        span = max(1e-6, now - window[0][0]) if window else 1.0
        return EngineStats(
            tokens_per_s=sum(w[1] for w in window) / span,
            output_tokens_per_s=sum(w[2] for w in window) / span,
            batch_size=self._last_batch,
            mean_batch_size=self._batch_total / max(1, self._steps),
            queue_len=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            prefix_hit_rate=self._cached / max(1, self._prompt),
            prompt_tokens=self._prompt,
            cached_prompt_tokens=self._cached,
            output_tokens=self._output,
            tokens_fed=self._fed,
            kv_used=self.kv.num_used,
            kv_total=self.kv.capacity,
            state_used=self.states.num_used if self.states else 0,
            state_total=self.states.capacity if self.states else 0,
            preemptions=self.scheduler.preemptions,
            steps=self._steps,
        )

    # -- on the compute thread ----------------------------------------------------------------
    def ready(self) -> bool:
        return not self._inbox.empty() or bool(self.scheduler.running) or bool(self.scheduler.waiting)

    def poll(self) -> None:
        """Take queued messages, then run one step."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "stop":
                self._shutdown()
                self._stopped.set_result(None)
                return
            self._handle(msg)
        try:
            self.step()
        except Exception:  # a bug outside the forward pass: fail what is in flight, keep serving
            self._fail(list(self.scheduler.running) + list(self.scheduler.waiting), traceback.format_exc(limit=6))

    def _fail(self, seqs: list[Sequence], error: str) -> None:
        """Finish `seqs` with finish reason "error", freeing what they hold."""
        events = []
        for seq in seqs:
            self.scheduler.cancel(seq)
            seq.finish_reason, seq.error = "error", error
            events.append(self._finish_event(seq))
        self._emit(events)

    def _handle(self, msg) -> None:
        kind, arg = msg
        if kind == "submit":
            try:
                seq = self._make_sequence(arg)
            except Exception as e:  # e.g. a constraint that does not compile
                self._emit([(arg.id, self._result_of_failed(arg, f"{type(e).__name__}: {e}"))])
                return
            self._seqs[seq.id] = seq
            self.scheduler.waiting.append(seq)
        elif kind == "cancel" and arg in self._seqs:
            seq = self._seqs[arg]
            self.scheduler.cancel(seq)
            seq.finish_reason = "cancelled"
            self._emit([self._finish_event(seq)])

    def _make_sequence(self, request: Request) -> Sequence:
        p = request.sampling
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(p.seed)
        opened = request.thinking_open
        if opened is None:
            opened = self.opens_thinking(request.prompt_ids)
        think = ThinkState(self.think_start, self.think_end, request.thinking)
        if opened:
            think.open()
        seq = Sequence(request, generator, think)
        if request.constraint is not None:
            seq.constraint = self._grammar_backend().matcher(request.constraint, thinking_open=opened)
        if p.stop:
            from .tokenizer import IncrementalDecoder

            seq.decoder = IncrementalDecoder(self.lm.tokenizer)
        return seq

    def opens_thinking(self, ids: list[int]) -> bool:
        """Whether a prompt ends inside a think block (its last <think> is not closed)."""
        last = {t: i for i, t in enumerate(ids)}
        return self.think_start is not None and last.get(self.think_start, -1) > last.get(self.think_end[-1], -1)

    def _grammar_backend(self):
        if self._grammar is None:
            from .constraints import GrammarBackend

            self._grammar = GrammarBackend(self.lm.tokenizer, self.lm.chat_format, self.model.config.vocab_size)
        return self._grammar

    def step(self) -> None:
        """One scheduler step: forward the batch, sample, stream, finish."""
        batch = self.scheduler.schedule()
        if not batch:
            return
        try:
            logits = run_batch(self.model, self.kv, self.states, batch)
        except Exception:  # only this batch's requests fail; the engine goes on
            self._fail([seq for seq, _ in batch], traceback.format_exc(limit=4))
            return
        sampling = [seq for seq, n in batch if seq.computed + n == len(seq.tokens)]
        for seq, n in batch:
            self.scheduler.advance(seq, n)
        events = self._sample_and_postprocess(sampling, logits) if sampling else []
        self._record(batch, len(sampling))
        self._emit(events)
        self._mask_job = self._start_masks()

    def _sample_and_postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> list:
        raw = torch.log_softmax(logits, -1)
        constrained = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if constrained:
            self._apply_masks(seqs, logits, constrained)
        tokens, logprobs = sample(logits, raw, [s.request.sampling for s in seqs], [s.generator for s in seqs])
        events = []
        for i, seq in enumerate(seqs):
            tok = tokens[i]
            if seq.think is not None and seq.think.forcing:
                tok = seq.think.forcing[0]
                logprobs[i] = float(raw[i, tok])
            events.extend(self._append(seq, tok, logprobs[i]))
        return events

    def _append(self, seq: Sequence, tok: int, logprob: float) -> list:
        p = seq.request.sampling
        seq.tokens.append(tok)
        seq.output_ids.append(tok)
        seq.logprobs.append(logprob)
        seq.counts.output += 1
        think = seq.think
        if think is not None:
            was_inside = think.inside
            think.observe(tok, self._has_newline(tok))
            if was_inside and think.inside:
                seq.counts.thinking += 1
        events = [(seq.id, TokenEvent(tok, logprob))]
        if seq.constraint is not None and not seq.constraint.accept(tok):
            seq.finish_reason = "error"
            seq.error = f"token {tok} violates the request's constraint (grammar rejected it)"
        elif (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.decoder is not None and self._hit_stop_string(seq, tok):
            seq.finish_reason = "stop"
        elif seq.constraint is not None and seq.constraint.is_terminated():
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            seq.finish_reason = "length"
        if seq.finished:
            if seq.finish_reason == "error":
                self.scheduler.release(seq)
            else:
                self.scheduler.finish(seq)
            events.append(self._finish_event(seq))
        return events

    def _hit_stop_string(self, seq: Sequence, tok: int) -> bool:
        piece = seq.decoder.push(tok)
        seq.text += piece
        tail = seq.text[-(len(piece) + max(len(s) for s in seq.request.sampling.stop)):]
        return any(s in tail for s in seq.request.sampling.stop)

    def _has_newline(self, tok: int) -> bool:
        if tok not in self._newline:
            self._newline[tok] = "\n" in self.lm.tokenizer.decode([tok])
        return self._newline[tok]

    # -- grammar masks, computed while the next forward runs -----------------------------------
    def _start_masks(self) -> Future | None:
        seqs = [s for s in self.scheduler.running if s.constraint is not None and s.remaining == 1]
        if not seqs:
            return None
        backend = self._grammar_backend()

        def fill():
            bitmask = backend.allocate_bitmask(len(seqs))
            for row, s in enumerate(seqs):
                s.constraint.fill_mask(bitmask, row)
            return {s.id: row for row, s in enumerate(seqs)}, bitmask

        return self._masker.submit(fill)

    def _apply_masks(self, seqs: list[Sequence], logits: torch.Tensor, rows: list[int]) -> None:
        backend = self._grammar_backend()
        ready, ready_mask = self._mask_job.result() if self._mask_job is not None else ({}, None)
        self._mask_job = None
        bitmask = backend.allocate_bitmask(len(seqs))
        for i in rows:
            seq = seqs[i]
            if seq.id in ready:
                bitmask[i] = ready_mask[ready[seq.id]]
            else:  # first token after prefill: not computed ahead
                seq.constraint.fill_mask(bitmask, i)
        backend.apply_bitmask(logits, bitmask, rows)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record(self, batch: list[tuple[Sequence, int]], sampled: int) -> None:
        now = time.perf_counter()
        self._window.append((now, sum(n for _, n in batch), sampled))
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()
        self._steps += 1
        self._fed += sum(n for _, n in batch)
        self._last_batch = len(batch)
        self._batch_total += len(batch)

    def _finish_event(self, seq: Sequence):
        self._seqs.pop(seq.id, None)
        self._prompt += seq.counts.prompt
        self._cached += seq.counts.cached_prompt
        self._output += seq.counts.output
        result = Result(seq.id, list(seq.output_ids), list(seq.logprobs), seq.finish_reason, seq.counts, seq.error)
        return seq.id, result

    def _result_of_failed(self, request: Request, error: str) -> Result:
        return Result(request.id, [], [], "error", Counts(prompt=len(request.prompt_ids)), error)

    def _emit(self, events: list) -> None:
        if events and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list) -> None:
        for rid, item in events:
            handle = self._handles.get(rid)
            if handle is None:
                continue
            handle._push(item)
            if isinstance(item, Result):
                del self._handles[rid]

    def _shutdown(self) -> None:
        events = []
        for seq in list(self._seqs.values()):
            self.scheduler.cancel(seq)
            seq.finish_reason = "cancelled"
            events.append(self._finish_event(seq))
        self._emit(events)


def _default_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    return 1 << 30
