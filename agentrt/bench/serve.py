"""`agentrt bench serve`: many streaming clients against `agentrt serve` over loopback.

The server runs in its own process, as it would in production; `clients` concurrent clients each
stream chat completions back to back for `seconds` (every request shares a system prompt, each has
its own user message), reading every server-sent event. A request counts as an error unless it
answered 200, streamed well-formed chunks and ended with a finish reason and `[DONE]`.
Reported: requests/s, output tokens/s, time to first token and request latency, and from the
server's /metrics over the run: mean engine batch size and prefix-cache hit rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from agentrt.bench import tables
from agentrt.bench.tables import markdown_table, text_table

SYSTEM = ("You are one of many load-test clients of agentrt's server. Answer briefly. " * 8).strip()


@dataclass(slots=True)
class LoadReport:
    clients: int
    seconds: float
    max_tokens: int
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    output_tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    mean_batch: float = 0.0
    hit_rate: float = 0.0
    machine: dict = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_server_process(model: str = "tiny", *args: str, timeout: float = 300.0,
                         env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`agentrt serve --port 0` in a child process; returns it and its base URL once it listens."""
    cmd = [sys.executable, "-m", "agentrt.cli", "serve", "--model", model, "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if " on http://" in line:
            return proc, line.split(" on ", 1)[1].split()[0]
    proc.kill()
    raise RuntimeError(f"`{' '.join(cmd)}` did not start listening; it said:\n{''.join(seen)[-2000:]}")


def stop_server_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def scrape(session, url: str) -> dict[str, float]:
    """The server's /metrics as {name: value} (unlabelled samples only)."""
    async with session.get(url.removesuffix("/v1") + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


async def run_load(url: str, clients: int, seconds: float, max_tokens: int, model: str = "tiny",
                   api_key: str | None = None) -> LoadReport:
    """`clients` streaming clients for `seconds` against the server at `url`."""
    import aiohttp

    report = LoadReport(clients, seconds, max_tokens)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=clients + 4)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        before = await scrape(session, url)
        start = time.perf_counter()
        deadline = start + seconds

        async def client(n: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                i += 1
                body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
                        "seed": n * 100003 + i, "stream_options": {"include_usage": True}, "max_thinking_tokens": 0,
                        "messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"client {n} request {i}: say something"}]}
                await _one(session, url, body, report)

        await asyncio.gather(*(client(n) for n in range(clients)))
        report.seconds = time.perf_counter() - start
        after = await scrape(session, url)
    steps = after["agentrt_engine_steps_total"] - before["agentrt_engine_steps_total"]
    batched = (after["agentrt_mean_batch_size"] * after["agentrt_engine_steps_total"]
               - before["agentrt_mean_batch_size"] * before["agentrt_engine_steps_total"])
    report.mean_batch = batched / steps if steps else 0.0
    prompt = after["agentrt_prompt_tokens_total"] - before["agentrt_prompt_tokens_total"]
    cached = after["agentrt_cached_prompt_tokens_total"] - before["agentrt_cached_prompt_tokens_total"]
    report.hit_rate = cached / prompt if prompt else 0.0
    return report


async def _one(session, url: str, body: dict, report: LoadReport) -> None:
    started = time.perf_counter()
    first = None
    finish = usage = None
    done = False
    try:
        async with session.post(url + "/chat/completions", json=body) as resp:
            if resp.status != 200:
                report.errors.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                return
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    data = event.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        done = True
                        continue
                    message = json.loads(data)
                    if "error" in message:
                        report.errors.append(f"error event: {message['error']}")
                        return
                    if first is None:
                        first = time.perf_counter()
                    for choice in message.get("choices", []):
                        finish = choice.get("finish_reason") or finish
                    usage = message.get("usage") or usage
    except Exception as e:  # noqa: BLE001 - every failure is a reported error
        report.errors.append(f"{type(e).__name__}: {e}")
        return
    if not done or finish is None or usage is None:
        report.errors.append(f"incomplete stream (done={done}, finish_reason={finish}, usage={usage is not None})")
        return
    end = time.perf_counter()
    report.requests += 1
    report.output_tokens += usage["completion_tokens"]
    report.ttft_ms.append(1000 * ((first or end) - started))
    report.latency_ms.append(1000 * (end - started))


def run_benchmark(clients: int, seconds: float, max_tokens: int, model: str = "tiny",
                  log: Callable[[str], None] = print) -> LoadReport:
    """Start a server process, load it, stop it."""
    from agentrt import __version__

    machine = tables.machine_info("agentrt", __version__)
    log(f"starting `agentrt serve --model {model}` ...")
    proc, url = start_server_process(model)
    try:
        log(f"{clients} streaming clients for {seconds:g} s against {url} ...")
        report = asyncio.run(run_load(url, clients, seconds, max_tokens, model))
    finally:
        stop_server_process(proc)
    report.machine = machine
    return report


def _rows(r: LoadReport) -> tuple[list[str], list[list[str]]]:
    header = ["clients", "seconds", "requests", "errors", "requests/s", "output tokens/s", "TTFT p50 ms",
              "TTFT p99 ms", "latency p50 ms", "latency p99 ms", "mean batch", "prefix hits"]
    row = [str(r.clients), f"{r.seconds:.1f}", str(r.requests), str(len(r.errors)), f"{r.requests_per_s:.1f}",
           f"{r.tokens_per_s:.0f}", f"{_quantile(r.ttft_ms, 0.5):.0f}", f"{_quantile(r.ttft_ms, 0.99):.0f}",
           f"{_quantile(r.latency_ms, 0.5):.0f}", f"{_quantile(r.latency_ms, 0.99):.0f}", f"{r.mean_batch:.1f}",
           f"{r.hit_rate:.1%}"]
    return header, [row]


def format_text(r: LoadReport) -> str:
    header, rows = _rows(r)
    lines = text_table(header, rows)
    if r.errors:
        lines.append(f"{len(r.errors)} errors, first: {r.errors[0]}")
    lines.append(tables.machine_line(r.machine))
    return "\n".join(lines)


def format_markdown(r: LoadReport, command: str) -> str:
    header, rows = _rows(r)
    return markdown_table(command, header, rows) + "\n\n" + tables.machine_line(r.machine)
