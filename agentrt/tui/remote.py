"""The TUI in a process of its own, reading the runtime's process over a socket pair.

Textual repaints on the event loop it runs on. Run in the runtime's process it shares that loop
(or, on another thread, the GIL) with the agents, and every repaint delays them. So `agentrt run
--display tui` keeps only the data on the runtime's side: `SourceHost` answers the app's calls
(`snapshot()`, `transcript(...)`, ...) on the runtime's loop, a few times a second, and the app
with its rendering and the terminal lives in a child process (`python -m agentrt.tui.remote`),
where `PipeSource` stands in for the source. The cost left on the runtime's loop is taking a
snapshot and pickling it.

Frames are a 4-byte length and a pickle. Both ends are this program, connected by a socket pair
made before the child starts; nothing listens on an address.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

FRAME = struct.Struct("!I")
METHODS = ("snapshot", "transcript", "runs", "trajectories", "tree", "search", "current_run")


class SourceClosed(ConnectionError):
    """The runtime's process closed its end: the run, or the program, is over."""


# -- the runtime's side --------------------------------------------------------------------------------
class SourceHost:
    """Answers a child app's calls on `source` (e.g. a `RuntimeSource`) on the running event loop.

    `snapshot_ms`/`snapshot_at`: what each `snapshot()` cost this loop, and when it was taken.
    """

    def __init__(self, source: Any):
        self.source = source
        self.methods = [m for m in METHODS if callable(getattr(source, m, None))]
        self.snapshot_ms: list[float] = []
        self.snapshot_at: list[float] = []
        self.first_call = asyncio.Event()

    async def serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(_frame(self.methods))
            while True:
                (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                name, args = pickle.loads(await reader.readexactly(size))
                writer.write(_frame(self._answer(name, args)))
                await writer.drain()
                self.first_call.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the app quit
        finally:
            writer.close()

    def _answer(self, name: str, args: tuple) -> tuple[bool, Any]:
        if name not in self.methods:
            return False, f"the runtime's source has no method {name!r} (it has {', '.join(self.methods)})"
        started = time.perf_counter()
        try:
            value = getattr(self.source, name)(*args)
        except Exception as e:  # shown in the app's status line; the next poll tries again
            return False, f"{type(e).__name__}: {e}"
        if name == "snapshot":
            self.snapshot_ms.append((time.perf_counter() - started) * 1e3)
            self.snapshot_at.append(time.perf_counter())
        return True, value


@dataclass
class TuiProcess:
    """A child process running the app over a `SourceHost`; `wait()` until the user quits it,
    `close()` to end it (the app exits when its source goes away)."""

    process: asyncio.subprocess.Process
    host: SourceHost
    serving: asyncio.Task
    output: list[str] = field(default_factory=list)

    @classmethod
    async def start(cls, source: Any, *, refresh_hz: float = 3.0, headless: bool = False,
                    size: tuple[int, int] | None = None) -> TuiProcess:
        ours, theirs = socket.socketpair()
        args = [sys.executable, "-m", "agentrt.tui.remote", "--fd", str(theirs.fileno()), "--refresh-hz",
                str(refresh_hz)]
        if headless:
            args += ["--headless", "--size", f"{size[0]}x{size[1]}" if size else "120x36"]
        try:
            process = await asyncio.create_subprocess_exec(
                *args, pass_fds=(theirs.fileno(),),
                stdout=asyncio.subprocess.PIPE if headless else None)
        finally:
            theirs.close()
        host = SourceHost(source)
        return cls(process, host, asyncio.ensure_future(host.serve(ours)))

    async def wait(self) -> int:
        if self.process.stdout is not None:
            self.output = (await self.process.stdout.read()).decode().splitlines()
        code = await self.process.wait()
        self.serving.cancel()
        return code

    async def close(self, timeout: float = 10.0) -> int:
        self.serving.cancel()  # closes our end: the app's next call finds it gone and the app exits
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except asyncio.TimeoutError:
            self.process.kill()
            return await self.wait()


# -- the app's side ------------------------------------------------------------------------------------
class PipeSource:
    """The source a child app reads: each call goes to the runtime's process and waits for the
    answer (`blocking`: the app calls it from worker threads)."""

    blocking = True

    def __init__(self, sock: socket.socket):
        self._sock, self._lock, self.closed = sock, threading.Lock(), False
        self.methods: list[str] = self._receive()

    def __getattr__(self, name: str) -> Any:
        if name in METHODS and name in self.__dict__.get("methods", ()):
            return lambda *args: self._call(name, args)
        raise AttributeError(name)

    def _call(self, name: str, args: tuple) -> Any:
        with self._lock:
            if self.closed:
                raise SourceClosed("the run's process has closed the connection")
            try:
                self._sock.sendall(_frame((name, args)))
                ok, value = self._receive()
            except (ConnectionError, OSError) as e:
                self.closed = True
                raise SourceClosed("the run's process has closed the connection") from e
        if not ok:
            raise RuntimeError(value)
        return value

    def _receive(self) -> Any:
        (size,) = FRAME.unpack(self._exactly(FRAME.size))
        return pickle.loads(self._exactly(size))

    def _exactly(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self._sock.recv(min(left, 1 << 20))
            if not chunk:
                raise SourceClosed("the run's process has closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


def _app(source: PipeSource, refresh_hz: float):
    from .app import AgentrtApp

    class ChildApp(AgentrtApp):
        """The app, exiting when the runtime's process goes away."""

        def on_source_error(self, message: Any) -> None:
            if source.closed:
                message.prevent_default()  # not the base class's notification too
                self.exit()
            else:
                super().on_source_error(message)
                message.prevent_default()

    return ChildApp(source, refresh_hz=refresh_hz)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentrt.tui.remote",
                                     description="The agentrt TUI over a runtime in the parent process.")
    parser.add_argument("--fd", type=int, required=True, help="the socket the parent passed")
    parser.add_argument("--refresh-hz", type=float, default=3.0)
    parser.add_argument("--headless", action="store_true", help="no terminal (benchmarks); print polls at exit")
    parser.add_argument("--size", default="120x36", help="COLSxROWS when headless")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    if not args.headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("agentrt: the TUI needs a terminal (stdin and stdout are not one); showing the plain display",
              file=sys.stderr)
        sock.close()
        return 2
    try:
        source = PipeSource(sock)
    except SourceClosed:
        return 0
    app = _app(source, args.refresh_hz)
    started = time.perf_counter()
    if args.headless:
        cols, rows = (int(v) for v in args.size.lower().split("x"))
        app.run(headless=True, size=(cols, rows))
        print(json.dumps({"polls": app.polls, "seconds": time.perf_counter() - started}), flush=True)
    else:
        app.run()
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
