"""Two agents share typed tools: `evaluate` (safe arithmetic) and `convert` (lengths, an Enum of units).

    python examples/calculator.py
    python examples/calculator.py --seed 3 --max-tokens 96
    python examples/calculator.py --model /path/to/NVIDIA-Nemotron-3-Nano-30B-A3B --max-tokens 1024

- "calculator" runs the built-in tool loop: the model calls tools until it answers.
- "planner" runs its own policy: it asks the model for a plan (no tools offered), then calls the
  tools itself for fixed sub-steps of the task, checks each result against Python's own arithmetic
  and records a reward of 1.0 or 0.0 per check. One check sends `10 ** 10 ** 10` and expects the
  tool to refuse it.

`evaluate` walks the expression's `ast` and allows only numbers, + - * / % **, parentheses, unary
signs, a few math functions and the constants pi and e; anything else (names, attributes,
`__import__`, exponents past 1000) comes back to the model as a ToolError message. `unit_from` and
`unit_to` are an Enum, so constrained decoding can only produce one of its values.

The embedded model ("tiny") has random weights: the planner's checks pass because the policy, not
the model, chooses the expressions; the calculator's text is noise and it often answers without
calling a tool (or with a random expression the tool rejects). A real checkpoint runs unchanged
via `--model`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import time
from enum import Enum
from typing import Annotated, Any

import click
from pydantic import Field

from agentrt.tools import ToolError, tool

MAX_EXPRESSION_CHARS = 120
MAX_EXPONENT = 1000
FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp,
             "sin": math.sin, "cos": math.cos, "tan": math.tan, "abs": abs, "round": round}
CONSTANTS = {"pi": math.pi, "e": math.e}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Mod: operator.mod}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
ALLOWED = (f"numbers, + - * / % **, parentheses, the functions {', '.join(FUNCTIONS)} "
           f"and the constants {', '.join(CONSTANTS)}")


def power(base: float, exponent: float) -> float:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent {exponent:g} is too large (at most {MAX_EXPONENT} in size); "
                        "rewrite the expression with a smaller power")
    return math.pow(base, exponent)


def _value(node: ast.AST) -> float:
    """The value of one node of an arithmetic expression; ToolError for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.BinOp) and (type(node.op) in BINARY or isinstance(node.op, ast.Pow)):
        left, right = _value(node.left), _value(node.right)
        return power(left, right) if isinstance(node.op, ast.Pow) else BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.Name):
        if node.id not in CONSTANTS:
            raise ToolError(f"unknown name {node.id!r}; use numbers, the constants {', '.join(CONSTANTS)} "
                            f"or a function call such as sqrt(2)")
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise ToolError(f"`{ast.unparse(node.func)[:60]}` cannot be called; functions: {', '.join(FUNCTIONS)}")
        name = node.func.id
        if name not in FUNCTIONS:
            raise ToolError(f"unknown function {name!r}; available: {', '.join(FUNCTIONS)}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ToolError(f"call {name}() with plain positional arguments, e.g. {name}(2)")
        args = [_value(a) for a in node.args]
        try:
            return float(FUNCTIONS[name](*args))
        except TypeError:
            raise ToolError(f"{name}() got {len(args)} arguments; e.g. {name}(2)") from None
    raise ToolError(f"`{ast.unparse(node)[:60]}` is not arithmetic; allowed: {ALLOWED}")


@tool
def evaluate(expression: Annotated[str, Field(max_length=MAX_EXPRESSION_CHARS)]) -> float:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: Numbers, + - * / % ** and parentheses, e.g. "(12.5 + 7.25) * 0.42" or "sqrt(2) ** 2".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression has {len(expression)} characters, at most {MAX_EXPRESSION_CHARS} "
                        "are allowed; split it into smaller steps")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"cannot parse {expression!r}: {exc.msg} (column {exc.offset}); "
                        "write plain arithmetic such as (2 + 3) * 4") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        raise ToolError(f"cannot parse the expression: {type(exc).__name__}: {exc}") from None
    try:
        value = _value(tree.body)
    except ZeroDivisionError:
        raise ToolError(f"division by zero in {expression!r}") from None
    except (OverflowError, ValueError) as exc:  # math.pow overflow, sqrt(-1), log(0), 10 ** 400
        raise ToolError(f"{expression!r} has no finite real value ({exc})") from None
    if not math.isfinite(value):
        raise ToolError(f"{expression!r} is {value}: the result is too large; use smaller numbers")
    return value


class Unit(str, Enum):
    km = "km"
    mi = "mi"
    m = "m"
    ft = "ft"


METERS = {Unit.km: 1000.0, Unit.mi: 1609.344, Unit.m: 1.0, Unit.ft: 0.3048}


@tool
def convert(value: float, unit_from: Unit, unit_to: Unit) -> dict:
    """Convert a length from one unit to another.

    Args:
        value: The length, in `unit_from`.
        unit_from: The unit of `value`.
        unit_to: The unit to convert to.
    """
    return {"value": round(value * METERS[unit_from] / METERS[unit_to], 6), "unit": unit_to.value}


TASK = ("A courier drives three legs: 12.5 km, 7.25 km and 3 mi. How long is the route in km, "
        "and what does it cost at 0.42 per km plus a flat fee of 4.5?")
