"""Worlds for agents: the `Environment` API, `run_environment`, and the worlds.

>>> from agentrt.environments import LogisticsWorld, run_environment    # doctest: +SKIP
>>> results = await run_environment(rt, LogisticsWorld(trucks=16), seed=0, policy="baseline")

The worlds are imported on first use (networkx and the like stay unloaded until then).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .base import Environment, Policy, Seat, play_until_done, run_environment

_WORLDS = {
    "TrajectoryEnv": "agentrt.environments.trajectory",
    "LogisticsWorld": "agentrt.environments.logistics",
    "ChurnWorld": "agentrt.environments.churn",
    "FleetWorld": "agentrt.environments.fleet",
}

__all__ = ["Environment", "Policy", "Seat", "play_until_done", "run_environment", *_WORLDS]


def __getattr__(name: str) -> Any:
    if name not in _WORLDS:
        raise AttributeError(f"module 'agentrt.environments' has no attribute {name!r}")
    return getattr(import_module(_WORLDS[name]), name)
