"""agentrt's OpenAI-compatible HTTP server over the in-process engine (`agentrt serve`).

>>> async with await start_server("tiny", port=0) as running:          # doctest: +SKIP
...     client = openai.AsyncOpenAI(base_url=running.url, api_key="-")
...     await client.chat.completions.create(model="tiny", messages=[...])

`ServerThread` runs the same server on a thread of its own, for synchronous callers (tests, notebooks).
Importing this package imports aiohttp and the engine, so `agentrt/__init__.py` never imports it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from .app import Admission, Server, ServerConfig
from .protocol import ApiError

__all__ = ["Admission", "ApiError", "RunningServer", "Server", "ServerConfig", "ServerThread", "run_server",
           "start_server"]


class RunningServer:
    """A server listening on `url` (ends in /v1); `close()` stops listening, then stops the engine."""

    def __init__(self, server: Server, runner: web.AppRunner, host: str, port: int):
        self.server, self.runner, self.host, self.port = server, runner, host, port
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"

    @property
    def engine(self) -> Any:
        return self.server.engine

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.server.engine.stop()

    async def __aenter__(self) -> RunningServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def served_name(model: str | Path) -> str:
    """The model id clients send: 'tiny', or the checkpoint directory's name."""
    return "tiny" if str(model) == "tiny" else Path(model).expanduser().resolve().name


async def start_server(model: str | Path = "tiny", *, host: str = "127.0.0.1", port: int = 8000,
                       config: ServerConfig | None = None, engine_config: Any = None) -> RunningServer:
    """Load `model`, start its engine and listen on host:port (0: any free port; see `.port`)."""
    from agentrt.model import Engine, load

    config = config or ServerConfig(model_name=served_name(model))
    lm = await asyncio.to_thread(load, model)
    engine = Engine(lm, engine_config)
    engine.start()
    server = Server(lm, engine, config)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its request
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        await engine.stop()
        raise
    bound = runner.addresses[0][1] if port == 0 else port
    return RunningServer(server, runner, host, bound)


def run_server(model: str | Path = "tiny", *, host: str = "127.0.0.1", port: int = 8000,
               config: ServerConfig | None = None, engine_config: Any = None, announce: Any = print) -> None:
    """Serve until SIGINT or SIGTERM (the CLI's `agentrt serve`); `announce` gets the listening line."""

    async def main() -> None:
        running = await start_server(model, host=host, port=port, config=config, engine_config=engine_config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        announce(f"agentrt serve: {running.server.config.model_name!r} on {running.url} "
                 f"(auth: {'bearer key' if running.server.config.api_key else 'none'})")
        try:
            await stop.wait()
        finally:
            await running.close()

    asyncio.run(main())


class ServerThread:
    """The server on a background thread with its own event loop.

    >>> with ServerThread("tiny") as server:                              # doctest: +SKIP
    ...     openai.OpenAI(base_url=server.url, api_key="-").models.list()
    """

    def __init__(self, model: str | Path = "tiny", *, host: str = "127.0.0.1", port: int = 0,
                 config: ServerConfig | None = None, engine_config: Any = None):
        self._args = dict(host=host, port=port, config=config, engine_config=engine_config)
        self.model = model
        self.loop = asyncio.new_event_loop()
        self.running: RunningServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="agentrt-server", daemon=True)

    @property
    def url(self) -> str:
        assert self.running is not None, "start() the server first"
        return self.running.url

    @property
    def server(self) -> Server:
        assert self.running is not None, "start() the server first"
        return self.running.server

    def call(self, coro: Any, timeout: float | None = 60.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result (e.g. to read engine state)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        self.running = self.call(start_server(self.model, **self._args), timeout=300)
        return self

    def stop(self) -> None:
        if self.running is not None:
            self.call(self.running.close())
            self.running = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
