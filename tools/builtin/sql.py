"""`sql_query`: read-only SQL over one SQLite file.

Safety comes from SQLite itself: the file is opened with `mode=ro`, the
connection sets `PRAGMA query_only=ON`, an authorizer refuses ATTACH/DETACH
(ATTACH could otherwise create or read other files), and Python's sqlite3
runs one statement per `execute`. A progress handler aborts a query once its
time is up. The schema (tables and columns) is listed in the tool description
when the tool is built, and again in every SQL error so the model can fix its
query against the current schema.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from agentrt.tools import Tool, ToolError, tool

PROGRESS_STEPS = 1_000  # SQLite VM instructions between deadline checks
MAX_CELL_CHARS = 200
MAX_SCHEMA_CHARS = 4_000
DENIED_ACTIONS = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open `path` read-only, query-only, in autocommit mode, with ATTACH refused."""
    uri = f"file:{quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only=ON")
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(deny_attach)
    return conn


def deny_attach(action: int, *_args: object) -> int:
    """sqlite3 authorizer: everything but ATTACH/DETACH is left to SQLite's read-only mode."""
    return sqlite3.SQLITE_DENY if action in DENIED_ACTIONS else sqlite3.SQLITE_OK


def describe_schema(conn: sqlite3.Connection) -> str:
    """One line per table or view: `name(col TYPE, ...)`; empty when there are none."""
    names = conn.execute(
        "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
        "AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    lines = []
    for table, kind in names:
        columns = conn.execute("SELECT name, type FROM pragma_table_info(?)", (table,)).fetchall()
        cols = ", ".join(f"{col} {ctype}".rstrip() for col, ctype in columns)
        lines.append(f"{table}({cols})" + (" [view]" if kind == "view" else ""))
    text = "\n".join(lines)
    if len(text) > MAX_SCHEMA_CHARS:
        text = text[:MAX_SCHEMA_CHARS] + "\n[schema cut; query sqlite_master for the rest]"
    return text


def read_schema(path: Path) -> str:
    """The schema of the database at `path`, as `describe_schema` lists it."""
    conn = connect_readonly(path)
    try:
        return describe_schema(conn)
    finally:
        conn.close()


def format_cell(value: object) -> str:
    """Render one value compactly: NULL, blob sizes, long text cut, newlines escaped."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<blob {len(value)} bytes>"
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + "…"


def format_table(columns: Sequence[str], rows: Sequence[tuple], total: int, complete: bool) -> str:
    """`a | b` header, one line per row, then a row-count footer."""
    lines = [" | ".join(columns)]
    lines += (" | ".join(format_cell(v) for v in row) for row in rows)
    if len(rows) == total and complete:
        lines.append(f"{total} row" + ("" if total == 1 else "s"))
    elif complete:
        lines.append(f"[first {len(rows)} of {total} rows]")
    else:
        lines.append(f"[first {len(rows)} of at least {total} rows; counting stopped at the time limit]")
    return "\n".join(lines)


def run_query(path: Path, query: str, max_rows: int, timeout: float) -> str:
    """Run `query` in this (worker) thread; SQLite errors become ToolErrors."""
    conn = connect_readonly(path)
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_STEPS)
    try:
        return fetch_table(conn, query, max_rows, deadline)
    except sqlite3.ProgrammingError as exc:
        if "one statement" in str(exc):
            raise ToolError(multi_statement_message(exc)) from None
        raise ToolError(f"SQL error: {exc}") from None
    except sqlite3.Error as exc:
        raise ToolError(error_message(conn, path, exc, timeout)) from None
    finally:
        conn.close()


def fetch_table(conn: sqlite3.Connection, query: str, max_rows: int, deadline: float) -> str:
    """Keep the first `max_rows` rows and count the rest until the deadline."""
    cursor = conn.execute(query)
    if cursor.description is None:
        return "statement ran; it returns no rows"
    columns = [d[0] for d in cursor.description]
    rows = cursor.fetchmany(max_rows)
    total, complete = len(rows), True
    try:
        while chunk := cursor.fetchmany(1_000):
            total += len(chunk)
    except sqlite3.OperationalError:
        if time.monotonic() <= deadline:
            raise
        complete = False
    return format_table(columns, rows, total, complete)


def multi_statement_message(exc: Exception) -> str:
    return (f"only one SQL statement per call is allowed ({exc}); "
            "send each statement as its own call")


def error_message(conn: sqlite3.Connection, path: Path, exc: sqlite3.Error,
                  timeout: float) -> str:
    """SQLite's message, a hint for the common cases, and the schema."""
    text = str(exc)
    if "interrupted" in text:
        return (f"query stopped after the {timeout:g} s time limit; simplify it, "
                "add a LIMIT or filter with WHERE")
    if "not authorized" in text:
        return (f"refused: ATTACH and DETACH are not allowed ({text}); "
                f"query only the tables of {path.name}")
    if "readonly" in text or "read-only" in text:
        return (f"refused: this database is read-only ({text}); only SELECT, WITH ... SELECT, "
                "EXPLAIN and read-only PRAGMA queries can run")
    conn.set_progress_handler(None, 0)
    schema = describe_schema(conn) or "(no tables)"
    return f"SQL error: {text}\nTables in {path.name}:\n{schema}"


def sql_query(path: str | Path, *, max_rows: int = 200, timeout: float = 5.0,
              name: str = "sql") -> Tool:
    """Build a tool that runs one read-only SQL query on the SQLite file at `path`.

    The description given to the model lists the tables and columns as they
    are when the tool is built; SQL errors repeat the current schema. Results
    are a `col | col` text table with at most `max_rows` rows and a row count.
    Writes, ATTACH and multiple statements are refused with a ToolError; a
    query running longer than `timeout` seconds is interrupted.

    Example:
        >>> import asyncio, sqlite3, tempfile
        >>> path = Path(tempfile.mkdtemp()) / "shop.db"
        >>> sqlite3.connect(path).executescript(
        ...     "CREATE TABLE items (name TEXT, price REAL);"
        ...     "INSERT INTO items VALUES ('nut', 0.2), ('bolt', 0.1);").connection.close()
        >>> sql = sql_query(path, max_rows=50)
        >>> print(asyncio.run(sql(query="SELECT name, price FROM items ORDER BY price")))
        name | price
        bolt | 0.1
        nut | 0.2
        2 rows
    """
    db = Path(path).expanduser().resolve()
    if not db.is_file():
        raise FileNotFoundError(f"SQLite database not found: {db} (give the path of an existing file)")
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    try:
        schema = read_schema(db)
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{db} is not a readable SQLite database: {exc}") from None

    async def query(query: str) -> str:
        """Run one read-only SQL query.

        Args:
            query: A single SQLite SELECT (or WITH ... SELECT) statement.
        """
        return await asyncio.to_thread(run_query, db, query, max_rows, timeout)

    description = (
        f"Run one read-only SQLite query on {db.name} and get a text table "
        f"(at most {max_rows} rows). One statement per call; writes are refused.\n"
        f"Tables:\n{schema or '(no tables)'}"
    )
    return tool(query, name=name, description=description, timeout=timeout + 5.0,
                side_effects=False)

