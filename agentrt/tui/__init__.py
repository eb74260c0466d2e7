"""The terminal UI: a run dashboard, an agent view and a runs browser with replay.

>>> app = make_app(StoreSource("runs.db"))   # doctest: +SKIP
>>> app.run()                                # doctest: +SKIP
"""

from .app import AgentrtApp, make_app
from .data import AgentRow, EngineInfo, RuntimeSource, Snapshot, StoreSource

__all__ = ["AgentRow", "AgentrtApp", "EngineInfo", "RuntimeSource", "Snapshot", "StoreSource", "make_app"]
