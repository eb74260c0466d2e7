"""Reading a trajectory store: runs, trajectories, the message tree, calls, rewards and events.

`StoreReader(url)` opens a store read-only and may run in another process while a `Store` writes
(SQLite in WAL mode lets readers and the writer proceed together). `Store` has the same methods,
reading through its own engine. Every method returns small frozen dataclasses; message, JSON and
array payloads come back decoded (see docs/store.md).

>>> reader = StoreReader("runs.db")                         # doctest: +SKIP
>>> for t in reader.trajectories():                          # doctest: +SKIP
...     print(t.agent, t.status, [n.role for n in reader.messages(t.id)])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import func, literal, select
from sqlalchemy.engine import Connection, Row

from .schema import (RECORDED, STORE_EVENTS, StoreError, blobs, database_url, decode_blob, events, make_engine,
                     metadata, model_calls, nodes, prepare, rewards, runs, sqlite_path, tool_calls, trajectories)

IN_CHUNK = 500  # values per IN (...) list: well under every database's parameter limit


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One `Runtime.run`: status is running, finished (or what run_finished said) or interrupted."""

    id: str
    started: float
    finished: float | None
    status: str
    meta: dict | None
    summary: dict | None


@dataclass(frozen=True, slots=True)
class TrajectoryRecord:
    """One agent episode. `status`: running, interrupted or the `AgentResult.status`; `task` as text;
    `spent`: `Spent.as_dict()`; `reward`: the sum of its rewards; a fork has `parent_trajectory_id`
    and `fork_node_id` (the node its first message hangs under)."""

    id: str
    run_id: str | None
    agent: str
    task: str | None
    status: str
    reason: str | None
    error: str | None
    output: Any
    started: float
    finished: float | None
    spent: dict | None
    reward: float | None
    parent_trajectory_id: str | None
    fork_node_id: int | None
    meta: dict | None


@dataclass(frozen=True, slots=True)
class Node:
    """A message in the tree: `parent_id` is None for a root; `seq` orders its trajectory's nodes."""

    id: int
    trajectory_id: str
    parent_id: int | None
    seq: int
    role: str
    message: dict
    created: float


@dataclass(frozen=True, slots=True)
class ModelCallRecord:
    """One model call: the exact token ids and logprobs, and `reply`, the assistant message it
    produced (the message of `node_id` when one was recorded right after the call). `options`:
    the ChatOptions as a dict; `meta`: the rest of what the runtime passed (e.g. `{"turn": 3}`)."""

    id: int
    trajectory_id: str
    node_id: int | None
    reply: dict | None
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    thinking_tokens: int
    output_tokens: int
    seconds: float | None
    options: dict | None
    meta: dict | None
    created: float


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One tool call: `content` is what the model was shown; `error` the ToolResult's error kind;
    `node_id` the tool message that carried the result, when one was recorded."""

    id: int
    trajectory_id: str
    call_id: str | None
    name: str | None
    arguments: Any
    ok: bool
    error: str | None
    content: Any
    seconds: float | None
    node_id: int | None
    created: float


@dataclass(frozen=True, slots=True)
class RewardRecord:
    id: int
    trajectory_id: str
    name: str
    value: float | None
    info: dict | None
    created: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A lifecycle or runtime event; `trajectory_id` is None for run-level events."""

    id: int
    run_id: str | None
    trajectory_id: str | None
    kind: str
    data: Any
    created: float


