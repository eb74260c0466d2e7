"""The one interface through which the runtime reports what happens: the trajectory store plugs in here.

Every method is called on the event loop and must return at once (a store hands the work to its
writer thread). `NullRecorder` drops everything; `MemoryRecorder` keeps it in lists, for tests and
small scripts.

Order per trajectory: `trajectory_started` (as soon as the agent is scheduled, before it may fail
to start), then its messages, model and tool calls, rewards and events, then
`trajectory_finished` once. `message` appends a node to the trajectory's branch; when the
`trajectory_started` meta has `parent_node` (a store node id), the first message hangs under that
node: a fork, whose prefix is not recorded again. Recorded objects are not mutated afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .llm import ChatReply
    from .runtime import AgentResult


class Recorder(Protocol):
    def run_started(self, run_id: str, meta: dict) -> None: ...
    def run_finished(self, run_id: str, status: str, summary: dict) -> None: ...
    def trajectory_started(self, trajectory_id: str, run_id: str, agent: str, meta: dict) -> None: ...
    def message(self, trajectory_id: str, message: dict) -> None: ...
    def model_call(self, trajectory_id: str, reply: ChatReply, meta: dict) -> None: ...
    def tool_call(self, trajectory_id: str, call: dict, result: Any) -> None: ...
    def reward(self, trajectory_id: str, name: str, value: float, info: dict | None) -> None: ...
    def event(self, trajectory_id: str, kind: str, data: dict) -> None: ...
    def trajectory_finished(self, trajectory_id: str, result: AgentResult) -> None: ...


class NullRecorder:
    """Records nothing."""

    def run_started(self, run_id: str, meta: dict) -> None: pass
    def run_finished(self, run_id: str, status: str, summary: dict) -> None: pass
    def trajectory_started(self, trajectory_id: str, run_id: str, agent: str, meta: dict) -> None: pass
    def message(self, trajectory_id: str, message: dict) -> None: pass
    def model_call(self, trajectory_id: str, reply: ChatReply, meta: dict) -> None: pass
    def tool_call(self, trajectory_id: str, call: dict, result: Any) -> None: pass
    def reward(self, trajectory_id: str, name: str, value: float, info: dict | None) -> None: pass
    def event(self, trajectory_id: str, kind: str, data: dict) -> None: pass
    def trajectory_finished(self, trajectory_id: str, result: AgentResult) -> None: pass


@dataclass(slots=True)
class Record:
    kind: str
    trajectory_id: str | None
    data: Any
    at: float = field(default_factory=time.time)


class MemoryRecorder:
    """Keeps every record in `records`, in order.

    >>> rec = MemoryRecorder()
    >>> # Runtime(model, recorder=rec) ... then: rec.of("tool_call", trajectory_id)
    """

    def __init__(self) -> None:
        self.records: list[Record] = []

    def of(self, kind: str, trajectory_id: str | None = None) -> list[Any]:
        return [r.data for r in self.records
                if r.kind == kind and (trajectory_id is None or r.trajectory_id == trajectory_id)]

    def _add(self, kind: str, trajectory_id: str | None, data: Any) -> None:
        self.records.append(Record(kind, trajectory_id, data))

    def run_started(self, run_id: str, meta: dict) -> None:
        self._add("run_started", None, {"run_id": run_id, **meta})

    def run_finished(self, run_id: str, status: str, summary: dict) -> None:
        self._add("run_finished", None, {"run_id": run_id, "status": status, **summary})

    def trajectory_started(self, trajectory_id: str, run_id: str, agent: str, meta: dict) -> None:
        self._add("trajectory_started", trajectory_id, {"run_id": run_id, "agent": agent, **meta})

    def message(self, trajectory_id: str, message: dict) -> None:
        self._add("message", trajectory_id, message)

    def model_call(self, trajectory_id: str, reply: ChatReply, meta: dict) -> None:
        self._add("model_call", trajectory_id, {"reply": reply, **meta})

    def tool_call(self, trajectory_id: str, call: dict, result: Any) -> None:
        self._add("tool_call", trajectory_id, {"call": call, "result": result})

    def reward(self, trajectory_id: str, name: str, value: float, info: dict | None) -> None:
        self._add("reward", trajectory_id, {"name": name, "value": value, "info": info})

    def event(self, trajectory_id: str, kind: str, data: dict) -> None:
        self._add("event", trajectory_id, {"kind": kind, **data})

    def trajectory_finished(self, trajectory_id: str, result: AgentResult) -> None:
        self._add("trajectory_finished", trajectory_id, result)
