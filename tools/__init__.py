"""Typed Python functions as tools, and the registry that runs the model's calls to them.

A tool's JSON schema comes from its signature and docstring; a bad call comes back as a
result the model can act on, tied to the call id, never as an exception.

>>> import asyncio
>>> from enum import Enum
>>> from agentrt.tools import ToolRegistry, tool
>>> class Unit(str, Enum):
...     celsius = "celsius"
...     fahrenheit = "fahrenheit"
>>> @tool
... def get_weather(city: str, unit: Unit = Unit.celsius) -> dict:
...     '''Current weather for a city.
...
...     Args:
...         city: The city name, e.g. "Oslo".
...         unit: Temperature unit.
...     '''
...     return {"city": city, "temperature": 21, "unit": unit.value}
>>> registry = ToolRegistry([get_weather])
>>> result = asyncio.run(registry.dispatch({"id": "call_1", "name": "get_weather",
...                                         "arguments": '{"city": "Oslo"}'}))
>>> result.content
'{"city": "Oslo", "temperature": 21, "unit": "celsius"}'
>>> bad = asyncio.run(registry.dispatch({"id": "call_2", "name": "get_weather",
...                                      "arguments": {"city": "Oslo", "unit": "kelvin"}}))
>>> print(bad.content)
invalid arguments for tool `get_weather`:
- argument `unit`: expected one of 'celsius', 'fahrenheit', got 'kelvin'
Usage: get_weather(city: string, unit: 'celsius' | 'fahrenheit' = 'celsius')
"""

from __future__ import annotations

from agentrt.tools.registry import Tool, ToolError, ToolRegistry, ToolResult, tool

__all__ = ["Tool", "ToolError", "ToolRegistry", "ToolResult", "tool"]
