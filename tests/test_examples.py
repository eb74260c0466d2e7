"""The example scripts run end to end on the embedded model, and the calculator's `evaluate` is safe."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agentrt.tools import ToolError, ToolRegistry
from agentrt.tools.builtin import sql_query

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def load_example(name: str):
    """Import examples/<name>.py as a module (registered, so its dataclasses resolve their module)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


calculator = load_example("calculator")
sql_analyst = load_example("sql_analyst")


def run_example(name: str, *args: str) -> str:
    """Run an example as a user would; returns its stdout after checking it exited cleanly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one-token decode steps: a second thread only contends on shared CPUs
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"{name}.py exited with {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


# ---------------------------------------------------------------- the scripts, end to end

def test_sql_analyst_runs(tmp_path: Path) -> None:
    out = run_example("sql_analyst", "--agents", "2", "--workdir", str(tmp_path), "--seed", "1")

    with sqlite3.connect(tmp_path / "shop.db") as conn:
        counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("customers", "products", "orders")}
    assert counts == {"customers": 60, "products": 20, "orders": 400}
    assert f"database: {tmp_path / 'shop.db'} (60 customers, 20 products, 400 orders)" in out

    agents = re.findall(r"^\[(analyst-\d)\] ", out, re.M)
    assert agents == ["analyst-1", "analyst-2"]
    lines = re.findall(r"^  status: (\w+).*\| turns (\d+) \| tool calls (\d+) \((\d+) ok, (\d+) failed", out, re.M)
    assert len(lines) == 2, out
    for status, turns, calls, ok, failed in lines:
        assert status in {"done", "budget", "max_turns", "timeout"}, out  # "failed" would be a bug in the script
        assert 1 <= int(turns) <= 3 and int(calls) == int(ok) + int(failed) <= 3
    assert sum(int(calls) for *_, calls, _, _ in lines) >= 1, "no SQL query ran at all:\n" + out
    assert out.count("  reference: ") == 2
    summary = re.search(r"^summary: 2 analysts in [\d.]+s wall \(.*\); tool calls (\d+)", out, re.M)
    assert summary and int(summary[1]) >= 1, out
    assert re.search(r"engine prefix-cache hit rate \d+%", out), out


def test_calculator_runs() -> None:
    out = run_example("calculator", "--seed", "1", "--max-tokens", "96")

    agents = re.findall(r"^\[(\w+)\] status: (\w+)", out, re.M)
    assert [name for name, _ in agents] == ["calculator", "planner"], out
    assert agents[0][1] in {"done", "budget", "max_turns", "timeout"} and agents[1][1] == "done", out
    planner = out[out.index("[planner]"):]
    assert 'call evaluate({"expression": "12.5 + 7.25"}) -> ok: 19.75' in planner
    assert 'call convert({"value": 3, "unit_from": "mi", "unit_to": "km"}) -> ok: {"value": 4.828032, "unit": "km"}' \
        in planner
    assert 'call evaluate({"expression": "10 ** 10 ** 10"}) -> tool_error: ' in planner
    assert "rewards: 5 of 5" in planner
    assert "output: route 24.578 km, cost 14.82" in planner
    summary = re.search(r"^summary: 2 agents in [\d.]+s .*; tool calls (\d+); planner checks passed 5 of 5$", out, re.M)
    assert summary and int(summary[1]) >= len(calculator.CHECKS), out


# ---------------------------------------------------------------- evaluate, directly

@pytest.mark.parametrize("expression, expected", [
    ("1 + 2 * 3", 7.0),
    ("(1 + 2) * 3", 9.0),
    ("-2 ** 2", -4.0),
    ("(-2) ** 3", -8.0),
    ("2 ** -1", 0.5),
    ("7 / 2", 3.5),
    ("7 % 3", 1.0),
    ("-7.5 % 2", 0.5),
    ("+4 - -4", 8.0),
    ("sqrt(16) + log(e) + log10(1000)", 8.0),
    ("abs(-3) + round(2.6)", 6.0),
    ("2 * pi", 2 * math.pi),
    ("1e3 / 8", 125.0),
    ("  (12.5 + 7.25 + 3 * 1.609344) * 0.42 + 4.5 ", (12.5 + 7.25 + 3 * 1.609344) * 0.42 + 4.5),
    ("2 ** 1000 / 2 ** 999", 2.0),
])
def test_evaluate_computes(expression: str, expected: float) -> None:
    value = calculator.evaluate(expression)
    assert isinstance(value, float)
    assert math.isclose(value, expected, rel_tol=1e-12)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "unknown function '__import__'"),
    ("__import__('os').system('true')", "`__import__('os').system` cannot be called"),
    ("(1).__class__", "is not arithmetic"),
    ("math.pi", "is not arithmetic"),
    ("os", "unknown name 'os'"),
    ("x + 1", "unknown name 'x'"),
    ("sqrt(x=4)", "positional arguments"),
    ("sqrt(1, 2)", "sqrt() got 2 arguments"),
    ("10 ** 10 ** 10", "exponent 1e+10 is too large"),
    ("2 ** 1001", "exponent 1001 is too large"),
    ("2 ** -5000", "too large"),
    ("10 ** 400", "no finite real value"),
    ("1e308 * 10", "too large"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("sqrt(-1)", "no finite real value"),
    ("(-8) ** (1 / 3)", "no finite real value"),
    ("'a' * 3", "is not arithmetic"),
    ("True + 1", "is not arithmetic"),
    ("1j * 2", "is not arithmetic"),
    ("[1, 2]", "is not arithmetic"),
    ("lambda: 1", "is not arithmetic"),
    ("1 < 2", "is not arithmetic"),
    ("1 +", "cannot parse"),
    ("1\x00", "cannot parse"),
    ("", "cannot parse"),
    ("1" * 121, "at most 120"),
])
def test_evaluate_refuses(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=re.escape(message)):
        calculator.evaluate(expression)


def test_evaluate_through_the_registry() -> None:
    registry = ToolRegistry([calculator.evaluate, calculator.convert])
    params = calculator.evaluate.parameters["properties"]["expression"]
    assert params["type"] == "string" and params["maxLength"] == calculator.MAX_EXPRESSION_CHARS

    async def call(name: str, arguments: dict):
        return await registry.dispatch({"id": "c1", "name": name, "arguments": arguments})

    bad = asyncio.run(call("evaluate", {"expression": "__import__('os').getcwd()"}))
    assert not bad.ok and bad.error == "tool_error"
    assert "`__import__('os').getcwd` cannot be called" in bad.content and "Usage: evaluate(" in bad.content
    long = asyncio.run(call("evaluate", {"expression": "1+" * 70 + "1"}))
    assert not long.ok and long.error == "invalid_arguments"
    ok = asyncio.run(call("convert", {"value": 1, "unit_from": "mi", "unit_to": "ft"}))
    assert ok.ok and ok.value == {"value": 5280.0, "unit": "ft"}
    unit = asyncio.run(call("convert", {"value": 1, "unit_from": "mi", "unit_to": "parsec"}))
    assert not unit.ok and "expected one of 'km', 'mi', 'm', 'ft'" in unit.content


def test_planner_checks_compare_with_python() -> None:
    registry = ToolRegistry([calculator.evaluate, calculator.convert])
    for name, tool_name, arguments, expected in calculator.CHECKS:
        result = asyncio.run(registry.dispatch({"id": name, "name": tool_name, "arguments": arguments}))
        assert calculator.passed(result, expected), (name, result.content)


def test_sql_tool_is_capped(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    assert sql_analyst.build_shop(db, seed=3) == {"customers": 60, "products": 20, "orders": 400}
    limit = sql_analyst.max_query_chars(160)
    sql = sql_analyst.capped(sql_query(db), "query", limit)
    assert sql.parameters["properties"]["query"]["maxLength"] == limit
    registry = ToolRegistry([sql])

    async def call(query: str):
        return await registry.dispatch({"id": "c1", "name": "sql", "arguments": {"query": query}})

    ok = asyncio.run(call("SELECT COUNT(*) FROM orders WHERE quantity >= 1"))
    assert ok.ok and ok.content.splitlines()[1:] == ["400", "1 row"]
    long = asyncio.run(call("SELECT 1" + " " * limit))
    assert not long.ok and long.error == "invalid_arguments"
