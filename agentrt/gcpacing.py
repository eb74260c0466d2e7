"""Full garbage collections paced while agents run, so they never stall the event loop mid-run.

CPython's collector has three generations. Young collections scan only recent objects and take
well under a few milliseconds; a full (oldest-generation) collection scans every tracked object in
the process. A thousand agents hold enough messages, tool results and tasks that one full
collection stopped the event loop for 60–125 ms (`agentrt bench store`), several times a run:
every agent waiting, every stream stalled, and the loop's lag p99 set by the collector alone.

While at least one `Runtime.run` is in progress, `paced_full_collections()` leaves young
collections alone and replaces the automatic full ones with one every `interval` seconds (30 by
default), started from the event loop between callbacks. Cyclic garbage that survives the young
generations is then freed at most that much later; memory freed by reference counting (nearly
all of it) is unaffected. When the last run ends, the saved thresholds come back.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

FULL_COLLECTION_INTERVAL = 30.0  # seconds between full collections while agents run
_NEVER = 1 << 30  # a full collection threshold no run reaches

_active = 0
_saved: tuple[int, int, int] | None = None
_last_full = time.monotonic()


@asynccontextmanager
async def paced_full_collections(interval: float = FULL_COLLECTION_INTERVAL) -> AsyncIterator[None]:
    """Within the block (and every block nested or concurrent with it), full collections run only
    every `interval` seconds, never on the collector's own schedule."""
    global _active, _saved
    if _active == 0:
        _saved = gc.get_threshold()
        if _saved[0] > 0:  # the collector is on: defer its full collections (gen0 threshold 0 means off)
            gc.set_threshold(_saved[0], _saved[1], _NEVER)
    _active += 1
    pacer = asyncio.create_task(_collect_every(interval), name="agentrt-gc-pacer")
    try:
        yield
    finally:
        pacer.cancel()
        _active -= 1
        if _active == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None


async def _collect_every(interval: float) -> None:
    global _last_full
    while True:
        await asyncio.sleep(interval)
        # concurrent runs each have a pacer; one full collection per interval serves them all
        if gc.isenabled() and time.monotonic() - _last_full >= interval * 0.99:
            gc.collect()
            _last_full = time.monotonic()
