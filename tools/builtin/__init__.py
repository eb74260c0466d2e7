"""Built-in tools: configured by the user, called by the model.

Each factory returns a `Tool` whose limits (allowed hosts, database file,
time and memory) are fixed when it is built; the model only supplies the
call's arguments.

Example:
    >>> from agentrt.tools import ToolRegistry
    >>> from agentrt.tools.builtin import http_fetch, python_exec, sql_query
    >>> registry = ToolRegistry([
    ...     http_fetch(["docs.python.org"], max_bytes=50_000),
    ...     sql_query("shop.db", max_rows=100),
    ...     python_exec(timeout=5.0, memory_mb=256),
    ... ])  # doctest: +SKIP
    >>> # await registry.dispatch({"id": "c1", "name": "python",
    >>> #                          "arguments": {"code": "print(6 * 7)"}})  -> content '42\\n'
"""

from __future__ import annotations

from agentrt.tools.builtin.http import http_fetch
from agentrt.tools.builtin.python import python_exec
from agentrt.tools.builtin.sql import sql_query

__all__ = ["http_fetch", "python_exec", "sql_query"]
