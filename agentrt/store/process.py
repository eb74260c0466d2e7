"""`Store(writer="process")`: the store's writer in a child process, off the recording process's GIL.

The writer thread of the default store shares the GIL with the event loop, and turning records into
rows (JSON, hashes, token arrays, SQL parameters) costs about a third of what the agents themselves
cost: the loop waits for it, and it falls behind while the agents run. Here the recording process
only pickles the queued records onto a pipe (a pump thread, a few microseconds a record); a child
process (`python -m agentrt.store.process`) runs the same `Writer` on the other end and reports
each commit and each answered flush back.

What crosses the pipe is plain data: objects the database would store as JSON anyway (pydantic
models, dataclasses, enums, anything else) are turned into what the store would encode them as
before pickling, so the child never needs the user's classes. Frames are a 4-byte length and a
pickle. If the recording process dies, the child sees its pipe close and exits at once: what it
had committed stays, the transaction in flight rolls back, and the next `Store` on the file marks
the run interrupted, as with the thread. If the child dies, pending and later flushes raise.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections import deque
from typing import Any, BinaryIO

from agentrt.llm import ChatOptions

from .schema import jsonable, make_engine, prepare

log = logging.getLogger("agentrt.store")
KNOWN_TOOL_LISTS = 10_000  # schema lists remembered as sent (then all are sent again)
SEND_AT_ONCE = 200  # records per frame: pickling holds the GIL for one whole frame


def _plain(value: Any) -> Any:
    return value


class ToolsRef(tuple):
    """(token, schemas or None) in place of a model call's tool-schema list: a trajectory passes the
    same list on every call, so the list crosses the pipe once and later calls name its token."""

    __slots__ = ()


AS_IS = frozenset({ChatOptions})  # agentrt's own record types, which the writer process can import


class RecordPickler(pickle.Pickler):
    """Pickles records as plain data. pickle calls `reducer_override` only for objects that are not
    None, booleans or exact ints, floats, strs, bytes, dicts, lists, tuples, sets and frozensets,
    so plain records pay nothing for it."""

    def reducer_override(self, obj: Any) -> Any:
        if obj is _plain or obj is ToolsRef or obj.__class__ is ToolsRef:  # ours, pickled by reference
            return NotImplemented
        if obj.__class__ in AS_IS or (obj.__class__ is type and obj in AS_IS):  # agentrt's own: by reference
            return NotImplemented  # (the writer caches ChatOptions blobs by value)
        if isinstance(obj, str):  # str subclasses (enums): the characters, as JSON writes them
            return _plain, (str.__str__(obj),)
        if isinstance(obj, int):
            return _plain, (int(obj),)
        if isinstance(obj, float):
            return _plain, (float(obj),)
        for base in (dict, list, tuple, set, frozenset, bytes):  # subclasses (a caller's own, a namedtuple):
            if isinstance(obj, base):  # the base type, which the writer process can always rebuild
                return _plain, (base(obj),)
        return _plain, (jsonable(obj),)


def dump_frame(value: Any) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\0\0\0\0")
    RecordPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    data = buf.getbuffer()
    data[:4] = (len(data) - 4).to_bytes(4, "little")
    return bytes(data)


def read_frame(f: BinaryIO) -> Any:
    """The next frame's value, or None at the end of the stream."""
    head = f.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "little")
    data = f.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


