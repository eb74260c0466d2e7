"""Export recorded trajectories as JSONL for training: one line per root-to-leaf branch of each
message tree, with the exact token ids, logprobs and a loss mask (docs/export.md).

Nothing is tokenized here: every id comes from what the engine recorded.

>>> from agentrt.store import StoreReader
>>> n = export_jsonl(StoreReader("runs.db"), "train.jsonl")               # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import ModelCallRecord, Node, StoreReader, TrajectoryRecord

_INT_LIST = {"type": "array", "items": {"type": "integer"}}
_NULLABLE_STR = {"type": ["string", "null"]}

# The JSON schema of one line (draft 2020-12); docs/export.md shows it and describes each field.
LINE_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["run_id", "trajectory_id", "leaf_node_id", "root_node_id", "trajectory_ids", "agent", "status",
                 "reason", "fork_of", "fork_node_id", "messages", "tools", "completions", "flat", "input_ids",
                 "loss_mask", "logprobs", "reward", "rewards"],
    "additionalProperties": False,
    "properties": {
        "run_id": _NULLABLE_STR,
        "trajectory_id": {"type": "string"},
        "leaf_node_id": {"type": "integer"},
        "root_node_id": {"type": "integer"},
        "trajectory_ids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "agent": {"type": "string"},
        "status": {"type": "string"},
        "reason": _NULLABLE_STR,
        "fork_of": _NULLABLE_STR,
        "fork_node_id": {"type": ["integer", "null"]},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"], "properties": {
                "role": {"type": "string"},
                "content": {},
                "reasoning_content": {"type": ["string", "null"]},
                "tool_calls": {"type": "array", "items": {
                    "type": "object", "required": ["id", "type", "function"], "properties": {
                        "id": {"type": "string"}, "type": {"const": "function"},
                        "function": {"type": "object", "required": ["name", "arguments"]}}}},
                "tool_call_id": {"type": "string"},
                "name": {"type": "string"}}}},
        "tools": {"type": ["array", "null"], "items": {"type": "object"}},
        "completions": {"type": "array", "items": {
            "type": "object",
            "required": ["model_call_id", "trajectory_id", "message_index", "prompt_ids", "token_ids", "logprobs",
                         "finish_reason"],
            "additionalProperties": False,
            "properties": {
                "model_call_id": {"type": "integer"},
                "trajectory_id": {"type": "string"},
                "message_index": {"type": ["integer", "null"], "minimum": 0},
                "prompt_ids": _INT_LIST,
                "token_ids": _INT_LIST,
                "logprobs": {"type": "array", "items": {"type": ["number", "string"]}},
                "finish_reason": _NULLABLE_STR}}},
        "flat": {"type": "boolean"},
        "input_ids": {"anyOf": [_INT_LIST, {"type": "null"}]},
        "loss_mask": {"anyOf": [{"type": "array", "items": {"enum": [0, 1]}}, {"type": "null"}]},
        "logprobs": {"anyOf": [{"type": "array", "items": {"type": ["number", "string", "null"]}},
                               {"type": "null"}]},
        "reward": {"type": ["number", "null"]},
        "rewards": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}


def export_jsonl(reader: StoreReader, out_path: str | Path, *, run_id: str | None = None) -> int:
    """Write one JSON line per root-to-leaf branch of every message tree to `out_path` and return
    the number of lines. With `run_id`, only branches whose leaf belongs to a trajectory of that run
    (a fork made by a later run is exported with that run). Fields: docs/export.md, `LINE_SCHEMA`.

    >>> export_jsonl(store, "train.jsonl", run_id=run.id)                   # doctest: +SKIP
    3
    """
    every = {t.id: t for t in reader.trajectories()}
    chosen = [t for t in every.values() if run_id is None or t.run_id == run_id]
    roots: dict[int, None] = {}
    for t in chosen:
        path = reader.messages(t.id)
        if path:
            roots.setdefault(path[0].id)
    calls: dict[str, list[ModelCallRecord]] = {}
    written = 0
    with open(out_path, "w", encoding="utf-8") as out:
        for root in roots:
            for branch in reader.branches(root):
                leaf = every[branch[-1].trajectory_id]
                if run_id is not None and leaf.run_id != run_id:
                    continue
                line = branch_line(reader, branch, every, calls)
                out.write(json.dumps(line, ensure_ascii=False, allow_nan=False, default=str) + "\n")
                written += 1
    return written


def branch_line(reader: StoreReader, branch: list[Node], trajectories: dict[str, TrajectoryRecord],
                calls: dict[str, list[ModelCallRecord]] | None = None) -> dict:
    """The export line of one root-to-leaf `branch` (a list of nodes from `StoreReader.branches`).
    `calls` caches model calls per trajectory across branches."""
    calls = {} if calls is None else calls
    leaf = trajectories[branch[-1].trajectory_id]
    owners = list(dict.fromkeys(n.trajectory_id for n in branch))
    index = {n.id: i for i, n in enumerate(branch)}
    last_own = {}
    for n in branch:
        last_own[n.trajectory_id] = n.id
    along = []
    for tid in owners:
        if tid not in calls:
            calls[tid] = reader.model_calls(tid)
        for c in calls[tid]:
            # a call on the branch made its assistant message there; a call that made no message
            # (a bare `generate`) belongs to the branch while its trajectory is on it
            if c.node_id in index or (c.node_id is None and (tid == leaf.id or c.id < last_own[tid])):
                along.append(c)
    along.sort(key=lambda c: c.id)
    completions = [{"model_call_id": c.id, "trajectory_id": c.trajectory_id, "message_index": index.get(c.node_id),
                    "prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "logprobs": _floats(c.logprobs),
                    "finish_reason": c.finish_reason} for c in along]
    rewards: dict[str, float] = {}
    for r in reader.rewards(leaf.id):
        if r.value is not None:
            rewards[r.name] = rewards.get(r.name, 0.0) + r.value
    line = {
        "run_id": leaf.run_id, "trajectory_id": leaf.id, "leaf_node_id": branch[-1].id, "root_node_id": branch[0].id,
        "trajectory_ids": owners, "agent": leaf.agent, "status": leaf.status, "reason": leaf.reason,
        "fork_of": leaf.parent_trajectory_id, "fork_node_id": leaf.fork_node_id,
        "messages": [n.message for n in branch], "tools": _tools(along, leaf), "completions": completions,
        **flatten(along),
        "reward": sum(rewards.values()) if rewards else None, "rewards": rewards,
    }
    return line


def flatten(calls: list[ModelCallRecord]) -> dict:
    """The trainer's view of a branch's model calls: when every call's prompt starts with the previous
    call's prompt + completion, one sequence (the last call's prompt + completion) with `loss_mask`
    1 on the tokens some call generated and their `logprobs` (None elsewhere); else `flat: False`
    and the per-call segments in `completions` are the view."""
    flat = bool(calls) and all(c.prompt_ids for c in calls) and all(
        c.prompt_ids[:len(p.prompt_ids) + len(p.token_ids)] == p.prompt_ids + p.token_ids
        for p, c in zip(calls, calls[1:]))
    if not flat:
        return {"flat": False, "input_ids": None, "loss_mask": None, "logprobs": None}
    last = calls[-1]
    ids = last.prompt_ids + last.token_ids
    mask: list[int] = [0] * len(ids)
    logprobs: list[Any] = [None] * len(ids)
    for c in calls:
        start = len(c.prompt_ids)
        lps = _floats(c.logprobs)
        for j in range(len(c.token_ids)):
            mask[start + j] = 1
            logprobs[start + j] = lps[j] if j < len(lps) else None
    return {"flat": True, "input_ids": ids, "loss_mask": mask, "logprobs": logprobs}


def _tools(calls: list[ModelCallRecord], leaf: TrajectoryRecord) -> list[dict] | None:
    """The tool schemas offered by the branch's last model call that offered any; None without tools."""
    for c in reversed(calls):
        tools = getattr(c, "tools", None) or (c.meta or {}).get("tools")
        if tools:
            return tools
    return (leaf.meta or {}).get("tools")


def _floats(values: list[float]) -> list[Any]:
    """Logprobs as JSON numbers; non-finite ones (-inf for a forced token) as strings, as the store writes them."""
    return [v if v == v and v not in (float("inf"), float("-inf")) else repr(v) for v in values]


__all__ = ["LINE_SCHEMA", "branch_line", "export_jsonl", "flatten"]
