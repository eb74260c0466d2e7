"""The radix prefix cache on its own: matching, splitting, snapshots, locks and LRU eviction."""

from __future__ import annotations

from agentrt.model.pools import SlotAllocator
from agentrt.model.radix import RadixCache, common_prefix


class Snapshots(SlotAllocator):
    """A state pool without tensors: the cache only allocates and releases its slot ids."""


def cache(hybrid: bool, kv: int = 100, states: int = 10) -> RadixCache:
    return RadixCache(SlotAllocator(kv, "KV"), Snapshots(states, "state") if hybrid else None)


def insert(c: RadixCache, tokens: list[int], snapshot: bool = True):
    slots = c.kv.alloc(len(tokens))
    node, path, dups = c.insert(tokens, slots)
    c.kv.release(dups)
    if snapshot and c.states is not None:
        c.set_snapshot(node, c.states.alloc(1)[0])
    return node, path


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5] * 100, [5] * 100) == 100


def test_attention_only_match_uses_any_depth_and_respects_the_limit():
    c = cache(hybrid=False)
    _, path = insert(c, list(range(10)))
    m = c.match(list(range(6)) + [99], limit=6)
    assert (m.length, m.usable, m.slots) == (6, 6, path[:6])
    assert c.match(list(range(10)), limit=9).usable == 9  # one token is always left to compute


def test_hybrid_match_stops_at_the_deepest_snapshot_and_splits_share_slots():
    c = cache(hybrid=True)
    a, path_a = insert(c, list(range(10)))
    b, path_b = insert(c, list(range(6)) + [50, 51, 52])  # splits a's edge after 6 tokens
    assert path_b[:6] == path_a[:6] and c.num_tokens == 13
    m = c.match(list(range(6)) + [77], limit=6)
    assert m.length == 6 and m.usable == 0  # no snapshot at the split point yet
    upper = b.parent
    assert c.set_snapshot(upper, c.states.alloc(1)[0])
    m = c.match(list(range(6)) + [77], limit=6)
    assert m.usable == 6 and m.node is upper and m.snapshot == upper.snapshot
    assert c.match(list(range(10)) + [1], limit=10).usable == 10


def test_reinserting_returns_the_callers_duplicate_slots():
    c = cache(hybrid=False)
    _, path = insert(c, [1, 2, 3, 4])
    mine = c.kv.alloc(5)
    _, tree_path, dups = c.insert([1, 2, 3, 4, 5], mine)
    assert dups == mine[:4] and tree_path[:4] == path and tree_path[4] == mine[4]


def test_lru_eviction_spares_locked_paths_and_recent_entries():
    c = cache(hybrid=False, kv=12)
    old, _ = insert(c, [1, 1, 1, 1])
    locked, _ = insert(c, [2, 2, 2, 2])
    recent, _ = insert(c, [3, 3, 3, 3])
    c.match([3, 3, 3, 3, 0], limit=4)  # touch: most recently used
    c.lock(locked)
    c.evict(kv_free=4)
    assert c.match([1, 1, 1, 1, 0], 4).length == 0  # least recently used went first
    assert c.match([3, 3, 3, 3, 0], 4).length == 4
    c.evict(kv_free=12)
    assert c.match([2, 2, 2, 2, 0], 4).length == 4  # locked: never evicted
    c.unlock(locked)
    c.clear()
    assert c.kv.num_free == 12 and c.num_tokens == 0


def test_snapshot_eviction_drops_hybrid_leaves_that_can_no_longer_resume():
    c = cache(hybrid=True, kv=50, states=3)
    insert(c, [1, 2, 3])
    insert(c, [4, 5, 6])
    assert c.states.num_free == 1
    c.evict(states_free=3)
    assert c.states.num_free == 3 and c.num_snapshots == 0
    assert c.num_tokens == 0 and c.kv.num_free == 50  # their KV went with them


def test_common_slot_prefix_by_binary_search():
    from agentrt.model.runner import _common_prefix

    base = list(range(100, 200))
    lists = [base[:90] + [1, 2], base[:60] + [7] * 30, base[:95]]
    assert _common_prefix(lists, 95) == 60
    assert _common_prefix(lists, 40) == 40
    assert _common_prefix([base, base[:70] + [0] * 30], 100) == 70
    assert _common_prefix([[5], [6]], 1) == 0
