"""agentrt: an agent orchestration runtime around one in-process Nemotron-H engine.

>>> from agentrt import Agent, Budget, Runtime, tool
>>> @tool
... def add(a: float, b: float) -> float:
...     "Add two numbers."
...     return a + b
>>> calc = Agent(name="calc", instructions="Use the tools.", tools=[add], budget=Budget(tool_calls=4))
>>> results = Runtime.run_sync([(calc, "What is 2 + 3?")], model="tiny")   # doctest: +SKIP

Importing this package stays light: names are resolved on first use, and torch is imported
only when an engine is built (``agentrt.model``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Agent": "agentrt.agent",
    "AgentContext": "agentrt.agent",
    "AgentResult": "agentrt.agent",
    "Sampling": "agentrt.agent",
    "Budget": "agentrt.budget",
    "BudgetExceeded": "agentrt.budget",
    "Runtime": "agentrt.runtime",
    "ChatModel": "agentrt.llm",
    "ChatOptions": "agentrt.llm",
    "ChatReply": "agentrt.llm",
    "ScriptedModel": "agentrt.llm",
    "LocalModel": "agentrt.local",
    "RemoteEngine": "agentrt.remote",
    "Episode": "agentrt.runtime",
    "Store": "agentrt.store",
    "StoreReader": "agentrt.store",
    "MemoryRecorder": "agentrt.recorder",
    "Recorder": "agentrt.recorder",
    "tool": "agentrt.tools",
    "Tool": "agentrt.tools",
    "ToolRegistry": "agentrt.tools",
    "ToolResult": "agentrt.tools",
    "ToolError": "agentrt.tools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentrt' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
