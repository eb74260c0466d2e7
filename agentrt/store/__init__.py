"""The trajectory store: every run, trajectory, message tree, model and tool call, reward and event,
in SQLite (WAL) or any SQLAlchemy database, written by one background writer (a thread, or a child process).

>>> from agentrt import Runtime
>>> from agentrt.store import Store, StoreReader
>>> store = Store("runs.db")                                             # doctest: +SKIP
>>> async with Runtime(model="tiny", recorder=store) as rt:             # doctest: +SKIP
...     results = await rt.run([(calc, "What is 17 * 23?")])
>>> await store.aflush()                                                # doctest: +SKIP
>>> StoreReader("runs.db").messages(results[0].trajectory_id)           # doctest: +SKIP

See docs/store.md for the schema, the writer's guarantees and the reader API.
"""

from .reader import (EventRecord, ModelCallRecord, Node, RewardRecord, RunRecord, StoreReader, ToolCallRecord,
                     TrajectoryRecord)
from .schema import SCHEMA_VERSION, StoreError, StoreVersionError
from .writer import Store, StoreStats

__all__ = ["SCHEMA_VERSION", "EventRecord", "ModelCallRecord", "Node", "RewardRecord", "RunRecord", "Store",
           "StoreError", "StoreReader", "StoreStats", "StoreVersionError", "ToolCallRecord", "TrajectoryRecord"]
