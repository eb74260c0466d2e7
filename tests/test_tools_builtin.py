"""Built-in tools against real parts: a local aiohttp server, SQLite files, subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from agentrt.tools import Tool, ToolError, ToolRegistry, ToolResult
from agentrt.tools.builtin import http_fetch, python_exec, sql_query
from agentrt.tools.builtin.http import parse_allow_hosts

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def dispatch(tool: Tool, arguments: dict[str, object]) -> ToolResult:
    """One call through a registry, as the model's calls arrive."""
    registry = ToolRegistry([tool])
    return await registry.dispatch({"id": "c1", "name": tool.name, "arguments": arguments})


# --- http_fetch --------------------------------------------------------------

async def trickle(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    for _ in range(100):
        await resp.write(b".")
        await asyncio.sleep(0.1)
    return resp


def redirect(location: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound(location)
    return handler


def text(body: str | bytes, content_type: str = "text/plain", charset: str | None = "utf-8",
         status: int = 200) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        data = body.encode(charset or "utf-8") if isinstance(body, str) else body
        return web.Response(body=data, status=status, content_type=content_type, charset=charset)
    return handler


ROUTES = [
    web.get("/text", text("hello, world")),
    web.get("/latin1", text("café", charset="iso-8859-1")),
    web.get("/big", text("x" * 50_000)),
    web.get("/slow", trickle),
    web.get("/missing", text("no such page", status=404)),
    web.get("/hop", redirect("/text")),
    web.get("/away", redirect("http://example.invalid/")),
    web.get("/loop", redirect("/loop")),
    web.get("/png", text(b"\x89PNG\r\n\x1a\n\x00\x00", content_type="image/png", charset=None)),
]


@contextlib.asynccontextmanager
async def serve() -> AsyncIterator[str]:
    """Serve ROUTES on 127.0.0.1 at a free port; yield `127.0.0.1:<port>`."""
    app = web.Application()
    app.add_routes(ROUTES)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def with_server(check: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serve() as host:
            await check(host)
    run(main())


def test_fetch_text_status_and_charset() -> None:
    async def check(host: str) -> None:
        fetch = http_fetch([host])
        assert await fetch(url=f"http://{host}/text") == (
            "HTTP 200 OK\nContent-Type: text/plain; charset=utf-8\n\nhello, world")
        assert (await fetch(url=f"http://{host}/latin1")).endswith("\n\ncafé")
        missing = await fetch(url=f"http://{host}/missing")
        assert missing.startswith("HTTP 404 Not Found\n") and missing.endswith("no such page")
        assert (await fetch(url=f"http://{host}/text", max_chars=5)).endswith(
            "\n\nhello\n[truncated at 5 chars]")
    with_server(check)


def test_fetch_truncates_at_max_bytes() -> None:
    async def check(host: str) -> None:
        body = (await http_fetch([host], max_bytes=1000)(url=f"http://{host}/big")).split("\n\n", 1)[1]
        assert body == "x" * 1000 + "\n[truncated at 1000 bytes]"
    with_server(check)


def test_fetch_total_time_limit() -> None:
    async def check(host: str) -> None:
        start = time.monotonic()
        with pytest.raises(ToolError, match=r"timed out after 0\.5 s"):
            await http_fetch([host], timeout=0.5)(url=f"http://{host}/slow")
        assert time.monotonic() - start < 2.0
    with_server(check)


def test_fetch_redirects_checked_per_hop() -> None:
    async def check(host: str) -> None:
        fetch = http_fetch([host])
        hopped = await fetch(url=f"http://{host}/hop")
        assert hopped.startswith(f"HTTP 200 OK\nURL: http://{host}/text\n")
        assert hopped.endswith("hello, world")
        with pytest.raises(ToolError, match=r"'example\.invalid' \(port 80\) is not allowed"):
            await fetch(url=f"http://{host}/away")
        with pytest.raises(ToolError, match="too many redirects"):
            await fetch(url=f"http://{host}/loop")
    with_server(check)


def test_fetch_binary_is_described_not_shown() -> None:
    async def check(host: str) -> None:
        result = await http_fetch([host])(url=f"http://{host}/png")
        assert result == ("HTTP 200 OK\nContent-Type: image/png\n\n"
                          "[binary content (image/png, 10 bytes) not shown]")
    with_server(check)


def test_fetch_refuses_hosts_and_schemes_off_the_allowlist() -> None:
    async def check(host: str) -> None:
        port = host.split(":")[1]
        fetch = http_fetch([host])
        assert fetch.usage() == "fetch(url: string, max_chars: integer | null = null)"
        assert fetch.description.endswith(f"Only these hosts are allowed: {host}.")
        refusal = rf"'localhost' \(port {port}\) is not allowed; allowed hosts: {host}"
        with pytest.raises(ToolError, match=refusal):
            await fetch(url=f"http://localhost:{port}/text")
        with pytest.raises(ToolError, match="only http and https URLs.*'file'"):
            await fetch(url="file:///etc/passwd")
        refused = await dispatch(fetch, {"url": "ftp://example.com/x"})
        assert not refused.ok and refused.error == "tool_error"
        assert "only http and https" in refused.content
        done = await dispatch(fetch, {"url": f"http://{host}/text"})
        assert done.ok and done.content.endswith("hello, world")
    with_server(check)


def test_allowlist_rules() -> None:
    rules = parse_allow_hosts(["*.Example.com", "api.test:8443", "[::1]:8080", "plain.org"])
    def allowed(host: str, port: int) -> bool:
        return any(rule.matches(host, port) for rule in rules)
    assert allowed("a.example.com", 443) and allowed("a.b.example.com", 80)
    assert not allowed("example.com", 443) and not allowed("badexample.com", 443)
    assert allowed("api.test", 8443) and not allowed("api.test", 443)
    assert allowed("::1", 8080) and allowed("plain.org", 1234)
    assert [str(r) for r in rules] == ["*.example.com", "api.test:8443", "[::1]:8080", "plain.org"]
    with pytest.raises(TypeError, match="list of hosts"):
        http_fetch("example.com")
    with pytest.raises(ValueError, match="not a URL"):
        http_fetch(["https://example.com/"])
    with pytest.raises(ValueError, match="empty"):
        http_fetch([])


# --- sql_query -----------------------------------------------------------------

@pytest.fixture
def shop(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript("""
            CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT);
            CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users, total REAL);
        """)
        conn.executemany("INSERT INTO users VALUES (?, ?, ?)",
                         [(i, f"user{i}", None if i == 2 else f"u{i}@x.org") for i in range(1, 13)])
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(1, 1, 9.5), (2, 1, 3.0), (3, 4, 12.25)])
        conn.commit()
    return path


def test_sql_query_table_and_row_limit(shop: Path) -> None:
    sql = sql_query(shop, max_rows=5)
    assert "users(id INTEGER, name TEXT, email TEXT)" in sql.description
    assert run(sql(query="SELECT name, email FROM users WHERE id <= 2 ORDER BY id")) == (
        "name | email\nuser1 | u1@x.org\nuser2 | NULL\n2 rows")
    limited = run(sql(query="SELECT id FROM users ORDER BY id"))
    assert limited == "id\n1\n2\n3\n4\n5\n[first 5 of 12 rows]"
    joined = run(sql(query="SELECT u.name, sum(o.total) AS spent FROM users u "
                           "JOIN orders o ON o.user_id = u.id GROUP BY u.id ORDER BY spent DESC"))
    assert joined == "name | spent\nuser1 | 12.5\nuser4 | 12.25\n2 rows"


@pytest.mark.parametrize("statement, message", [
    ("INSERT INTO users VALUES (99, 'eve', NULL)", "read-only"),
    ("DELETE FROM users", "read-only"),
    ("DROP TABLE orders", "read-only"),
    ("UPDATE users SET name = 'x'", "read-only"),
    ("ATTACH DATABASE 'stolen.db' AS stolen", "ATTACH and DETACH are not allowed"),
    ("SELECT 1; DELETE FROM users", "only one SQL statement"),
    ("PRAGMA user_version = 7", "read-only"),
])
def test_sql_refuses_writes_and_leaves_the_file_alone(shop: Path, statement: str, message: str,
                                                      tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative ATTACH would create its file here
    before, files = shop.read_bytes(), sorted(tmp_path.iterdir())
    with pytest.raises(ToolError, match=message):
        run(sql_query(shop)(query=statement))
    assert shop.read_bytes() == before and sorted(tmp_path.iterdir()) == files


def test_sql_error_hint_lists_tables_and_columns(shop: Path) -> None:
    with pytest.raises(ToolError) as err:
        run(sql_query(shop)(query="SELECT nickname FROM users"))
    assert str(err.value) == (
        "SQL error: no such column: nickname\nTables in shop.db:\n"
        "orders(id INTEGER, user_id INTEGER, total REAL)\nusers(id INTEGER, name TEXT, email TEXT)")


def test_sql_slow_query_is_interrupted(shop: Path) -> None:
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    start = time.monotonic()
    with pytest.raises(ToolError, match=r"stopped after the 0\.5 s time limit"):
        run(sql_query(shop, timeout=0.5)(query=endless))
    assert time.monotonic() - start < 1.5


def test_sql_construction_errors_and_dispatch(shop: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.db"):
        sql_query(tmp_path / "nope.db")
    sql = sql_query(shop, name="shop_sql")
    assert sql.usage() == "shop_sql(query: string)" and sql.side_effects is False
    done = run(dispatch(sql, {"query": "SELECT count(*) AS n FROM orders"}))
    assert done.ok and done.content == "n\n3\n1 row"
    failed = run(dispatch(sql, {"query": "SELECT * FROM customers"}))
    assert not failed.ok and failed.error == "tool_error"
    assert "no such table: customers" in failed.content and "orders(id INTEGER" in failed.content


# --- python_exec -----------------------------------------------------------------

def test_python_prints_stdout_and_stderr() -> None:
    code = "import sys\nprint(6 * 7)\nprint('careful', file=sys.stderr)"
    assert run(python_exec()(code=code)) == "42\n\nstderr:\ncareful\n"
    assert run(python_exec()(code="pass")) == "(no output)"


def test_python_nonzero_exit_reports_stderr_and_code() -> None:
    result = run(python_exec()(code="print('before')\n1 / 0"))
    assert result.startswith("before\n\nstderr:\nTraceback")
    assert "ZeroDivisionError: division by zero" in result and result.endswith("\nexit code 1")
    assert run(python_exec()(code="raise SystemExit(3)")) == "exit code 3"


def test_python_timeout_kills_the_process_group() -> None:
    code = ("import subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
            "print(child.pid, flush=True)\nwhile True: pass")
    start = time.monotonic()
    result = run(python_exec(timeout=1.0)(code=code))
    pid, ending = result.split("\n", 1)
    assert ending == "\ntimed out after 1 s (process killed)"  # stdout kept, then the ending
    assert time.monotonic() - start < 3.0
    stat = Path(f"/proc/{pid}/stat")  # the grandchild goes too (or stays a zombie awaiting its reaper)
    deadline = time.monotonic() + 3.0  # SIGKILL is delivered asynchronously: give a loaded machine a moment
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in "ZX" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"


def test_python_returns_when_the_program_exits_despite_a_leftover_process() -> None:
    code = ("import subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
            " start_new_session=True)\nprint(child.pid)")
    start = time.monotonic()
    pid = int(run(python_exec(timeout=5.0)(code=code)))
    os.kill(pid, signal.SIGKILL)  # it left our process group, so the tool could not
    assert time.monotonic() - start < 2.0


def test_python_memory_limit_is_reported() -> None:
    result = run(python_exec(memory_mb=256)(code="data = bytearray(2_000_000_000)"))
    assert "MemoryError" in result
    assert result.endswith("exit code 1: MemoryError, memory limit of 256 MB exceeded")


def test_python_runs_in_a_scratch_dir_with_a_bare_env(monkeypatch) -> None:
    monkeypatch.setenv("AGENTRT_TEST_SECRET", "hunter2")
    code = ("import os\nopen('out.txt', 'w').write('x')\n"
            "print(os.getcwd())\nprint(os.environ.get('AGENTRT_TEST_SECRET'))")
    cwd, secret = run(python_exec()(code=code)).splitlines()
    assert secret == "None"
    assert not Path(cwd).exists() and REPO not in Path(cwd).parents
    assert not (REPO / "out.txt").exists()


def test_python_output_cap_and_dispatch() -> None:
    capped = run(python_exec(max_output=100)(code="print('x' * 10_000)"))
    assert capped == "x" * 100 + "\n[stdout truncated at 100 bytes of 10001]"
    python = python_exec()
    assert python.usage() == "python(code: string)"
    done = run(dispatch(python, {"code": "print(sum(range(10)))"}))
    assert done.ok and done.content == "45\n"
    with pytest.raises(ValueError, match="memory_mb"):
        python_exec(memory_mb=1)
