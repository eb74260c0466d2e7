"""The batch scheduler: two queues and three verbs (schedule, preempt, finish).

Each step packs every running decode plus prefill chunks under a token budget. Waiting requests
are admitted when a state slot and room for their prompt's KV can be found (evicting unlocked
cache entries first), ordered by priority, then longest cached prefix, or first-come-first-served
when the queue is long. When memory runs out mid-run, the most recently admitted sequence is preempted
and later recomputed from its tokens (its sampler state is kept, so its output is unchanged).

Prefix sharing for the hybrid model: a prefill chunk ends where the prompt diverges from the
cache or from another in-flight prompt; there the Mamba state is snapshotted into the cache,
and the requests that share that prefix wait for it instead of prefilling it again.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass

from .pools import KVPool, OutOfSlots, StatePool
from .radix import RadixCache, common_prefix
from .sequence import Sequence

MIN_SHARED = 16  # a shared prefix shorter than this is not worth a split or a wait
SORTED_QUEUE_MAX = 128  # beyond this many waiting, admit first-come-first-served


@dataclass(slots=True)
class SchedulerConfig:
    token_budget: int = 2048  # tokens fed per step (decodes + prefill chunks)
    max_running: int = 64


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVPool, states: StatePool | None, cache: RadixCache):
        self.config, self.kv, self.states, self.cache = config, kv, states, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    # -- the step plan -------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick (sequence, tokens to feed) pairs for one forward pass and reserve their KV slots."""
        budget = self.config.token_budget
        batch: list[tuple[Sequence, int]] = []
        # decodes first: one token each, never starved by prefill
        for seq in sorted(self.running, key=lambda s: s.remaining != 1):
            if seq in self.running:  # not preempted below to make room
                budget -= self._take(seq, budget, batch)
        self._admit(batch, budget)
        return batch

    def _take(self, seq: Sequence, budget: int, batch: list[tuple[Sequence, int]]) -> int:
        """Add seq's next chunk (up to its next stop, within budget) to the batch; return its size."""
        n = min(seq.remaining, seq.next_stop() - seq.computed, budget)
        if n <= 0 or not self._reserve(seq, n, batch):
            return 0
        batch.append((seq, n))
        return n

    def _reserve(self, seq: Sequence, n: int, batch: list[tuple[Sequence, int]]) -> bool:
        """Give `seq` KV slots for n more tokens, evicting cache entries, then preempting, if needed."""
        while True:
            try:
                seq.slots.extend(self.kv.alloc(n))
                return True
            except OutOfSlots:
                self.cache.evict(kv_free=n)
                if self.kv.num_free >= n:
                    continue
                in_batch = {id(s) for s, _ in batch}
                victims = [s for s in self.running if id(s) not in in_batch and s is not seq]
                victim = max(victims, key=lambda s: s.admitted) if victims else seq
                self.preempt(victim)
                if victim is seq:
                    return False

    def _admit(self, batch: list[tuple[Sequence, int]], budget: int) -> None:
        if not self.waiting:
            return
        queue = list(self.waiting)
        usable: dict[int, int] = {}
        if len(queue) <= SORTED_QUEUE_MAX:  # priority, then longest cached prefix, then FCFS
            usable = {id(s): self.cache.match(s.tokens, len(s.tokens) - 1).usable for s in queue}
            queue.sort(key=lambda s: (-s.request.priority, -usable[id(s)]))
        else:
            queue.sort(key=lambda s: -s.request.priority)
        for seq in queue:
            if budget <= 0 or len(self.running) >= self.config.max_running:
                break
            if self._deferred(seq, usable.get(id(seq))):
                continue
            if not self._start(seq):
                break  # no memory: keep the rest waiting
            self.waiting.remove(seq)
            budget -= self._take(seq, budget, batch)

    def _deferred(self, seq: Sequence, usable: int | None) -> bool:
        """Wait while another in-flight sequence is about to cache a longer prefix of this prompt."""
        if seq.waits_for is not None:
            other, at = seq.waits_for
            if other in self.running and other.computed < at:
                return True
            seq.waits_for = None
        if usable is None:
            usable = self.cache.match(seq.tokens, len(seq.tokens) - 1).usable
        for other in self.running:
            if other.computed >= other.num_prompt or not _shares(seq, other, usable + MIN_SHARED):
                continue
            shared = min(common_prefix(seq.tokens, other.tokens), len(seq.tokens) - 1, other.num_prompt - 1)
            if shared >= usable + MIN_SHARED and other.computed < shared:
                self._add_split(other, shared)
                seq.waits_for = (other, shared)
                return True
        return False

    def _start(self, seq: Sequence) -> bool:
        """Admit: take the cached prefix and a state slot, and make sure the prompt's KV fits."""
        match = self.cache.match(seq.tokens, len(seq.tokens) - 1)
        self.cache.lock(match.node)
        need_kv = len(seq.tokens) - match.usable + 1
        if self.kv.num_free < need_kv:
            self.cache.evict(kv_free=need_kv)
        state = None
        if self.states is not None:
            if self.states.num_free < 1:
                self.cache.evict(states_free=1)
            if self.states.num_free >= 1:
                state = self.states.alloc(1)[0]
        if self.kv.num_free < need_kv or (self.states is not None and state is None):
            if state is not None:
                self.states.release([state])
            self.cache.unlock(match.node)
            return False
        if self.states is not None:
            if match.snapshot is not None:
                self.states.copy(match.snapshot, state)
            else:
                self.states.zero(state)
        seq.state_slot, seq.node = state, match.node
        seq.slots = match.slots[: match.usable]
        seq.slots_rewritten()
        seq.computed = seq.owned_from = match.usable
        if seq.first_admission:
            seq.counts.cached_prompt = match.usable
            seq.first_admission = False
        seq.splits = []
        if self.states is not None and match.length > match.usable:  # diverges from the cache there
            self._add_split(seq, min(match.length, len(seq.tokens) - 1))
        for other in itertools.islice(self.waiting, SORTED_QUEUE_MAX):  # and from other waiting prompts
            if other is not seq and _shares(seq, other, match.usable + MIN_SHARED):
                shared = min(common_prefix(seq.tokens, other.tokens), len(seq.tokens) - 1)
                if shared >= match.usable + MIN_SHARED:
                    self._add_split(seq, shared)
        seq.admitted = time.perf_counter()
        self.running.append(seq)
        return True

    @staticmethod
    def _add_split(seq: Sequence, at: int) -> None:
        if at > seq.computed and at not in seq.splits:
            seq.splits.append(at)
            seq.splits.sort()

    # -- after the forward pass ----------------------------------------------------------------
    def advance(self, seq: Sequence, n: int) -> None:
        """`n` more tokens of `seq` are in the caches; snapshot the prefix if this is a split point."""
        seq.computed += n
        if seq.computed in seq.splits and seq.computed < len(seq.tokens):
            self._cache_prefix(seq, keep=True)

    def _cache_prefix(self, seq: Sequence, keep: bool) -> None:
        """Insert the computed prefix into the cache; its Mamba state goes along as a snapshot.

        keep=True: a copy of the state is snapshotted and the sequence goes on; keep=False: the
        sequence is done and hands over its working slot.
        """
        node, path_slots, duplicates = self.cache.insert(seq.tokens[: seq.computed], seq.slots[: seq.computed])
        self.kv.release(duplicates)
        seq.slots[: seq.computed] = path_slots
        seq.slots_rewritten()
        seq.owned_from = seq.computed
        if self.states is not None:
            if keep:
                if self.states.num_free < 1:
                    self.cache.evict(states_free=1)
                if self.states.num_free >= 1 and node.snapshot is None:
                    snap = self.states.alloc(1)[0]
                    self.states.copy(seq.state_slot, snap)
                    self.cache.set_snapshot(node, snap)
            elif not self.cache.set_snapshot(node, seq.state_slot):
                self.states.release([seq.state_slot])
        if keep:
            self.cache.lock(node)
        if seq.node is not None:
            self.cache.unlock(seq.node)
        seq.node = node if keep else None
        if not keep:
            seq.state_slot = None

    # -- leaving -------------------------------------------------------------------------------
    def finish(self, seq: Sequence) -> None:
        """A finished sequence leaves its tokens and final state in the cache for the next turn."""
        self.running.remove(seq)
        self.kv.release(seq.slots[seq.computed:])  # reserved but never filled
        del seq.slots[seq.computed:]
        self._cache_prefix(seq, keep=False)

    def release(self, seq: Sequence) -> None:
        """Drop everything `seq` holds (cancel, error, preemption)."""
        if seq in self.running:
            self.running.remove(seq)
        self.kv.release(seq.slots[seq.owned_from:])
        if seq.state_slot is not None:
            self.states.release([seq.state_slot])
        if seq.node is not None:
            self.cache.unlock(seq.node)
        seq.slots, seq.state_slot, seq.node = [], None, None
        seq.slots_rewritten()
        seq.computed = seq.owned_from = 0
        seq.splits = []

    def preempt(self, seq: Sequence) -> None:
        self.release(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def cancel(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.release(seq)


def _shares(a: Sequence, b: Sequence, n: int) -> bool:
    """Whether two prompts share at least n tokens (one slice comparison, before any search)."""
    if n <= 0:
        return True
    if len(a.tokens) < n or len(b.tokens) < n or a.tokens[n - 1] != b.tokens[n - 1]:
        return False  # most pairs differ there: no copies made
    return a.tokens[:n] == b.tokens[:n]
