"""`Store`: the Recorder that writes trajectories to a database without ever making the event loop wait.

Each recorder method appends one tuple to a deque and returns. One `Writer` drains the deque, on a
thread of this process or, with `Store(writer="process")`, in a child process fed by a pipe
(process.py): `Rows` (rows.py) turns records into rows (JSON encoding, hashing, token arrays) and links them,
and `BatchWriter` writes up to `batch_size` records per transaction with bulk inserts. Every
recorder call makes exactly one row in nodes, model_calls, tool_calls, rewards or events
(lifecycle calls make an event), which is what `flushed_events` counts.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from .reader import StoreReader
from .rows import Batch, Rows
from .schema import StoreError, blobs, events, metadata, runs, trajectories

if TYPE_CHECKING:
    from agentrt.llm import ChatReply
    from agentrt.runtime import AgentResult

log = logging.getLogger("agentrt.store")
_now = time.time
CONVERT_AT_ONCE = 2000  # records turned into rows before the writer writes a batch
RETRIES = (0.1, 0.5, 2.0, 5.0)  # seconds between attempts at a batch the database refused (locked, connection lost)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """`queued`: recorder calls received; `written`: committed (= `Store.flushed_events`); `pending`:
    waiting in the queue; `lost`: calls that could not be written (see the log); `last_commit`: time.time()."""

    queued: int
    written: int
    pending: int
    batches: int
    lost: int
    last_commit: float | None


class _Marker:
    """A flush request in the queue: the writer commits what came before it, then signals."""

    __slots__ = ("event", "future", "loop", "stop", "lost_before", "error")

    def __init__(self, lost_before: int, *, stop: bool = False, loop: asyncio.AbstractEventLoop | None = None):
        self.event, self.stop, self.loop, self.lost_before = threading.Event(), stop, loop, lost_before
        self.error: str | None = None
        self.future = loop.create_future() if loop is not None else None

    def done(self, lost: int, error: str | None) -> None:
        if lost > self.lost_before:
            self.error = f"{lost - self.lost_before} recorder calls could not be written: {error}"
        self.event.set()
        if self.future is not None:
            try:
                self.loop.call_soon_threadsafe(_resolve, self.future, self.error)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass


def _resolve(future: asyncio.Future, error: str | None) -> None:
    if not future.done():
        future.set_exception(StoreError(error)) if error else future.set_result(None)


class _Closed:
    """Takes the queue's place once the store is closed: later records are dropped, with one warning."""

    def __init__(self, where: str):
        self.where, self.dropped = where, 0

    def append(self, item: Any) -> None:
        if not self.dropped:
            log.warning("a record came after the store %s was closed; it and later ones are dropped", self.where)
        self.dropped += 1

    def __len__(self) -> int:
        return 0


_OPEN: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _close_open_stores() -> None:
    for store in list(_OPEN):
        store.close()