class StoreReader:
    """Read-only access to a store (a path, a `sqlite:///` URL or any SQLAlchemy URL).

    >>> with StoreReader("runs.db") as reader:                   # doctest: +SKIP
    ...     [run] = reader.runs()
    ...     paths = reader.branches(reader.messages(reader.trajectories(run.id)[0].id)[0].id)
    """

    def __init__(self, url: str | Path):
        self._open(url, readonly=True)

    def _open(self, url: str | Path, *, readonly: bool) -> None:
        self.url = database_url(url)
        path = sqlite_path(self.url)
        if readonly and path is not None and not path.exists():
            raise StoreError(f"no agentrt store at {path}: the file does not exist")
        self.engine = make_engine(self.url, readonly=readonly)
        try:
            self.created = prepare(self.engine, create=not readonly)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.engine.url.render_as_string(hide_password=True)!r})"

    # -- runs and trajectories -------------------------------------------------------------------------
    def runs(self) -> list[RunRecord]:
        """Every run, oldest first."""
        return [RunRecord(**r._mapping) for r in self._all(select(runs).order_by(runs.c.started, runs.c.id))]

    def run(self, run_id: str) -> RunRecord:
        rows = self._all(select(runs).where(runs.c.id == run_id))
        if not rows:
            raise KeyError(f"no run {run_id!r} in {self}")
        return RunRecord(**rows[0]._mapping)

    def _trajectory_query(self):
        """Trajectories with `reward` summed from the rewards table, so rewards a world records
        after the agent finished (multi-agent worlds score at the end) count too."""
        total = (select(func.coalesce(func.sum(rewards.c.value), 0.0))
                 .where(rewards.c.trajectory_id == trajectories.c.id).scalar_subquery())
        cols = [c for c in trajectories.c if c.name != "reward"]
        return select(*cols, total.label("reward"))

    def trajectories(self, run_id: str | None = None) -> list[TrajectoryRecord]:
        """The trajectories of one run (of all runs when None), in the order they started."""
        q = self._trajectory_query().order_by(trajectories.c.started, trajectories.c.id)
        if run_id is not None:
            q = q.where(trajectories.c.run_id == run_id)
        return [TrajectoryRecord(**r._mapping) for r in self._all(q)]

    def trajectory(self, trajectory_id: str) -> TrajectoryRecord:
        rows = self._all(self._trajectory_query().where(trajectories.c.id == trajectory_id))
        if not rows:
            raise KeyError(f"no trajectory {trajectory_id!r} in {self}")
        return TrajectoryRecord(**rows[0]._mapping)

    # -- the message tree ------------------------------------------------------------------------------
    def messages(self, trajectory_id: str) -> list[Node]:
        """The conversation of a trajectory: the path from its root to its last node, a fork's
        shared prefix included. `[n.message for n in ...]` equals `AgentResult.messages`."""
        with self.engine.connect() as c:
            fork = c.execute(select(trajectories.c.fork_node_id).where(trajectories.c.id == trajectory_id)).first()
            if fork is None:
                raise KeyError(f"no trajectory {trajectory_id!r} in {self}")
            last = c.execute(select(nodes.c.id).where(nodes.c.trajectory_id == trajectory_id)
                             .order_by(nodes.c.seq.desc()).limit(1)).scalar()
            last = fork.fork_node_id if last is None else last
            return [] if last is None else self._path(c, last)

    def node(self, node_id: int) -> Node:
        with self.engine.connect() as c:
            found = self._nodes(c, c.execute(select(nodes).where(nodes.c.id == node_id)).all())
        if not found:
            raise KeyError(f"no node {node_id} in {self}")
        return found[0]

    def children(self, node_id: int) -> list[Node]:
        """The nodes whose parent is `node_id` (the branches that continue from it), oldest first."""
        with self.engine.connect() as c:
            return self._nodes(c, c.execute(select(nodes).where(nodes.c.parent_id == node_id)
                                            .order_by(nodes.c.id)).all())

    def branches(self, root_node_id: int) -> list[list[Node]]:
        """Every root-to-leaf path of the tree through `root_node_id` (normally a root): one list of
        nodes per leaf below it, each starting at the tree's root, in the order the leaves were made."""
        with self.engine.connect() as c:
            prefix = self._path(c, root_node_id)
            if not prefix:
                raise KeyError(f"no node {root_node_id} in {self}")
            down = select(nodes.c.id).where(nodes.c.parent_id == root_node_id).cte("down", recursive=True)
            n = nodes.alias("n")
            down = down.union_all(select(n.c.id).where(n.c.parent_id == down.c.id))
            below = self._nodes(c, c.execute(select(nodes).join(down, nodes.c.id == down.c.id)
                                             .order_by(nodes.c.id)).all())
        kids: dict[int, list[Node]] = {}
        for node in below:
            kids.setdefault(node.parent_id, []).append(node)
        paths, stack = [], [prefix]
        while stack:
            path = stack.pop()
            nxt = kids.get(path[-1].id)
            if not nxt:
                paths.append(path)
            else:
                stack.extend(path + [k] for k in reversed(nxt))
        return sorted(paths, key=lambda p: p[-1].id)

    # -- calls, rewards, events ------------------------------------------------------------------------
    def model_calls(self, trajectory_id: str) -> list[ModelCallRecord]:
        q = (select(model_calls, nodes.c.message.label("node_message"), nodes.c.content.label("node_content"))
             .select_from(model_calls.outerjoin(nodes, nodes.c.id == model_calls.c.node_id))
             .where(model_calls.c.trajectory_id == trajectory_id).order_by(model_calls.c.id))
        with self.engine.connect() as c:
            rows = c.execute(q).all()
            raw = self._blobs(c, [(r.reply, r.prompt_ids, r.token_ids, r.logprobs, r.options, r.node_message,
                                   r.node_content, _tools_ref(r.meta)) for r in rows])
        out = []
        for r in rows:
            m = dict(r._mapping)
            reply = (_message(raw, m.pop("node_message"), m.pop("node_content")) if r.node_id is not None
                     else _decode(raw, r.reply))
            if (ref := _tools_ref(m["meta"])) is not None:
                m["meta"] = {**m["meta"], "tools": _decode(raw, ref)}  # the schemas offered to the model
            m.update(reply=reply, options=_decode(raw, r.options), prompt_ids=_decode(raw, r.prompt_ids) or [],
                     token_ids=_decode(raw, r.token_ids) or [], logprobs=_decode(raw, r.logprobs) or [])
            m.pop("node_message", None), m.pop("node_content", None)
            out.append(ModelCallRecord(**m))
        return out

    def tool_calls(self, trajectory_id: str) -> list[ToolCallRecord]:
        q = select(tool_calls).where(tool_calls.c.trajectory_id == trajectory_id).order_by(tool_calls.c.id)
        with self.engine.connect() as c:
            rows = c.execute(q).all()
            raw = self._blobs(c, ((r.content,) for r in rows))
        return [ToolCallRecord(**{**r._mapping, "content": _decode(raw, r.content)}) for r in rows]

    def rewards(self, trajectory_id: str) -> list[RewardRecord]:
        q = select(rewards).where(rewards.c.trajectory_id == trajectory_id).order_by(rewards.c.id)
        return [RewardRecord(**r._mapping) for r in self._all(q)]

    def events(self, trajectory_id: str | None = None, run_id: str | None = None) -> list[EventRecord]:
        """Events of a trajectory, of a run (its own and its trajectories'), or all, in order."""
        q = select(events).order_by(events.c.id)
        if trajectory_id is not None:
            q = q.where(events.c.trajectory_id == trajectory_id)
        if run_id is not None:
            q = q.where(events.c.run_id == run_id)
        return [EventRecord(**r._mapping) for r in self._all(q)]

    # -- sizes -----------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self.engine.connect() as c:
            return {name: c.execute(select(func.count()).select_from(t)).scalar_one()
                    for name, t in metadata.tables.items()}

    def recorded(self) -> int:
        """Rows made by recorder calls, one per call (every session that wrote this store): what
        `Store.flushed_events` counts. Events the store writes itself (`interrupted`) are left out."""
        with self.engine.connect() as c:
            total = sum(c.execute(select(func.count()).select_from(metadata.tables[name])).scalar_one()
                        for name in RECORDED)
            own = c.execute(select(func.count()).select_from(events)
                            .where(events.c.kind.in_(STORE_EVENTS))).scalar_one()
        return total - own

    # -- helpers ---------------------------------------------------------------------------------------
    def _all(self, query: Any) -> list[Row]:
        with self.engine.connect() as c:
            return c.execute(query).all()

    def _path(self, c: Connection, node_id: int) -> list[Node]:
        """The nodes from the root down to `node_id`."""
        up = select(nodes.c.id, nodes.c.parent_id, literal(0).label("depth")).where(nodes.c.id == node_id)
        up = up.cte("up", recursive=True)
        n = nodes.alias("n")
        up = up.union_all(select(n.c.id, n.c.parent_id, (up.c.depth + 1).label("depth"))
                          .where(n.c.id == up.c.parent_id))
        rows = c.execute(select(nodes).join(up, nodes.c.id == up.c.id).order_by(up.c.depth.desc())).all()
        return self._nodes(c, rows)

    def _nodes(self, c: Connection, rows: list[Row]) -> list[Node]:
        raw = self._blobs(c, ((r.message, r.content) for r in rows))
        return [Node(r.id, r.trajectory_id, r.parent_id, r.seq, r.role, _message(raw, r.message, r.content), r.created)
                for r in rows]

    def _blobs(self, c: Connection, groups: Iterable[tuple[str | None, ...]]) -> dict[str, tuple[str, bytes]]:
        wanted = list({h for g in groups for h in g if h is not None})
        out: dict[str, tuple[str, bytes]] = {}
        for i in range(0, len(wanted), IN_CHUNK):
            q = select(blobs.c.hash, blobs.c.kind, blobs.c.data).where(blobs.c.hash.in_(wanted[i:i + IN_CHUNK]))
            out.update((h, (kind, data)) for h, kind, data in c.execute(q))
        return out


def _tools_ref(meta: Any) -> str | None:
    tools = meta.get("tools") if isinstance(meta, dict) else None
    return tools.get("blob") if isinstance(tools, dict) else None


def _decode(raw: dict[str, tuple[str, bytes]], h: str | None) -> Any:
    return None if h is None else decode_blob(*raw[h])


def _message(raw: dict[str, tuple[str, bytes]], message: str | None, content: str | None) -> dict | None:
    """A node's message: its JSON, with "content" put back from its text blob."""
    if message is None:
        return None
    msg = _decode(raw, message)
    if content is not None:
        msg["content"] = _decode(raw, content)
    return msg
