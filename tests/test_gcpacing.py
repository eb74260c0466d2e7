"""Full garbage collections are paced while agents run (agentrt/gcpacing.py)."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from agentrt import Agent, Runtime, ScriptedModel
from agentrt.gcpacing import _NEVER, paced_full_collections


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def full_collections() -> list[float]:
    """Start times (monotonic) of the full collections from now until the callback is popped."""
    seen: list[float] = []

    def watch(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(time.monotonic())

    gc.callbacks.append(watch)
    return seen


def test_full_collections_are_deferred_inside_and_restored_after_the_last_block(thresholds):
    async def main():
        async with paced_full_collections(interval=60):
            assert gc.get_threshold() == (700, 10, _NEVER)
            async with paced_full_collections(interval=60):  # a concurrent run nests
                assert gc.get_threshold() == (700, 10, _NEVER)
            assert gc.get_threshold() == (700, 10, _NEVER), "the outer run is still going"
            seen = full_collections()
            try:
                for _ in range(300_000):  # plenty of young collections, no full one
                    [[]]
                assert seen == []
            finally:
                gc.callbacks.pop()
        assert gc.get_threshold() == (700, 10, 10)

    asyncio.run(main())


def test_the_pacer_runs_a_full_collection_every_interval(thresholds):
    interval = 0.05

    async def main():
        seen = full_collections()
        try:
            async with paced_full_collections(interval=interval):
                deadline = time.monotonic() + 20
                while len(seen) < 3 and time.monotonic() < deadline:  # a big heap makes each one slow
                    await asyncio.sleep(0.01)
        finally:
            gc.callbacks.pop()
        return seen

    seen = asyncio.run(main())
    assert len(seen) >= 3
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert min(gaps) >= interval * 0.9, gaps


def test_a_runtime_run_defers_full_collections_only_while_it_runs(thresholds):
    during = []

    def script(messages, tools):
        during.append(gc.get_threshold())
        return "done"

    [result] = Runtime.run_sync([Agent(name="a")], model=ScriptedModel(script))
    assert result.status == "done"
    assert during == [(700, 10, _NEVER)]
    assert gc.get_threshold() == (700, 10, 10)


def test_a_disabled_collector_is_left_alone(thresholds):
    gc.disable()
    try:
        seen = full_collections()

        async def main():
            async with paced_full_collections(interval=0.02):
                await asyncio.sleep(0.1)

        asyncio.run(main())
        gc.callbacks.pop()
        assert seen == []
    finally:
        gc.enable()