class Store(StoreReader):
    """The trajectory store: pass it as the runtime's recorder; read it back with the same object
    or a `StoreReader` (another process may read while this one writes).

    `url`: a path (a SQLite file, created if missing, WAL mode) or a SQLAlchemy URL such as
    `postgresql+psycopg://user@host/db`. `batch_size`: records per transaction. `flush_interval`:
    how long the idle writer sleeps. `recover`: mark runs and trajectories a previous process left
    `running` as `interrupted` (turn it off when several processes write one database at once).
    `writer`: "thread" (default, or `$AGENTRT_STORE_WRITER`) or "process" (rows built and written
    by a child process, off this process's GIL; see docs/store.md).

    >>> from agentrt import Agent, Runtime, ScriptedModel
    >>> from agentrt.store import Store
    >>> with Store("runs.db") as store:                                      # doctest: +SKIP
    ...     [r] = Runtime.run_sync([Agent(name="a")], model=ScriptedModel(lambda m, t: "hi"), recorder=store)
    ...     store.flush()
    ...     [n.role for n in store.messages(r.trajectory_id)]
    ['assistant']
    """

    def __init__(self, url: str | Path, *, batch_size: int = 500, flush_interval: float = 0.05, recover: bool = True,
                 writer: str | None = None):
        if batch_size < 1 or not flush_interval > 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and flush_interval={flush_interval} > 0 seconds")
        writer = writer or os.environ.get(WRITER_ENV) or "thread"
        if writer not in WRITERS:
            raise ValueError(f"writer={writer!r} (or ${WRITER_ENV}): choose 'thread' (rows built on a thread of this process) or "
                             "'process' (rows built and written by a child process, off this process's GIL)")
        self._open(url, readonly=False)
        self.batch_size, self.flush_interval = batch_size, flush_interval
        self.interrupted: list[str] = [] if self.created or not recover else interrupt(
            self.engine, None, None, "the process recording it stopped before it finished")
        self._q: deque | _Closed = deque()
        self._wake = threading.Event()
        self._closing = threading.Lock()
        self._closed = False
        if writer == "process":
            from .process import WriterProcess

            self._writer: Writer | WriterProcess = WriterProcess(self.url, batch_size, flush_interval, self._q,
                                                                 self._wake, name=str(self))
        else:
            self._writer = Writer(self.engine, batch_size, flush_interval, self._q, self._wake, name=str(self))
            self._writer.start()
        _OPEN.add(self)

    @property
    def flushed_events(self) -> int:
        """Recorder calls committed so far."""
        return self._writer.flushed_events

    # -- the Recorder protocol: called on the event loop, each returns at once -------------------------
    def run_started(self, run_id: str, meta: dict) -> None:
        self._q.append(("run_started", run_id, _now(), dict(meta)))

    def run_finished(self, run_id: str, status: str, summary: dict) -> None:
        self._q.append(("run_finished", run_id, _now(), status, dict(summary)))

    def trajectory_started(self, trajectory_id: str, run_id: str, agent: str, meta: dict) -> None:
        self._q.append(("trajectory_started", trajectory_id, _now(), run_id, agent, dict(meta)))

    def message(self, trajectory_id: str, message: dict) -> None:
        self._q.append(("message", trajectory_id, _now(), dict(message)))

    def model_call(self, trajectory_id: str, reply: ChatReply, meta: dict) -> None:
        u = reply.usage
        self._q.append(("model_call", trajectory_id, _now(), reply.to_message(), reply.finish_reason,
                        u.prompt_tokens, u.cached_tokens, u.thinking_tokens, u.output_tokens, tuple(reply.prompt_ids),
                        tuple(reply.token_ids), tuple(reply.logprobs), reply.seconds, dict(meta)))

    def tool_call(self, trajectory_id: str, call: dict, result: Any) -> None:
        self._q.append(("tool_call", trajectory_id, _now(), call.get("id"), call.get("name"), call.get("arguments"),
                        getattr(result, "ok", True), getattr(result, "error", None), getattr(result, "content", result),
                        getattr(result, "seconds", None)))

    def reward(self, trajectory_id: str, name: str, value: float, info: dict | None) -> None:
        self._q.append(("reward", trajectory_id, _now(), name, value, info))

    def event(self, trajectory_id: str | None, kind: str, data: dict) -> None:
        self._q.append(("event", trajectory_id, _now(), kind, dict(data)))

    def trajectory_finished(self, trajectory_id: str, result: AgentResult) -> None:
        self._q.append(("trajectory_finished", trajectory_id, _now(), result.agent, result.task, result.status,
                        result.reason, result.error, result.spent.as_dict(), result.reward, result.output))

    # -- control ---------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record queued before this call is committed. False if `timeout`
        seconds passed first; raises StoreError if some of those records could not be written."""
        if self._closed:
            return True
        marker = _Marker(self._writer.lost)
        self._q.append(marker)
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.event.wait(0.25):
            if not self._writer.alive():
                raise StoreError(f"the writer of {self} stopped; see the log of 'agentrt.store'")
            if deadline is not None and time.monotonic() >= deadline:
                return False
        if marker.error:
            raise StoreError(marker.error)
        return True

    async def aflush(self) -> None:
        """`flush` for coroutines: waits without blocking the event loop."""
        if self._closed:
            return
        marker = _Marker(self._writer.lost, loop=asyncio.get_running_loop())
        self._q.append(marker)
        self._wake.set()
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(marker.future), 1.0)
            except asyncio.TimeoutError:
                if not self._writer.alive():
                    raise StoreError(f"the writer of {self} stopped; see the log of 'agentrt.store'") from None

    def close(self) -> None:
        """Write everything queued, stop the writer, mark runs and trajectories this store saw start
        but not finish `interrupted`, and release the database. Idempotent."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        queue, self._q = self._q, _Closed(str(self))
        marker = _Marker(self._writer.lost, stop=True)  # the writer marks unfinished runs interrupted first
        queue.append(marker)
        self._wake.set()
        self._writer.join()
        if marker.error:
            log.error("closing %s: %s", self, marker.error)
        self.engine.dispose()
        _OPEN.discard(self)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Store:
        return self

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def stats(self) -> StoreStats:
        pending, w = len(self._q), self._writer
        return StoreStats(queued=w.taken + pending, written=w.flushed_events, pending=pending,
                          batches=w.batches, lost=w.lost, last_commit=w.last_commit)