class WriterProcess:
    """The recording side: a pump thread sends queued records and flush markers to the child, a
    reply thread takes its commits and answers. Same surface as `Writer` for the `Store`."""

    def __init__(self, url: str, batch_size: int, flush_interval: float, queue: deque, wake: threading.Event,
                 name: str):
        from .writer import _Marker

        self._marker_type = _Marker
        self.queue, self.wake, self.flush_interval, self.name = queue, wake, flush_interval, name
        self.flushed_events = self.taken = self.batches = 0
        self.last_commit: float | None = None
        self.error: str | None = None
        self._lost_child = self._lost_here = 0
        self._markers: dict[int, Any] = {}
        self._tools: dict[int, tuple[list, int]] = {}  # id(schema list) -> (the list, its token)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._exited: str | None = None
        self.proc = subprocess.Popen([sys.executable, "-m", "agentrt.store.process"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        self._send(("config", url, batch_size, flush_interval, name))
        self._pump = threading.Thread(target=self._run_pump, name="agentrt-store-pump", daemon=True)
        self._reader = threading.Thread(target=self._run_reader, name="agentrt-store-replies", daemon=True)
        self._pump.start()
        self._reader.start()

    def __str__(self) -> str:
        return self.name

    @property
    def lost(self) -> int:
        return self._lost_child + self._lost_here

    def alive(self) -> bool:
        return self._exited is None and self._pump.is_alive()

    def join(self) -> None:
        self._pump.join()
        self._reader.join()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.error("%s: the writer process did not exit; killing it", self)
            self.proc.kill()

    # -- recording side ------------------------------------------------------------------------
    def _send(self, message: Any) -> None:
        self.proc.stdin.write(dump_frame(message))
        self.proc.stdin.flush()

    def _intern_tools(self, records: list) -> None:
        for r in records:
            if r[0] == "model_call" and isinstance(tools := r[-1].get("tools"), list):
                entry = self._tools.get(id(tools))
                if entry is not None and entry[0] is tools:
                    r[-1]["tools"] = ToolsRef((entry[1], None))
                else:
                    if len(self._tools) > KNOWN_TOOL_LISTS:
                        self._tools.clear()
                    token = next(self._ids)
                    self._tools[id(tools)] = (tools, token)  # kept alive, so its id is not reused
                    r[-1]["tools"] = ToolsRef((token, tools))

    def _send_records(self, records: list) -> None:
        self._intern_tools(records)
        try:
            self._send(("records", records))
        except (BrokenPipeError, OSError):
            raise
        except Exception:  # one record that will not pickle: send the others, count it lost
            good = []
            for r in records:
                try:
                    dump_frame(r)
                    good.append(r)
                except Exception as e:
                    log.error("%s: could not send %s for %s to the writer process: %s", self, r[0], r[1], e)
                    self._lost_here += 1
                    self.error = f"{type(e).__name__}: {e}"
            self._send(("records", good))
        self.taken += len(records)

    def _run_pump(self) -> None:
        queue, marker_type = self.queue, self._marker_type
        try:
            while True:
                self.wake.wait(self.flush_interval)
                self.wake.clear()
                batch: list = []
                while queue:
                    item = queue.popleft()
                    if isinstance(item, marker_type):
                        if batch:
                            self._send_records(batch)
                            batch = []
                        mid = next(self._ids)
                        with self._lock:
                            if self._exited is not None:
                                return self._fail(item, self._exited)
                            self._markers[mid] = item
                        self._send(("marker", mid, item.stop))
                        if item.stop:
                            self.proc.stdin.close()
                            return
                        continue
                    batch.append(item)
                    if len(batch) >= SEND_AT_ONCE:
                        self._send_records(batch)
                        batch = []
                if batch:
                    self._send_records(batch)
        except (BrokenPipeError, OSError, ValueError) as e:  # the child is gone; the reader says why
            log.error("%s: the writer process stopped taking records: %s", self, e)
            with self._lock:
                pending = [i for i in queue if isinstance(i, marker_type)]
            for m in pending:
                self._fail(m, f"the writer process of {self} stopped")

    def _fail(self, marker: Any, error: str) -> None:
        marker.error = error
        marker.done(0, None)

    def _run_reader(self) -> None:
        while True:
            try:
                msg = read_frame(self.proc.stdout)
            except Exception as e:
                log.error("%s: unreadable reply from the writer process: %s", self, e)
                msg = None
            if msg is None:
                break
            kind, counters = msg[0], msg[-1]
            self.flushed_events, self.batches, self._lost_child, self.last_commit, child_error = counters
            if child_error:
                self.error = child_error
            if kind == "marker":
                with self._lock:
                    marker = self._markers.pop(msg[1])
                marker.done(self.lost, self.error)
        code = self.proc.wait()
        with self._lock:
            self._exited = f"the writer process of {self} exited (status {code})"
            pending, self._markers = list(self._markers.values()), {}
        for marker in pending:
            self._fail(marker, self._exited)


# -- the child ---------------------------------------------------------------------------------------
def main() -> None:
    from .writer import Writer, _Marker

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the reply pipe
    config = read_frame(inp)
    if config is None or config[0] != "config":
        raise SystemExit("agentrt.store.process: run by Store(writer='process'), not by hand")
    _, url, batch_size, flush_interval, name = config
    engine = make_engine(url, readonly=False)
    prepare(engine, create=True)
    queue: deque = deque()
    wake = threading.Event()
    writer = Writer(engine, batch_size, flush_interval, queue, wake, name + " (writer process)")
    send_lock = threading.Lock()

    def counters() -> tuple:
        return writer.flushed_events, writer.batches, writer.lost, writer.last_commit, writer.error

    def send(message: tuple) -> None:
        with send_lock:
            out.write(dump_frame(message))
            out.flush()

    class Answer(_Marker):
        __slots__ = ("id",)

        def __init__(self, mid: int, stop: bool):
            super().__init__(0, stop=stop)
            self.id = mid

        def done(self, lost: int, error: str | None) -> None:
            send(("marker", self.id, counters()))

    writer.on_commit = lambda: send(("commit", counters()))
    stopping = threading.Event()
    tools: dict[int, list] = {}

    def receive() -> None:
        try:
            take()
        except BaseException:  # the recording side would wait forever on flushes: exit, so it sees why
            log.exception("%s: the writer process cannot read its records", writer)
            os._exit(1)

    def take() -> None:
        while True:
            msg = read_frame(inp)
            if msg is None:
                if not stopping.is_set():  # the recording process died: stop now, keep what is committed
                    os._exit(0)
                return
            if msg[0] == "records":
                for r in msg[1]:
                    if r[0] == "model_call" and (ref := r[-1].get("tools")).__class__ is ToolsRef:
                        token, schemas = ref
                        if schemas is not None:
                            tools[token] = schemas
                        r[-1]["tools"] = tools[token]  # the same list object each time, as Rows expects
                queue.extend(msg[1])
            else:
                if msg[2]:
                    stopping.set()
                queue.append(Answer(msg[1], msg[2]))
            wake.set()

    threading.Thread(target=receive, name="agentrt-store-receive", daemon=True).start()
    try:
        writer.run()
    finally:
        engine.dispose()


if __name__ == "__main__":  # run through the package module, so what the parent pickled by reference is ours
    from agentrt.store.process import main as package_main

    package_main()
