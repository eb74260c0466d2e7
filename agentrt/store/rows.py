"""Records to rows: what the store's writer thread makes of each recorder call.

`Rows` keeps what linking needs (each trajectory's last node, the model call waiting for its
assistant message, tool calls waiting for their result messages), encodes payloads into
content-addressed blobs and fills `Batch`es of plain rows, each the rows of one transaction.
Ids of nodes, model calls and tool calls come from blocks of the `counters` row, so a row can
point at another before either is written.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from .schema import (ID_BLOCK, INLINE_TEXT, blob_hash, counters, dumps, encode_floats, encode_ints, events, jsonable,
                     model_calls, nodes, rewards, runs, to_json, tool_calls, trajectories)

log = logging.getLogger("agentrt.store")
KNOWN_BLOBS = 200_000  # hashes remembered as stored (then all are forgotten and it starts over)
KNOWN_OPTIONS = 10_000  # ChatOptions whose blob hash is remembered
INSERT_ORDER = (runs, trajectories, nodes, model_calls, tool_calls, rewards, events)  # parents first
KINDS = ("run_started", "run_finished", "trajectory_started", "message", "model_call", "tool_call", "reward", "event",
         "trajectory_finished")


class Batch:
    """The rows of one transaction, per table, plus updates of rows written by earlier batches."""

    __slots__ = ("blobs", "rows", "finished", "links", "replies", "calls", "written")

    def __init__(self) -> None:
        self.written = False
        self.blobs: dict[str, tuple[str, bytes]] = {}
        self.rows: dict[str, list[dict]] = {t.name: [] for t in INSERT_ORDER}
        self.finished: dict[str, list[dict]] = {"runs": [], "trajectories": []}  # rows of earlier batches
        self.links: dict[str, list[tuple[int, int]]] = {"model_calls": [], "tool_calls": []}  # (id, node_id)
        self.replies: list[tuple[dict, dict]] = []  # (model_calls row, reply message) until the batch is written
        self.calls = 0

    def __bool__(self) -> bool:
        return bool(self.calls or self.blobs or any(self.rows.values()) or any(self.finished.values())
                    or any(self.links.values()))


class _Traj:
    """What the writer keeps about a trajectory until it finishes."""

    __slots__ = ("run_id", "last_node", "seq", "row", "call", "tools")

    def __init__(self, run_id: str | None, last_node: int | None, seq: int, row: tuple[dict, Batch] | None):
        self.run_id, self.last_node, self.seq, self.row = run_id, last_node, seq, row
        self.call: tuple[dict, Batch, int] | None = None  # the model call waiting for its assistant message
        self.tools: dict[Any, tuple[dict, Batch, int]] = {}  # tool calls waiting for their result message


class Rows:
    """Turns queued records (tuples made by the `Store` methods) into rows. `write(batch)` is the
    store's: `commit()` calls it to write every sealed batch before a query that must see them."""

    def __init__(self, engine: Engine, write: Callable[[Batch], None]):
        self.engine, self.write = engine, write
        self.batch = Batch()
        self.ready: deque[Any] = deque()  # sealed batches, and whatever the store queues between them
        self.trajs: dict[str, _Traj] = {}  # trajectories not finished yet
        self.runs: dict[str, tuple[dict, Batch]] = {}  # runs started here and not finished, in start order
        self._known_runs: set[str] = set()
        self._known_blobs: set[str] = set()
        self._option_blobs: dict[tuple, str] = {}
        self._tool_blobs: dict[int, tuple[list, str]] = {}  # id(list) -> (the list, kept alive; its blob)
        self._next_id = self._id_end = 0
        self._handlers = {kind: getattr(self, "_on_" + kind) for kind in KINDS}

    def add(self, item: tuple) -> None:
        """One recorder call's rows into the batch being built."""
        self._handlers[item[0]](*item[1:])
        self.batch.calls += 1

    def seal(self) -> None:
        """Close the batch being built; it joins those waiting to be written."""
        if self.batch:
            self.ready.append(self.batch)
            self.batch = Batch()

    def commit(self) -> None:
        """Write every sealed batch now (what comes between them stays queued, in order)."""
        self.seal()
        others = []
        while self.ready:
            item = self.ready.popleft()
            if isinstance(item, Batch):
                self.write(item)
            else:
                others.append(item)
        self.ready.extend(others)

    def finish(self, b: Batch) -> None:
        """Last touches before `b` is written: replies no node holds are kept with their calls."""
        for row, reply in b.replies:
            if row["node_id"] is None:  # into this batch even if known: a later batch may hold it (ON CONFLICT)
                data = dumps(reply).encode("utf-8", "surrogatepass")
                row["reply"] = h = blob_hash("json", data)
                b.blobs[h] = ("json", data)
                self._known_blobs.add(h)
        b.written = True  # from here on, links and finishes for its rows go to later batches

    def forget(self, b: Batch) -> None:
        """`b` could not be written: its blobs are not stored after all."""
        self._known_blobs.difference_update(b.blobs)

    # -- one handler per record kind -------------------------------------------------------------------
    def _on_run_started(self, run_id: str, at: float, meta: dict) -> None:
        if run_id not in self._known_runs:
            self._add_run(run_id, at, meta)
        self._add_event(run_id, None, "run_started", {}, at)

    def _on_run_finished(self, run_id: str, at: float, status: str, summary: dict) -> None:
        self._need_run(run_id, at)
        values = {"finished": at, "status": _text(status), "summary": to_json(summary)}
        entry = self.runs.pop(run_id, None)
        if entry is not None and not entry[1].written:
            entry[0].update(values)
        else:  # "started" only satisfies NOT NULL: an existing row keeps its own
            self.batch.finished["runs"].append({"id": run_id, "started": at, **values})
        self._add_event(run_id, None, "run_finished", {"status": status}, at)

    def _on_trajectory_started(self, tid: str, at: float, run_id: str | None, agent: str, meta: dict) -> None:
        self._need_run(run_id, at)
        data: dict[str, Any] = {"agent": agent}
        if tid in self.trajs:
            log.warning("trajectory %s started twice; the second start is kept as an event only", tid)
            data["duplicate"] = True
            return self._add_event(run_id, tid, "trajectory_started", data, at)
        parent_node, parent_trajectory = meta.get("parent_node"), None
        if parent_node is not None:
            self.commit()  # the parent node may be among the rows not yet written
            parent_trajectory = self._node_owner(parent_node)
            if parent_trajectory is None:
                data["fork_error"] = (f"parent_node {parent_node!r} is not a node of this store; "
                                      "the trajectory starts a new tree")
                log.warning("trajectory %s: %s", tid, data["fork_error"])
                parent_node = None
            else:
                parent_node = int(parent_node)
        row = {"id": tid, "run_id": run_id, "agent": _text(agent), "task": _task(meta.pop("task", None)),
               "status": "running", "reason": None, "error": None, "output": None, "started": at, "finished": None,
               "spent": None, "reward": None, "parent_trajectory_id": parent_trajectory, "fork_node_id": parent_node,
               "meta": to_json(meta)}
        self.batch.rows["trajectories"].append(row)
        self.trajs[tid] = _Traj(run_id, parent_node, 0, (row, self.batch))
        self._add_event(run_id, tid, "trajectory_started", data, at)

    def _on_message(self, tid: str, at: float, message: dict) -> None:
        st = self._traj(tid, at)
        node_id, role = self._id(), str(message.get("role", "?"))
        content = message.get("content")
        if isinstance(content, str) and len(content) >= INLINE_TEXT:  # its own blob: shared with tool results
            content_hash = self._text_blob(content)
            message["content"] = None
        else:
            content_hash = None
        self.batch.rows["nodes"].append({
            "id": node_id, "trajectory_id": tid, "parent_id": st.last_node, "seq": st.seq, "role": _text(role),
            "message": self._json_blob(message), "content": content_hash,
            "created": at})
        st.last_node, st.seq = node_id, st.seq + 1
        if role == "assistant" and st.call is not None:
            self._link("model_calls", st.call, node_id)
        st.call = None
        if role == "tool" and st.tools:
            waiting = st.tools.pop(message.get("tool_call_id"), None)
            if waiting is not None:
                self._link("tool_calls", waiting, node_id)

    def _on_model_call(self, tid: str, at: float, reply: dict, finish_reason: str, prompt_tokens: int,
                       cached_tokens: int, thinking_tokens: int, output_tokens: int, prompt_ids: tuple[int, ...],
                       token_ids: tuple[int, ...], logprobs: tuple[float, ...], seconds: float, meta: dict) -> None:
        st = self._traj(tid, at)
        options = self._options(meta.pop("options", None))
        if meta.get("tools"):  # the schemas offered: one blob, shared by every call that offered them
            meta["tools"] = {"blob": self._tools_blob(meta["tools"])}
        row = {"id": self._id(), "trajectory_id": tid, "node_id": None, "reply": None,
               "prompt_ids": self._array(encode_ints, prompt_ids), "token_ids": self._array(encode_ints, token_ids),
               "logprobs": self._array(encode_floats, logprobs), "finish_reason": finish_reason,
               "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens, "thinking_tokens": thinking_tokens,
               "output_tokens": output_tokens, "seconds": seconds, "options": options, "meta": to_json(meta or None),
               "created": at}
        self.batch.rows["model_calls"].append(row)
        self.batch.replies.append((row, reply))
        st.call, st.tools = (row, self.batch, row["id"]), {}

    def _on_tool_call(self, tid: str, at: float, call_id: Any, name: Any, arguments: Any, ok: bool, error: Any,
                      content: Any, seconds: Any) -> None:
        st = self._traj(tid, at)
        content_hash = self._text_blob(content) if isinstance(content, str) else self._json_blob(content)
        row = {"id": self._id(), "trajectory_id": tid, "call_id": _text(call_id), "name": _text(name),
               "arguments": to_json(arguments), "ok": bool(ok), "error": _text(error), "content": content_hash,
               "seconds": seconds, "node_id": None, "created": at}
        self.batch.rows["tool_calls"].append(row)
        st.tools[call_id] = (row, self.batch, row["id"])

    def _on_reward(self, tid: str, at: float, name: str, value: float, info: dict | None) -> None:
        self._traj(tid, at)
        self.batch.rows["rewards"].append({"trajectory_id": tid, "name": _text(name), "value": value,
                                           "info": to_json(info), "created": at})

    def _on_event(self, tid: str | None, at: float, kind: str, data: dict) -> None:
        run_id = self._traj(tid, at).run_id if tid is not None else next(reversed(self.runs), None)
        self._add_event(run_id, tid, kind, data, at)

    def _on_trajectory_finished(self, tid: str, at: float, agent: str, task: Any, status: str, reason: str | None,
                                error: str | None, spent: dict, reward: float, output: Any) -> None:
        st = self._traj(tid, at)
        values = {"agent": _text(agent), "task": _task(task), "status": _text(status), "reason": _text(reason),
                  "error": _text(error), "output": to_json(output), "finished": at, "spent": to_json(spent),
                  "reward": reward}
        if st.row is not None and not st.row[1].written:
            st.row[0].update(values)
        else:  # "started" only satisfies NOT NULL: an existing row keeps its own
            self.batch.finished["trajectories"].append({"id": tid, "started": at, **values})
        self._add_event(st.run_id, tid, "trajectory_finished", {"status": status, "reason": reason}, at)
        del self.trajs[tid]

    # -- helpers ---------------------------------------------------------------------------------------
    def _traj(self, tid: str, at: float) -> _Traj:
        st = self.trajs.get(tid)
        return st if st is not None else self._adopt(tid, at)

    def _adopt(self, tid: str, at: float) -> _Traj:
        """A record for a trajectory that was not started here: continue it if the database has it
        (a later session), else make it a row of the latest open run, its agent unknown ("?")."""
        self.commit()
        with self.engine.connect() as c:
            found = c.execute(select(trajectories.c.run_id, trajectories.c.fork_node_id)
                              .where(trajectories.c.id == tid)).first()
            last = c.execute(select(nodes.c.id, nodes.c.seq).where(nodes.c.trajectory_id == tid)
                             .order_by(nodes.c.seq.desc()).limit(1)).first()
        if found is not None:
            st = _Traj(found.run_id, last.id if last else found.fork_node_id, last.seq + 1 if last else 0, None)
        else:
            run_id = next(reversed(self.runs), None)
            row = {"id": tid, "run_id": run_id, "agent": "?", "task": None, "status": "running", "reason": None,
                   "error": None, "output": None, "started": at, "finished": None, "spent": None, "reward": None,
                   "parent_trajectory_id": None, "fork_node_id": None, "meta": None}
            self.batch.rows["trajectories"].append(row)
            st = _Traj(run_id, None, 0, (row, self.batch))
        self.trajs[tid] = st
        return st

    def _add_run(self, run_id: str, at: float, meta: dict | None) -> None:
        row = {"id": run_id, "started": at, "finished": None, "status": "running", "meta": to_json(meta),
               "summary": None}
        self.batch.rows["runs"].append(row)
        self.runs[run_id] = (row, self.batch)
        self._known_runs.add(run_id)

    def _need_run(self, run_id: str | None, at: float) -> None:
        """Make sure a run row exists for `run_id` (one this store did not see start)."""
        if run_id is None or run_id in self._known_runs:
            return
        self.commit()
        with self.engine.connect() as c:
            exists = c.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is not None
        if exists:
            self._known_runs.add(run_id)
        else:
            self._add_run(run_id, at, None)

    def _node_owner(self, node_id: Any) -> str | None:
        try:
            node_id = int(node_id)
        except (TypeError, ValueError):
            return None
        with self.engine.connect() as c:
            return c.execute(select(nodes.c.trajectory_id).where(nodes.c.id == node_id)).scalar()

    def _add_event(self, run_id: str | None, tid: str | None, kind: str, data: Any, at: float) -> None:
        self.batch.rows["events"].append({"run_id": run_id, "trajectory_id": tid, "kind": _text(kind),
                                          "data": to_json(data), "created": at})

    def _link(self, table: str, waiting: tuple[dict, Batch, int], node_id: int) -> None:
        row, batch, row_id = waiting
        if batch is self.batch:  # a batch written earlier than this one cannot point at its node
            row["node_id"] = node_id
        else:
            self.batch.links[table].append((row_id, node_id))

    def _blob(self, kind: str, data: bytes) -> str:
        """The hash of a blob; its data joins the batch being built unless an earlier one has it."""
        h = blob_hash(kind, data)
        if h not in self._known_blobs:
            if len(self._known_blobs) > KNOWN_BLOBS:
                self._known_blobs.clear()
            self._known_blobs.add(h)
            self.batch.blobs[h] = (kind, data)
        return h

    def _options(self, options: Any) -> str | None:
        """The blob of a ChatOptions; a trajectory's calls repeat theirs, so encodings are remembered."""
        if options is None:
            return None
        try:
            key = (type(options), *(tuple(v) if isinstance(v, list) else v for v in
                                    (getattr(options, f) for f in options.__dataclass_fields__)))
            found = self._option_blobs.get(key)
        except (AttributeError, TypeError):  # not a dataclass (a dict from a writer process), or unhashable values
            return self._json_blob(options if isinstance(options, dict) else jsonable(options))
        if found is None:
            if len(self._option_blobs) > KNOWN_OPTIONS:
                self._option_blobs.clear()
            found = self._option_blobs[key] = self._json_blob(jsonable(options))
        elif found not in self._known_blobs:  # forgotten since: store it again
            found = self._json_blob(jsonable(options))
        return found

    def _text_blob(self, text: str) -> str:
        return self._blob("text", text.encode("utf-8", "surrogatepass"))

    def _tools_blob(self, tools: list) -> str:
        """The blob of a tool-schema list; a trajectory passes the same list object every call."""
        key = id(tools)
        found = self._tool_blobs.get(key)
        if found is None or found[0] is not tools or found[1] not in self._known_blobs:
            if len(self._tool_blobs) > KNOWN_OPTIONS:
                self._tool_blobs.clear()
            found = self._tool_blobs[key] = (tools, self._json_blob(tools))
        return found[1]

    def _json_blob(self, value: Any) -> str:
        return self._blob("json", dumps(value).encode("utf-8", "surrogatepass"))

    def _array(self, encode: Any, values: list) -> str | None:
        return self._blob(*encode(values)) if values else None

    def _id(self) -> int:
        """The next id for a node, model call or tool call, from blocks taken from `counters`."""
        if self._next_id == self._id_end:
            with self.engine.begin() as conn:
                conn.execute(update(counters).where(counters.c.name == "ids").values(next=counters.c.next + ID_BLOCK))
                end = conn.execute(select(counters.c.next).where(counters.c.name == "ids")).scalar_one()
            self._next_id, self._id_end = end - ID_BLOCK, end
        self._next_id += 1
        return self._next_id - 1


def _text(value: Any) -> str | None:
    """Text for a column: None stays None; NUL characters (PostgreSQL refuses them) become U+FFFD."""
    if value is None:
        return None
    value = value if isinstance(value, str) else str(value)
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _task(task: Any) -> str | None:
    if task is None or isinstance(task, str):
        return _text(task)
    return _text(dumps(task))