WRITERS = ("thread", "process")
WRITER_ENV = "AGENTRT_STORE_WRITER"  # the default of Store(writer=...)


class Writer:
    """Turns queued records into rows and writes them: the store's writer thread, or the body of the
    child process of `Store(writer="process")` (process.py), which feeds it the same queue.

    Two stages in one thread: records become rows as soon as they arrive (which keeps the queue, and
    the live objects the garbage collector walks, small), and sealed batches wait in `rows.ready`
    until they are written, one transaction each, oldest first. A flush marker waits there behind
    the batches queued before it; the stop marker is answered once runs and trajectories this
    writer saw start but not finish are marked `interrupted`.
    """

    def __init__(self, engine: Engine, batch_size: int, flush_interval: float, queue: deque, wake: threading.Event,
                 name: str):
        self.engine, self.batch_size, self.flush_interval, self.name = engine, batch_size, flush_interval, name
        self.queue, self.wake = queue, wake
        self.flushed_events = self.taken = self.batches = self.lost = 0
        self.last_commit: float | None = None
        self.error: str | None = None
        self.on_commit: Callable[[], None] | None = None
        self._rows = Rows(engine, self._write)
        self._sql = BatchWriter(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        self._unchecked = False  # commits since the last checkpoint (SQLite)
        self._thread: threading.Thread | None = None

    def __str__(self) -> str:
        return self.name

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"agentrt-store-writer:{self.engine.url.database}",
                                        daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        try:
            self._drain()
        except BaseException:
            log.exception("%s: the writer stopped; later records are not written", self)
            raise

    def _drain(self) -> None:
        queue, rows = self.queue, self._rows
        ready = rows.ready
        while True:
            taken = 0
            while queue and taken < CONVERT_AT_ONCE:
                item = queue.popleft()
                if isinstance(item, _Marker):
                    rows.seal()
                    ready.append(item)
                    continue
                taken += 1
                try:
                    rows.add(item)
                except Exception as e:
                    log.exception("%s: could not record %s for %s", self, item[0], item[1])
                    self.lost += 1
                    self.error = _describe(e)
                if rows.batch.calls >= self.batch_size:
                    rows.seal()
            self.taken += taken
            if not queue:
                rows.seal()
            if ready:
                if self._write_next():
                    return
            elif not queue:
                if self._unchecked:
                    self._checkpoint()
                self.wake.wait(self.flush_interval)
                self.wake.clear()

    def _write_next(self) -> bool:
        """Write the oldest ready batch, or answer a marker. True when a stop marker was answered."""
        item = self._rows.ready.popleft()
        if isinstance(item, _Marker):
            if item.stop:
                self._interrupt_unfinished()
            item.done(self.lost, self.error)
            return item.stop
        self._write(item)
        return False

    def _interrupt_unfinished(self) -> None:
        if self._rows.runs or self._rows.trajs:
            try:
                interrupt(self.engine, list(self._rows.runs), list(self._rows.trajs),
                          "the store was closed before it finished")
            except Exception:
                log.exception("closing %s: could not mark unfinished runs interrupted", self)

    def _write(self, b: Batch) -> None:
        """One batch, one transaction (retried while the database is locked or unreachable)."""
        self._rows.finish(b)
        blob_rows = [{"hash": h, "kind": k, "size": len(d), "data": d} for h, (k, d) in b.blobs.items()]
        for pause in (*RETRIES, None):
            try:
                with self.engine.begin() as conn:
                    self._sql.write(conn, blob_rows, b.rows, b.finished, b.links)
                break
            except OperationalError as e:  # locked, or the connection dropped: the transaction rolled back
                if pause is None:
                    return self._failed(b, e)
                log.warning("%s: writing a batch failed (%s); retrying in %.1f s", self, _describe(e), pause)
                time.sleep(pause)
            except Exception as e:
                return self._failed(b, e)
        self.flushed_events += b.calls
        self.batches += 1
        self._unchecked = self._sqlite
        self.last_commit = _now()
        if self.on_commit is not None:
            self.on_commit()

    def _checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database while there is nothing to write, rather
        than in the middle of a burst (autocheckpoints stall the commit that triggers them)."""
        self._unchecked = False
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as e:
            log.warning("%s: checkpoint failed: %s", self, _describe(e))

    def _failed(self, b: Batch, e: Exception) -> None:
        self.lost += b.calls
        self.error = _describe(e)
        log.error("%s: %d recorder calls could not be written: %s", self, b.calls, self.error)
        self._rows.forget(b)


def _describe(e: Exception) -> str:
    """The error's type and first line (SQLAlchemy's messages go on with the whole statement)."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# -- writing a batch -----------------------------------------------------------------------------------
