"""A radix tree over token ids that caches KV slots and, for hybrid models, Mamba state snapshots.

Each edge holds a run of tokens and the KV slot of each. Attention can reuse any matched prefix;
a Mamba layer can only resume from a state, so for hybrid models a match is usable up to the
deepest node that holds a snapshot (the state after that node's last token). Sequences lock the
path they read; eviction frees least-recently-used unlocked leaves (KV and snapshot) or just
snapshots, accounted separately.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from .pools import SlotAllocator, StatePool


class Node:
    __slots__ = ("key", "slots", "children", "parent", "snapshot", "lock", "last_used")

    def __init__(self, key: list[int], slots: list[int], parent: Node | None, last_used: int = 0):
        self.key, self.slots, self.parent = key, slots, parent
        self.children: dict[int, Node] = {}
        self.snapshot: int | None = None
        self.lock = 0
        self.last_used = last_used


@dataclass(slots=True)
class Match:
    length: int  # tokens found in the tree (their KV is cached)
    slots: list[int]  # KV slots of those tokens
    usable: int  # tokens a sequence can skip: up to the deepest snapshot (hybrid) or `length`
    node: Node  # what to lock while the sequence uses the prefix
    snapshot: int | None  # state slot holding the Mamba state after `usable` tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (binary search over C-speed slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:  # the common case in a lookup: the whole edge matches
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixCache:
    def __init__(self, kv: SlotAllocator, states: StatePool | None):
        self.kv, self.states = kv, states
        self.hybrid = states is not None
        self.root = Node([], [], None)
        self.root.lock = 1  # never evicted
        self.clock = itertools.count(1)
        self.num_tokens = 0  # KV slots owned by the tree
        self.num_snapshots = 0

    # -- lookup --------------------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int) -> Match:
        """Longest cached prefix of `tokens`; `usable` never exceeds `limit`."""
        node, pos, slots = self.root, 0, []
        best_pos, best_node, best_snap = 0, self.root, None
        tick = next(self.clock)
        deepest = self.root
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            k = common_prefix(child.key, tokens[pos:pos + len(child.key)])
            slots.extend(child.slots[:k])
            child.last_used = tick
            deepest = child
            pos += k
            if k < len(child.key):
                break
            node = child
            if child.snapshot is not None and pos <= limit:
                best_pos, best_node, best_snap = pos, child, child.snapshot
        if self.hybrid:
            return Match(pos, slots, best_pos, best_node, best_snap)
        return Match(pos, slots, min(pos, limit), deepest, None)

    # -- insertion -----------------------------------------------------------------------------
    def insert(self, tokens: list[int], slots: list[int]) -> tuple[Node, list[int], list[int]]:
        """Add `tokens` (with the caller's KV `slots`) to the tree.

        Returns (the node ending at the last token, the tree's slots for all of `tokens`, the
        caller's slots that duplicate ones already cached — the caller frees those).
        """
        node, pos, duplicates, path_slots = self.root, 0, [], []
        tick = next(self.clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                child = Node(tokens[pos:], slots[pos:], node, tick)
                node.children[tokens[pos]] = child
                self.num_tokens += len(child.key)
                path_slots.extend(child.slots)
                return child, path_slots, duplicates
            k = common_prefix(child.key, tokens[pos:pos + len(child.key)])
            if k < len(child.key):
                child = self._split(child, k)
            duplicates.extend(a for a, b in zip(slots[pos:pos + k], child.slots) if a != b)
            path_slots.extend(child.slots)
            child.last_used = tick
            node, pos = child, pos + k
        return node, path_slots, duplicates

    def _split(self, child: Node, k: int) -> Node:
        """Cut `child`'s edge after k tokens; return the new upper node."""
        upper = Node(child.key[:k], child.slots[:k], child.parent, child.last_used)
        upper.lock = child.lock
        upper.children[child.key[k]] = child
        child.parent.children[child.key[0]] = upper
        child.key, child.slots, child.parent = child.key[k:], child.slots[k:], upper
        return upper

    def set_snapshot(self, node: Node, slot: int) -> bool:
        """Attach a state snapshot to `node`; False if it already has one (the caller keeps its slot)."""
        if node.snapshot is not None or node is self.root:
            return False
        node.snapshot = slot
        self.num_snapshots += 1
        return True

    # -- locking -------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node is not None:
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock -= 1
            node = node.parent

    # -- eviction ------------------------------------------------------------------------------
    def evict(self, kv_free: int = 0, states_free: int = 0) -> None:
        """Free least-recently-used unlocked entries until the pools have the free counts asked for."""
        if self.kv.num_free < kv_free:
            heap = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and n.lock == 0]
            heapq.heapify(heap)
            while heap and self.kv.num_free < kv_free:
                _, _, leaf = heapq.heappop(heap)
                parent = self._remove_leaf(leaf)
                if parent is not self.root and not parent.children and parent.lock == 0:
                    heapq.heappush(heap, (parent.last_used, id(parent), parent))
        if self.states is not None and self.states.num_free < states_free:
            heap = [(n.last_used, id(n), n) for n in self._nodes() if n.snapshot is not None and n.lock == 0]
            heapq.heapify(heap)
            while heap and self.states.num_free < states_free:
                _, _, node = heapq.heappop(heap)
                self._drop_snapshot(node)
                # a hybrid leaf without a snapshot can never be resumed from: drop it and such parents
                while node is not self.root and not node.children and node.lock == 0 and node.snapshot is None:
                    node = self._remove_leaf(node)

    def _remove_leaf(self, leaf: Node) -> Node:
        self._drop_snapshot(leaf)
        self.kv.release(leaf.slots)
        self.num_tokens -= len(leaf.slots)
        parent = leaf.parent
        del parent.children[leaf.key[0]]
        return parent

    def _drop_snapshot(self, node: Node) -> None:
        if node.snapshot is not None:
            self.states.release([node.snapshot])
            node.snapshot = None
            self.num_snapshots -= 1

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            yield n

    def evictable_kv(self) -> int:
        """KV slots eviction could free right now (tokens of unlocked subtrees)."""
        return sum(len(n.slots) for n in self._nodes() if n.lock == 0)

    def clear(self) -> None:
        """Drop every unlocked entry."""
        self.evict(kv_free=self.kv.capacity, states_free=self.states.capacity if self.states else 0)
