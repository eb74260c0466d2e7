"""The slot allocator behind the KV and Mamba-state pools."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from agentrt.model.pools import OutOfSlots, SlotAllocator


class ListAllocator:
    """The plain free list the allocator replaces: every free slot in a list, the next one last."""

    def __init__(self, capacity: int):
        self.free = list(range(capacity - 1, -1, -1))

    def alloc(self, n: int) -> list[int]:
        out = self.free[len(self.free) - n:]
        del self.free[len(self.free) - n:]
        return out[::-1]

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)


@pytest.mark.parametrize("seed", range(5))
def test_hands_out_what_a_plain_free_list_would(seed):
    rng = random.Random(seed)
    capacity = rng.randint(1, 300)
    ours, plain, held = SlotAllocator(capacity, "KV"), ListAllocator(capacity), []
    for _ in range(2000):
        if held and rng.random() < 0.45:
            slots = held.pop(rng.randrange(len(held)))
            ours.release(slots)
            plain.release(slots)
        else:
            n = rng.randint(0, 12)
            if n > ours.num_free:
                with pytest.raises(OutOfSlots, match=f"asked for {n} KV slots, {ours.num_free} of {capacity} free"):
                    ours.alloc(n)
                continue
            got = ours.alloc(n)
            assert got == plain.alloc(n)
            held.append(got)
        assert ours.num_free == len(plain.free) and ours.num_used == capacity - len(plain.free)
    assert sorted(s for h in held for s in h) == sorted(set(range(capacity)) - set(plain.free))


def test_a_fresh_pool_hands_out_contiguous_ascending_runs():
    pool = SlotAllocator(100, "state")
    assert pool.alloc(3) == [0, 1, 2] and pool.alloc(4) == [3, 4, 5, 6]


def test_a_huge_pool_costs_nothing_to_create():
    """A GPU's KV pool has tens of millions of slots; creating its allocator must not list them."""
    tracemalloc.start()
    try:
        pool = SlotAllocator(50_000_000, "KV")
        assert pool.num_free == 50_000_000 and pool.alloc(2) == [0, 1]
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