class BatchWriter:
    """Writes one batch of rows inside an open transaction.

    On SQLite and PostgreSQL every table gets one multi-row statement (chunked under the parameter
    limit): inserts, `ON CONFLICT (id) DO UPDATE` for rows that finish (runs, trajectories) and one
    `UPDATE ... CASE` for links. Python's sqlite3 `executemany` releases the GIL once per row, and
    each time it takes it back from a busy event loop costs a thread switch interval (5 ms), so a
    per-row executemany would crawl while agents run. Other databases get SQLAlchemy executemany.
    """

    def __init__(self, engine: Engine):
        d = engine.dialect
        self.multirow = d.name in ("sqlite", "postgresql") and d.paramstyle in ("qmark", "format", "pyformat")
        self.mark = "?" if d.paramstyle == "qmark" else "%s"
        self.max_params = 30_000 if d.name == "postgresql" or _sqlite_version() >= (3, 32) else 999
        self.quote = d.identifier_preparer.quote
        self._sql: dict[tuple, str] = {}

    def write(self, conn: Connection, blob_rows: list[dict], rows: dict[str, list[dict]],
              finished: dict[str, list[dict]], links: dict[str, list[tuple[int, int]]]) -> None:
        """`rows`: new rows per table, parents first; `finished`: rows of runs/trajectories to
        overwrite (all but `started`), `links`: (id, node_id) pairs per table."""
        if not self.multirow:
            return self._write_core(conn, blob_rows, rows, finished, links)
        if blob_rows:
            self._insert(conn, blobs, blob_rows, " ON CONFLICT (hash) DO NOTHING")
        for name, table_rows in rows.items():
            if table_rows:
                self._insert(conn, metadata.tables[name], table_rows, "")
        for name, table_rows in finished.items():
            if table_rows:
                sets = ", ".join(f"{self.quote(c)} = excluded.{self.quote(c)}" for c in table_rows[0]
                                 if c not in ("id", "started"))
                self._insert(conn, metadata.tables[name], table_rows, f" ON CONFLICT (id) DO UPDATE SET {sets}")
        for name, pairs in links.items():
            for i in range(0, len(pairs), self.max_params // 3):
                chunk = pairs[i:i + self.max_params // 3]
                m = self.mark
                sql = (f"UPDATE {name} SET node_id = CASE id {' '.join([f'WHEN {m} THEN {m}'] * len(chunk))} END "
                       f"WHERE id IN ({', '.join([m] * len(chunk))})")
                conn.exec_driver_sql(sql, tuple(v for pair in chunk for v in pair) + tuple(p[0] for p in chunk))

    def _insert(self, conn: Connection, table: Table, rows: list[dict], tail: str) -> None:
        cols = list(rows[0])  # JSON columns hold JsonText already
        per = max(1, self.max_params // len(cols))
        get = itemgetter(*cols) if len(cols) > 1 else lambda row: (row[cols[0]],)
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            key = (table.name, tuple(cols), len(chunk), tail)
            sql = self._sql.get(key)
            if sql is None:
                group = "(" + ", ".join([self.mark] * len(cols)) + ")"
                sql = (f"INSERT INTO {self.quote(table.name)} ({', '.join(map(self.quote, cols))}) VALUES "
                       + ", ".join([group] * len(chunk)) + tail)
                if len(self._sql) > 2000:
                    self._sql.clear()
                self._sql[key] = sql
            params: list[Any] = []
            for row in chunk:
                params += get(row)
            conn.exec_driver_sql(sql, tuple(params))

    def _write_core(self, conn: Connection, blob_rows: list[dict], rows: dict[str, list[dict]],
                    finished: dict[str, list[dict]], links: dict[str, list[tuple[int, int]]]) -> None:
        if blob_rows:
            wanted, have = [r["hash"] for r in blob_rows], set()
            for i in range(0, len(wanted), 500):
                have.update(conn.execute(select(blobs.c.hash).where(blobs.c.hash.in_(wanted[i:i + 500]))).scalars())
            if missing := [r for r in blob_rows if r["hash"] not in have]:
                conn.execute(insert(blobs), missing)
        for name, table_rows in rows.items():
            if table_rows:
                conn.execute(insert(metadata.tables[name]), table_rows)
        for name, table_rows in finished.items():
            if table_rows:
                table, cols = metadata.tables[name], [c for c in table_rows[0] if c not in ("id", "started")]
                stmt = update(table).where(table.c.id == bindparam("b_id")).values(
                    {c: bindparam("b_" + c) for c in cols})
                conn.execute(stmt, [{"b_" + k: v for k, v in r.items()} for r in table_rows])
        for name, pairs in links.items():
            if pairs:
                table = metadata.tables[name]
                stmt = update(table).where(table.c.id == bindparam("b_id")).values(node_id=bindparam("b_node"))
                conn.execute(stmt, [{"b_id": i, "b_node": n} for i, n in pairs])


def _sqlite_version() -> tuple[int, ...]:
    import sqlite3

    return sqlite3.sqlite_version_info


def interrupt(engine: Engine, run_ids: list[str] | None, trajectory_ids: list[str] | None, why: str) -> list[str]:
    """Mark runs and trajectories still `running` (all of them, or those listed) `interrupted`, with
    an `interrupted` event per run (and per trajectory outside those runs). Returns the run ids."""
    now = _now()
    with engine.begin() as conn:
        rq = select(runs.c.id).where(runs.c.status == "running")
        tq = select(trajectories.c.id, trajectories.c.run_id).where(trajectories.c.status == "running")
        if run_ids is not None:
            rq = rq.where(runs.c.id.in_(run_ids))
        if trajectory_ids is not None:
            tq = tq.where(trajectories.c.id.in_(trajectory_ids))
        run_list = list(conn.execute(rq).scalars())
        trajs = conn.execute(tq).all()
        if trajs:
            conn.execute(update(trajectories).where(trajectories.c.id == bindparam("b_id"))
                         .values(status="interrupted", finished=now, reason="interrupted: " + why),
                         [{"b_id": t.id} for t in trajs])
        if run_list:
            conn.execute(update(runs).where(runs.c.id == bindparam("b_id")).values(status="interrupted", finished=now),
                         [{"b_id": r} for r in run_list])
        per_run = {r: 0 for r in run_list}
        loose = []
        for t in trajs:
            if t.run_id in per_run:
                per_run[t.run_id] += 1
            else:
                loose.append(t)
        rows = [{"run_id": r, "trajectory_id": None, "kind": "interrupted", "created": now,
                 "data": {"reason": why, "trajectories": n}} for r, n in per_run.items()]
        rows += [{"run_id": t.run_id, "trajectory_id": t.id, "kind": "interrupted", "created": now,
                  "data": {"reason": why}} for t in loose]
        if rows:
            conn.execute(insert(events), rows)
    return run_list