ROUTE_KM = 12.5 + 7.25 + 3 * 1.609344
REFUSED = None  # expected outcome of a check that the tool must reject
CHECKS = (  # (reward name, tool, arguments, what Python computes)
    ("legs_km", "evaluate", {"expression": "12.5 + 7.25"}, 12.5 + 7.25),
    ("miles_to_km", "convert", {"value": 3, "unit_from": "mi", "unit_to": "km"}, 3 * 1.609344),
    ("route_km", "evaluate", {"expression": "12.5 + 7.25 + 3 * 1.609344"}, ROUTE_KM),
    ("cost", "evaluate", {"expression": "(12.5 + 7.25 + 3 * 1.609344) * 0.42 + 4.5"}, ROUTE_KM * 0.42 + 4.5),
    ("refuses_huge_power", "evaluate", {"expression": "10 ** 10 ** 10"}, REFUSED),
)


def passed(result: Any, expected: float | None) -> bool:
    """A check passes when the tool refused what it must refuse, or returned Python's value."""
    if expected is REFUSED:
        return not result.ok
    got = result.value["value"] if isinstance(result.value, dict) else result.value
    return result.ok and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-6)


async def planner(ctx) -> str:
    """Plan with the model, then run and check each sub-step with the tools (not the model)."""
    await ctx.chat("Write a short numbered plan for this task. Do not compute anything yet.", tools=False)
    values = {}
    for name, tool_name, arguments, expected in CHECKS:
        result = await ctx.call_tool(tool_name, arguments)
        ok = passed(result, expected)
        ctx.reward(1.0 if ok else 0.0, name=name, info={"expected": "refusal" if expected is REFUSED else expected})
        values[name] = result.value if result.ok else None
    route, cost = values["route_km"], values["cost"]
    if route is None or cost is None:
        return "no answer: a step of the route or the cost failed (see the checks)"
    return f"route {route:.3f} km, cost {cost:.2f}"


def excerpt(text: Any, limit: int = 110) -> str:
    """One printable line of at most `limit` characters."""
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    flat = " ".join("".join(c if c.isprintable() or c.isspace() else "\ufffd" for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def transcript(result, recorder) -> None:
    """What happened in one episode, in order: model turns, tool calls with results, rewards."""
    s = result.spent
    ending = result.status + (f" ({result.reason})" if result.reason else "")
    click.echo(f"\n[{result.agent}] status: {ending} | turns {s.turns} | tool calls {s.tool_calls} | "
               f"tokens {s.prompt_tokens} prompt ({s.cached_tokens} cached), {s.output_tokens} generated | "
               f"{s.seconds:.1f}s")
    for record in recorder.records:
        if record.trajectory_id != result.trajectory_id:
            continue
        data = record.data
        if record.kind == "message" and data["role"] == "assistant":
            reasoning = data.get("reasoning_content") or ""
            said = excerpt(data["content"]) if data["content"] else "(no text)"
            click.echo(f"  model: {said}" + (f"  [+{len(reasoning)} chars of reasoning]" if reasoning else ""))
        elif record.kind == "message" and data["role"] == "tool" and data["name"] == "invalid_tool_call":
            click.echo(f"  malformed call: {excerpt(data['content'])}")
        elif record.kind == "tool_call":
            call, res = data["call"], data["result"]
            args = json.dumps(call["arguments"], ensure_ascii=False)
            click.echo(f"  call {call['name']}({excerpt(args, 80)}) -> {'ok' if res.ok else res.error}: "
                       f"{excerpt(res.content, 90)}")
        elif record.kind == "reward":
            info = data["info"] or {}
            click.echo(f"  reward {data['name']} = {data['value']:g} (expected {info.get('expected')})")
    if result.rewards:
        click.echo(f"  rewards: {result.reward:g} of {len(result.rewards)}")
    if result.status == "failed":
        click.echo(f"  error: {excerpt(result.error, 300)}")
    click.echo(f"  output: {excerpt(result.output) if result.output is not None else '(none)'}")


async def run(model_name: str, max_tokens: int, seed: int):
    from agentrt import Agent, Budget, MemoryRecorder, Runtime, Sampling

    sampling = Sampling(temperature=0.7, max_tokens=max_tokens, seed=seed)
    instructions = "You are a careful calculator. Use the tools for every computation, then answer briefly."
    calculator = Agent(name="calculator", instructions=instructions, tools=[evaluate, convert], max_turns=3,
                       budget=Budget(think_tokens=32, tool_calls=4, turns=3, seconds=30), sampling=sampling)
    planning = Agent(name="planner", instructions=instructions, tools=[evaluate, convert], policy=planner,
                     budget=Budget(think_tokens=32, tool_calls=len(CHECKS), turns=1, seconds=30), sampling=sampling)
    recorder = MemoryRecorder()
    t0 = time.perf_counter()
    async with Runtime(model=model_name, recorder=recorder) as rt:
        click.echo(f"model: {rt.model.name}, loaded in {time.perf_counter() - t0:.1f}s")
        if model_name == "tiny":
            click.echo("note: 'tiny' has random weights: its text and its own tool calls are noise")
        click.echo(f"task: {TASK}")
        t1 = time.perf_counter()
        results = await rt.run([(calculator, TASK), (planning, TASK)])
        wall = time.perf_counter() - t1
    return results, recorder, wall


@click.command()
@click.option("--model", "model_name", default="tiny", show_default=True, help="'tiny' or a checkpoint directory")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(16), help="per model turn")
@click.option("--seed", default=0, show_default=True, help="sampling seed")
def main(model_name: str, max_tokens: int, seed: int) -> None:
    results, recorder, wall = asyncio.run(run(model_name, max_tokens, seed))
    for result in results:
        transcript(result, recorder)
    calls = sum(r.spent.tool_calls for r in results)
    click.echo(f"\nsummary: 2 agents in {wall:.1f}s ({', '.join(f'{r.agent} {r.status}' for r in results)}); "
               f"tool calls {calls}; planner checks passed {results[1].reward:g} of {len(CHECKS)}")


if __name__ == "__main__":
    main()
