"""The trajectory store's tables (SQLAlchemy Core), its blob encoding, and opening a database.

Every table is described in docs/store.md. Ids of nodes, model calls and tool calls are made by
the writer (so it can link rows before they are written), from a counter row in `counters` that it
advances a block at a time; rewards and events use the database's own autoincrement.

Blobs are content-addressed: `hash` is the sha256 hex digest of `<kind>:` followed by the data, so
a payload recorded many times is stored once. Kinds: `json` (UTF-8 JSON), `text` (UTF-8), `i32` /
`i64` (little-endian signed integers), `f32` / `f64` (little-endian IEEE floats).
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from hashlib import sha256
from pathlib import Path
from typing import Any

from pydantic_core import to_json as _to_json

from sqlalchemy import (JSON, BigInteger, Boolean, Column, Double, ForeignKey, Index, Integer, LargeBinary, MetaData,
                        String, Table, Text, create_engine, event, insert, inspect, select)
from sqlalchemy.engine import Engine, make_url

SCHEMA_VERSION = 1
INLINE_TEXT = 128  # shorter message contents stay in the message's JSON; longer ones get a text blob
ID_BLOCK = 4096  # ids a writer takes from `counters` at a time
WAL_AUTOCHECKPOINT = 16384  # pages (64 MiB at 4 KiB): a backstop; the writer checkpoints whenever it is idle

metadata = MetaData()
Id = BigInteger().with_variant(Integer, "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid: no second index
Json = JSON(none_as_null=True)
Hash = String(64)

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
counters = Table(
    "counters", metadata,
    Column("name", String(32), primary_key=True),
    Column("next", BigInteger, nullable=False),
)
blobs = Table(
    "blobs", metadata,
    Column("hash", Hash, primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("size", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)
runs = Table(
    "runs", metadata,
    Column("id", String(64), primary_key=True),
    Column("started", Double, nullable=False),
    Column("finished", Double),
    Column("status", String(16), nullable=False),  # running, finished (or what run_finished said), interrupted
    Column("meta", Json),
    Column("summary", Json),
)
trajectories = Table(
    "trajectories", metadata,
    Column("id", String(64), primary_key=True),
    Column("run_id", String(64), ForeignKey("runs.id")),
    Column("agent", Text, nullable=False),
    Column("task", Text),
    Column("status", String(16), nullable=False),  # running, interrupted, or AgentResult.status
    Column("reason", Text),
    Column("error", Text),
    Column("output", Json),
    Column("started", Double, nullable=False),
    Column("finished", Double),
    Column("spent", Json),
    Column("reward", Double),
    Column("parent_trajectory_id", String(64), ForeignKey("trajectories.id")),
    Column("fork_node_id", Id),  # a node id (no foreign key: nodes refer to trajectories)
    Column("meta", Json),
    Index("trajectories_run", "run_id"),
)
nodes = Table(
    "nodes", metadata,
    Column("id", Id, primary_key=True, autoincrement=False),
    Column("trajectory_id", String(64), ForeignKey("trajectories.id"), nullable=False),
    Column("parent_id", Id, ForeignKey("nodes.id")),
    Column("seq", Integer, nullable=False),
    Column("role", String(32), nullable=False),
    Column("message", Hash, ForeignKey("blobs.hash"), nullable=False),  # the message, "content" set to null
    Column("content", Hash, ForeignKey("blobs.hash")),  # string content of INLINE_TEXT bytes or more (text blob)
    Column("created", Double, nullable=False),
    Index("nodes_trajectory", "trajectory_id", "seq"),
    Index("nodes_parent", "parent_id"),
)
model_calls = Table(
    "model_calls", metadata,
    Column("id", Id, primary_key=True, autoincrement=False),
    Column("trajectory_id", String(64), ForeignKey("trajectories.id"), nullable=False),
    Column("node_id", Id, ForeignKey("nodes.id")),
    Column("reply", Hash, ForeignKey("blobs.hash")),  # the reply as a message, only when no node holds it
    Column("prompt_ids", Hash, ForeignKey("blobs.hash")),
    Column("token_ids", Hash, ForeignKey("blobs.hash")),
    Column("logprobs", Hash, ForeignKey("blobs.hash")),
    Column("finish_reason", String(32)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("thinking_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("seconds", Double),
    Column("options", Hash, ForeignKey("blobs.hash")),  # the ChatOptions (json blob: shared by a trajectory's calls)
    Column("meta", Json),  # the rest of what the runtime passed, e.g. {"turn": 3}
    Column("created", Double, nullable=False),
    Index("model_calls_trajectory", "trajectory_id"),
)
tool_calls = Table(
    "tool_calls", metadata,
    Column("id", Id, primary_key=True, autoincrement=False),
    Column("trajectory_id", String(64), ForeignKey("trajectories.id"), nullable=False),
    Column("call_id", Text),
    Column("name", Text),
    Column("arguments", Json),
    Column("ok", Boolean, nullable=False),
    Column("error", String(32)),
    Column("content", Hash, ForeignKey("blobs.hash")),
    Column("seconds", Double),
    Column("node_id", Id, ForeignKey("nodes.id")),
    Column("created", Double, nullable=False),
    Index("tool_calls_trajectory", "trajectory_id"),
)
rewards = Table(
    "rewards", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("trajectory_id", String(64), ForeignKey("trajectories.id"), nullable=False),
    Column("name", Text, nullable=False),
    Column("value", Double),
    Column("info", Json),
    Column("created", Double, nullable=False),
    Index("rewards_trajectory", "trajectory_id"),
)
events = Table(
    "events", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id")),
    Column("trajectory_id", String(64), ForeignKey("trajectories.id")),  # NULL: a run-level event
    Column("kind", String(64), nullable=False),
    Column("data", Json),
    Column("created", Double, nullable=False),
    Index("events_trajectory", "trajectory_id"),
    Index("events_run", "run_id"),
)

# Tables whose rows recorder calls make, one row per call (see Store.flushed_events); events the
# store writes itself have these kinds and are not counted.
RECORDED = ("nodes", "model_calls", "tool_calls", "rewards", "events")
STORE_EVENTS = ("interrupted",)


class StoreError(Exception):
    """The store could not be opened or written."""


class StoreVersionError(StoreError):
    """The database holds another schema version than this code reads, or is not a store."""


# -- blobs ---------------------------------------------------------------------------------------------
_SWAP = sys.byteorder != "little"


def blob_hash(kind: str, data: bytes) -> str:
    return sha256(kind.encode() + b":" + data).hexdigest()


def encode_ints(values: list[int]) -> tuple[str, bytes]:
    try:
        a, kind = array("i", values), "i32"
    except OverflowError:
        a, kind = array("q", values), "i64"
    if _SWAP:
        a.byteswap()
    return kind, a.tobytes()


def encode_floats(values: list[float]) -> tuple[str, bytes]:
    """fp32 when every value is one exactly (what an engine's logprobs are), else fp64: both exact."""
    a, kind = array("d", values), "f64"
    if not any(v != v for v in values):  # NaN payloads may change in a cast; keep those as doubles
        try:
            narrow = array("f", values)
            if narrow.tolist() == a.tolist():
                a, kind = narrow, "f32"
        except OverflowError:
            pass
    if _SWAP:
        a.byteswap()
    return kind, a.tobytes()


_ARRAYS = {"i32": "i", "i64": "q", "f32": "f", "f64": "d"}


def decode_blob(kind: str, data: bytes) -> Any:
    if kind == "json":
        return json.loads(bytes(data).decode("utf-8", "surrogatepass"))
    if kind == "text":
        return bytes(data).decode("utf-8", "surrogatepass")
    a = array(_ARRAYS[kind])
    a.frombytes(data)
    if _SWAP:
        a.byteswap()
    return a.tolist()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf": PostgreSQL's json type refuses NaN and Infinity
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    """Dataclasses, pydantic models, sets and other objects as JSON values (str as a last resort)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=jsonable)
_NON_FINITE = (b"NaN", b"Infinity")


def dumps(value: Any) -> str:
    """Compact JSON; non-finite floats become strings (PostgreSQL's json type refuses NaN and Infinity).

    pydantic-core's encoder (Rust, about 5x faster than the standard library's, which matters on
    the writer thread: it shares the GIL with the event loop) takes what it can: plain values,
    dataclasses, pydantic models, sets (in iteration order). Lone surrogates and non-finite floats
    take the standard library's path.
    """
    try:
        out = _to_json(value, fallback=jsonable, inf_nan_mode="constants")
    except Exception:  # a lone surrogate, a key it cannot write: the careful path
        out = None
    if out is not None and not any(bad in out for bad in _NON_FINITE):
        return out.decode("utf-8")
    try:
        return _ENCODER.encode(value)
    except ValueError:
        return _ENCODER.encode(_finite(json.loads(json.dumps(value, default=jsonable))))


class JsonText(str):
    """JSON the writer has already encoded; the engine's serializer passes it through."""

    __slots__ = ()


def to_json(value: Any) -> JsonText | None:
    return None if value is None else JsonText(dumps(value))


def _serialize(value: Any) -> str:
    return value if isinstance(value, JsonText) else dumps(value)


# -- opening -------------------------------------------------------------------------------------------
def database_url(url: str | Path) -> str:
    """A path (or a str without "://") is a SQLite file; anything else is a SQLAlchemy URL."""
    text = str(url)
    if isinstance(url, Path) or "://" not in text:
        return "sqlite:///" + str(Path(text).expanduser().resolve())
    return text


def sqlite_path(url: str) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return Path(u.database)


def make_engine(url: str, *, readonly: bool) -> Engine:
    """An engine for `url`: SQLite in WAL mode with foreign keys on, or any other database as is."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        engine = create_engine(url, json_serializer=_serialize, pool_pre_ping=True, hide_parameters=True)
        if readonly and u.get_backend_name() == "postgresql":
            @event.listens_for(engine, "connect")
            def _readonly(dbapi_conn: Any, record: Any) -> None:
                with dbapi_conn.cursor() as cur:
                    cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                dbapi_conn.commit()
        return engine

    path = sqlite_path(url)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if path is None:  # in memory: one connection shared by the writer and the readers
        from sqlalchemy.pool import StaticPool

        kwargs["poolclass"] = StaticPool
    elif not path.parent.is_dir():
        raise StoreError(f"cannot create the store {path}: the folder {path.parent} does not exist; create it first")
    engine = create_engine(url, json_serializer=_serialize, hide_parameters=True, **kwargs)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        if readonly:
            cur.execute("PRAGMA query_only=ON")
        else:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
        cur.close()

    return engine


def prepare(engine: Engine, *, create: bool) -> bool:
    """Check the schema version; create the tables on an empty database when `create`.
    Returns True when the tables were created."""
    names = set(inspect(engine).get_table_names())
    where = engine.url.render_as_string(hide_password=True)
    if "meta" not in names:
        ours = sorted(names & set(metadata.tables))
        if ours:
            raise StoreVersionError(f"{where} has tables {ours} but no `meta` table, so it is not an agentrt store "
                                    "(or a damaged one); point the store at a new file or an empty database")
        if not create:
            raise StoreVersionError(f"{where} holds no agentrt store yet (no tables); open it with Store(...) "
                                    "to create one, or check the URL")
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(insert(meta), [{"key": "schema_version", "value": str(SCHEMA_VERSION)}])
            conn.execute(insert(counters), [{"name": "ids", "next": 1}])
        return True
    with engine.connect() as conn:
        found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    if found != str(SCHEMA_VERSION):
        raise StoreVersionError(
            f"{where} holds an agentrt store with schema version {found}; this agentrt reads version "
            f"{SCHEMA_VERSION}. Open it with the agentrt release that wrote it (and export what you need), "
            "or record into a new file or database")
    return False
