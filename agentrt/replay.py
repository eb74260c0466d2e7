"""Replay, fork and read back recorded trajectories.

- `render(reader, trajectory_id)`: a readable transcript.
- `replay(rt, reader, trajectory_id)`: re-issue every recorded model call with its recorded options,
  answer every tool call from the recorded results (no tool runs again), and compare the token ids.
- `fork(rt, reader, node_id, agent=...)`: continue a conversation from one of its nodes as a new
  branch of the same message tree.

>>> async with Runtime(model="tiny", recorder=store) as rt:                 # doctest: +SKIP
...     again = await replay(rt, store, trajectory_id, agent=calc)
...     assert again.identical, again.mismatches
...     other = await fork(rt, store, node_id, agent=calc, sampling={"seed": 7})
>>> print(render(store, trajectory_id))                                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .agent import Agent, AgentContext, AgentResult, MaxTurns, Policy, Sampling
from .budget import Budget, BudgetExceeded
from .llm import ChatModel, ChatOptions, ChatReply, ToolCallRequest

if TYPE_CHECKING:
    from .runtime import Runtime
    from .store import ModelCallRecord, Node, StoreReader, ToolCallRecord


class ReplayError(Exception):
    """The replay cannot go on as recorded: the model made a tool call the recording does not hold,
    or more model calls than were recorded."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """Where a re-issued model call first differs from its recording.

    `call`: the call's index among the trajectory's model calls (0-based). `field`: "token_ids",
    "prompt_ids", or "reply" (models that report no token ids: the parsed replies differ).
    `position`: the first differing index (the shorter length when one list is a prefix of the
    other); `recorded`/`replayed`: the ids there (None past a list's end)."""

    call: int
    field: str
    position: int
    recorded: int | None = None
    replayed: int | None = None


@dataclass(slots=True)
class ReplayResult:
    """What `replay` found. `identical`: every recorded model call was re-issued, each produced the
    recorded token ids (and prompt), and nothing failed. `trajectory_id`: the replay's own
    trajectory (its meta has `replay_of`). `error`: why the replay stopped early, if it did."""

    replay_of: str
    trajectory_id: str
    identical: bool
    mismatches: list[Mismatch]
    calls: int
    recorded_calls: int
    result: AgentResult
    error: str | None = None


# -- render ------------------------------------------------------------------------------------------
def render(reader: StoreReader, trajectory_id: str) -> str:
    """A readable transcript of a trajectory: role-tagged messages, reasoning set apart, tool calls
    with their arguments, results (ok or the error kind), rewards, and how the episode ended.

    >>> print(render(store, result.trajectory_id))                             # doctest: +SKIP
    """
    t = reader.trajectory(trajectory_id)
    path = reader.messages(trajectory_id)
    results = {c.node_id: c for c in reader.tool_calls(trajectory_id) if c.node_id is not None}
    head = [f"trajectory {t.id}  agent {t.agent}  run {t.run_id}"]
    if t.parent_trajectory_id:
        head.append(f"fork of {t.parent_trajectory_id} at node {t.fork_node_id}")
    if (t.meta or {}).get("replay_of"):
        head.append(f"replay of {t.meta['replay_of']}")
    if t.task is not None:
        head.append(f"task: {t.task}")
    lines = [*head, ""]
    for i, node in enumerate(path):
        lines += _render_node(i, node, results.get(node.id), shared=node.trajectory_id != trajectory_id)
    loose = [c for c in reader.tool_calls(trajectory_id) if c.node_id is None]
    if loose:
        lines.append("tool calls outside the conversation:")
        lines += [f"  -> {_call_text(c.name, c.arguments)} ({c.call_id}) {_outcome(c)}: {_one_line(c.content)}"
                  for c in loose]
    calls = reader.model_calls(trajectory_id)
    lines.append(f"model calls: {len(calls)}  prompt tokens {sum(c.prompt_tokens for c in calls)}  "
                 f"output tokens {sum(c.output_tokens for c in calls)}")
    rewards = reader.rewards(trajectory_id)
    if rewards:
        total = sum(r.value or 0.0 for r in rewards)
        lines.append("rewards: " + ", ".join(f"{r.name}={r.value:g}" for r in rewards) + f"  (total {total:g})")
    lines.append(f"status: {t.status}" + (f" ({t.reason})" if t.reason else ""))
    return "\n".join(lines)


def _render_node(i: int, node: Node, result: ToolCallRecord | None, *, shared: bool) -> list[str]:
    m = node.message
    tag = f"#{i} {node.role}"
    if node.role == "tool":
        tag += f" {m.get('name', '?')} ({m.get('tool_call_id')})"
        tag += f" {_outcome(result)}" if result is not None else " not run"
    if shared:
        tag += f"  [shared prefix: trajectory {node.trajectory_id}]"
    out = [tag]
    if m.get("reasoning_content"):
        out += ["  <reasoning>", *_indent(m["reasoning_content"], 4), "  </reasoning>"]
    if m.get("content"):
        out += _indent(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]), 2)
    for call in m.get("tool_calls") or []:
        fn = call.get("function", {})
        out.append(f"  -> {_call_text(fn.get('name'), fn.get('arguments'))} ({call.get('id')})")
    return out


def _outcome(c: ToolCallRecord | None) -> str:
    return "ok" if c is None or c.ok else f"ERROR {c.error}"


def _call_text(name: Any, arguments: Any) -> str:
    return f"{name}({arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)})"


def _indent(text: str, n: int) -> list[str]:
    return [" " * n + line for line in str(text).splitlines()] or [" " * n]


def _one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


# -- shared helpers (also used by environments/trajectory.py) -----------------------------------------
def call_key(name: Any, arguments: Any) -> tuple[str, str]:
    """What identifies a tool call when matching it to a recorded one: the name and the arguments
    as canonical JSON (key order does not matter)."""
    return str(name), json.dumps(arguments, sort_keys=True, ensure_ascii=False, default=str)


def recorded_value(content: Any) -> Any:
    """The value of a recorded tool result: its JSON when the registry would render that value back
    to exactly the recorded text, else the text itself."""
    from agentrt.tools.registry import render as render_value

    if not isinstance(content, str):
        return content
    try:
        value = json.loads(content)
    except (json.JSONDecodeError, RecursionError):
        return content
    return value if render_value(value) == content else content


def append_message(ctx: AgentContext, message: dict) -> None:
    """Append a message to the conversation as the policy's own, and record it (what
    `AgentContext` does with the messages it appends)."""
    message = dict(message)
    ctx.messages.append(message)
    ctx.recorder.message(ctx.trajectory_id, message)


# -- replay ------------------------------------------------------------------------------------------
async def replay(rt: Runtime, reader: StoreReader, trajectory_id: str, *, agent: Agent | None = None
                 ) -> ReplayResult:
    """Re-run a recorded trajectory on `rt` and check it reproduces the recording token for token.

    The replay starts from the recorded opening messages, re-issues every recorded model call with
    its recorded `ChatOptions` (seed, temperature, top_p, max_tokens, think budget and grace,
    constraints, max_total_tokens), appends the messages the policy appended, and answers every
    tool call the replayed model makes from the recorded results (matched by name and arguments, in
    call order), so no tool runs again. A call the recording does not hold stops the replay with a
    `ReplayError` (in `ReplayResult.error`). The replay is recorded as its own trajectory with meta
    `{"replay_of": trajectory_id}`.

    The tool schemas offered with each call come from the store (the runtime records them with the
    call). For recordings made before it did, they come from `agent`'s tools (Tool objects, or
    names registered on `rt`): for each call the subset offered (all, none, or one tool) is the
    one whose rendering gives the recorded prompt (models with a chat format).

    >>> r = await replay(rt, store, trajectory_id, agent=painter)            # doctest: +SKIP
    >>> r.identical, r.mismatches
    (True, [])
    """
    from .runtime import Episode

    t = reader.trajectory(trajectory_id)
    path = reader.messages(trajectory_id)
    calls, tools = reader.model_calls(trajectory_id), reader.tool_calls(trajectory_id)
    schemas = _agent_schemas(rt, agent)
    if schemas is None and (tools or any((c.reply or {}).get("tool_calls") for c in calls)) \
            and not all(_recorded_schemas(c) is not _UNKNOWN for c in calls):
        raise ValueError(f"trajectory {trajectory_id} called tools, and its recorded model calls do not hold the "
                         "tool schemas offered (a recording older than the runtime that stores them), so the "
                         "replay cannot offer the same tools; pass agent= with the same tools")
    opening, steps = _script(trajectory_id, path, calls, tools)
    pinned = _Pinned(rt.model, calls, schemas or [], trajectory_id)
    served = _Served(tools, schemas or [], trajectory_id)
    policy = _replay_policy(steps, pinned, served, t)
    name = agent.name if agent is not None else t.agent
    replayer = Agent(name=name, policy=policy, budget=Budget())  # no limits: the recorded options are used as they are
    [result] = await rt.run([Episode(replayer, t.task, messages=[n.message for n in opening],
                                     meta={"replay_of": trajectory_id})])
    error = result.reason if result.status == "failed" else None
    identical = not pinned.mismatches and pinned.next == len(calls) and error is None
    return ReplayResult(trajectory_id, result.trajectory_id, identical, pinned.mismatches, pinned.next, len(calls),
                        result, error)


def _script(trajectory_id: str, path: list[Node], calls: list[ModelCallRecord], tools: list[ToolCallRecord]
            ) -> tuple[list[Node], list[tuple[str, Any]]]:
    """The opening messages and the steps after them: the trajectory's own nodes, model calls and
    tool calls in the order they were recorded (the store's ids grow in recording order)."""
    own = [(n.id, "node", n) for n in path if n.trajectory_id == trajectory_id]
    events = sorted(own + [(c.id, "model", c) for c in calls] + [(c.id, "tool", c) for c in tools],
                    key=lambda e: e[0])
    first = next((i for i, e in enumerate(events) if e[1] != "node"), len(events))
    shared = [n for n in path if n.trajectory_id != trajectory_id]
    return shared + [e[2] for e in events[:first]], [(kind, item) for _, kind, item in events[first:]]


def _replay_policy(steps: list[tuple[str, Any]], pinned: _Pinned, served: _Served, t: Any) -> Policy:
    outputs = {c.node_id for kind, c in steps if kind in ("model", "tool") and c.node_id is not None}

    async def policy(ctx: AgentContext) -> Any:
        pinned.session = ctx.session
        ctx.model, ctx.tools = pinned, served  # recorded options in, recorded tool results out
        latest: dict[str, ToolCallRequest] = {}  # recorded call id -> the replayed reply's call at that place
        errors: set[str] = set()
        batch: list[tuple[ToolCallRequest, bool]] = []
        for kind, item in steps:
            if kind == "tool":
                batch.append((latest.get(item.call_id) or ToolCallRequest(item.call_id, item.name, item.arguments),
                              item.node_id is not None))
                continue
            if kind == "node" and item.id in outputs:
                continue  # made again by the replayed model call or tool call
            await _dispatch(ctx, batch)
            if kind == "model":
                opts = _as_given(item.options)  # so the replay's own record shows them too
                reply = await (ctx.chat(**opts) if item.node_id is not None else ctx.generate(ctx.messages, **opts))
                latest, errors = _match_calls(item.reply, reply)
            elif item.role == "tool" and item.message.get("tool_call_id") in errors:
                ctx.reject_calls([latest[item.message["tool_call_id"]]])
            else:
                append_message(ctx, item.message)
        await _dispatch(ctx, batch)
        if t.status == "budget" and t.reason:  # end as the recording ended
            raise BudgetExceeded(t.reason.removeprefix("budget:"), "as recorded")
        if t.status == "max_turns":
            raise MaxTurns(t.reason or "as recorded")
        return t.output
    return policy


async def _dispatch(ctx: AgentContext, batch: list[tuple[ToolCallRequest, bool]]) -> None:
    """Run the pending tool calls, consecutive ones with the same `append` together."""
    while batch:
        append = batch[0][1]
        n = next((i for i, (_, a) in enumerate(batch) if a != append), len(batch))
        await ctx.call_tools([c for c, _ in batch[:n]], append=append)
        del batch[:n]


def _match_calls(recorded: dict | None, reply: ChatReply) -> tuple[dict[str, ToolCallRequest], set[str]]:
    """Recorded call ids mapped to the replayed reply's calls at the same places (parsed calls, then
    calls that did not parse, as in the assistant message); and the recorded ids mapped to the latter."""
    new = reply.tool_calls + reply.errors
    ids = [c.get("id") for c in (recorded or {}).get("tool_calls") or []]
    return dict(zip(ids, new)), set(ids[len(reply.tool_calls):len(new)])


class _Pinned:
    """Stands in for the model during a replay: each call gets the options and tool schemas of the
    recorded call it re-issues, and its reply is compared with the recording."""

    def __init__(self, model: ChatModel, calls: list[ModelCallRecord], schemas: list[dict], trajectory_id: str):
        self.model, self.calls, self.schemas, self.trajectory_id = model, calls, schemas, trajectory_id
        self.name = getattr(model, "name", "?")
        self.next = 0
        self.session: str | None = None
        self.mismatches: list[Mismatch] = []

    async def chat(self, messages: list[dict], tools: list[dict] | None, options: ChatOptions) -> ChatReply:
        i = self.next
        if i >= len(self.calls):
            raise ReplayError(f"the replay of {self.trajectory_id} made model call {i + 1}, but only {len(self.calls)} "
                              "were recorded")
        rec = self.calls[i]
        self.next += 1
        opts = _options(rec.options, options, self.session)
        reply = await self.model.chat(messages, self._offered(rec, messages, opts), opts)
        self.mismatches += _compare(i, rec, reply)
        return reply

    def _offered(self, rec: ModelCallRecord, messages: list[dict], opts: ChatOptions) -> list[dict] | None:
        """The schemas recorded with the call if the store has them; else the candidate (all the
        agent's tools, none, or one of them) that renders to the recorded prompt."""
        known = _recorded_schemas(rec)
        if known is not _UNKNOWN:
            return known
        if not self.schemas:
            return None
        candidates = [self.schemas, None] + ([[s] for s in self.schemas] if len(self.schemas) > 1 else [])
        render_ids = getattr(getattr(self.model, "format", None), "render", None)
        if render_ids is not None and rec.prompt_ids:
            for schemas in candidates:
                if render_ids(messages, schemas, enable_thinking=opts.think_tokens != 0) == rec.prompt_ids:
                    return schemas
        return self.schemas

    async def close(self) -> None:
        pass


class _Served:
    """Stands in for the tool registry during a replay: every call is answered from the recorded
    results, matched by name and arguments in call order; nothing runs."""

    def __init__(self, records: list[ToolCallRecord], schemas: list[dict], trajectory_id: str):
        self.records, self._schemas, self.trajectory_id = records, schemas, trajectory_id
        self.used = [False] * len(records)
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._schemas)

    def schemas(self, names: Any = None) -> list[dict]:
        return [s for s in self._schemas if names is None or s["function"]["name"] in names]

    async def dispatch_many(self, calls: list[ToolCallRequest], **_: Any) -> list[Any]:
        return [self._serve(c) for c in calls]

    def _serve(self, call: ToolCallRequest) -> Any:
        from agentrt.tools import ToolResult

        key = call_key(call.name, call.arguments)
        i = next((i for i, r in enumerate(self.records) if not self.used[i] and call_key(r.name, r.arguments) == key),
                 None)
        if i is None:
            nxt = next((r for u, r in zip(self.used, self.records) if not u), None)
            expected = (f"the next recorded call is {_call_text(nxt.name, nxt.arguments)}" if nxt is not None
                        else "every recorded call was already served")
            raise ReplayError(f"the replay of {self.trajectory_id} diverged: the model called "
                              f"{_call_text(call.name, call.arguments)}, which the recording does not hold "
                              f"({expected}); tools never run during a replay, see ReplayResult.mismatches for "
                              "where it diverged")
        self.used[i] = True
        r = self.records[i]
        content = r.content if isinstance(r.content, str) else json.dumps(r.content, ensure_ascii=False)
        self.calls[str(call.name)] += 1
        if not r.ok:
            self.failures[str(call.name)] += 1
        return ToolResult(call.id, str(call.name), content, ok=r.ok, error=r.error,
                          value=recorded_value(content) if r.ok else None, seconds=r.seconds or 0.0)


_UNKNOWN: Any = object()
_OPTION_NAMES = {f.name for f in dataclasses.fields(ChatOptions)}


def _recorded_schemas(rec: ModelCallRecord) -> Any:
    """The tool schemas offered with a recorded call, when the store holds them (a `tools` field or
    meta key); `_UNKNOWN` otherwise (recordings older than the runtime that stores them)."""
    tools = getattr(rec, "tools", _UNKNOWN)
    if tools is _UNKNOWN and "tools" in (rec.meta or {}):
        tools = rec.meta["tools"]
    return tools


def _agent_schemas(rt: Runtime, agent: Agent | None) -> list[dict] | None:
    if agent is None:
        return None
    out = []
    for t in agent.tools:
        found = rt.tools.get(t) if isinstance(t, str) else t
        if found is None:
            raise ValueError(f"agent {agent.name!r} names tool {t!r}, which runtime does not have; "
                             f"registered: {rt.tools.names}")
        out.append(found.schema())
    return out


def _options(recorded: dict | None, given: ChatOptions, session: str | None) -> ChatOptions:
    """The recorded ChatOptions (the replay's own session); what the context built when none were recorded."""
    if not recorded:
        return given
    opts = ChatOptions(**{k: (list(v) if isinstance(v, list) else v) for k, v in recorded.items()
                          if k in _OPTION_NAMES})
    opts.session = session
    return opts


def _as_given(recorded: dict | None) -> dict:
    """Recorded options as `AgentContext.chat` keywords (the session is the replay's own; the
    model call gets the recorded `max_total_tokens` from `_Pinned`, the context computes its own)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in (recorded or {}).items()
            if k in _OPTION_NAMES and k not in ("session", "max_total_tokens")}


def _compare(i: int, rec: ModelCallRecord, reply: ChatReply) -> list[Mismatch]:
    out = []
    for name, old, new in (("prompt_ids", rec.prompt_ids, reply.prompt_ids), ("token_ids", rec.token_ids,
                                                                                 reply.token_ids)):
        if (old or new) and old != new:
            pos = next((j for j, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            out.append(Mismatch(i, name, pos, old[pos] if pos < len(old) else None,
                                new[pos] if pos < len(new) else None))
    if not (rec.token_ids or reply.token_ids) and _gist(rec.reply) != _gist(reply.to_message()):
        out.append(Mismatch(i, "reply", 0))
    return out


def _gist(message: dict | None) -> tuple:
    """A reply without its call ids (models without token ids number their calls as they please)."""
    m = message or {}
    calls = [(c.get("function", {}).get("name"), call_key("", c.get("function", {}).get("arguments"))[1])
             for c in m.get("tool_calls") or []]
    return m.get("content") or "", m.get("reasoning_content"), calls


# -- fork --------------------------------------------------------------------------------------------
async def fork(rt: Runtime, reader: StoreReader, node_id: int, *, agent: Agent,
               sampling: Sampling | dict | None = None, policy: Policy | None = None) -> AgentResult:
    """Continue a recorded conversation from node `node_id` (its root-to-node messages) as a new
    branch of the same message tree: the new trajectory's first message hangs under that node and
    its meta has `fork_of` (the node's trajectory). `sampling` (a `Sampling`, or a dict of changes to
    the agent's) and `policy` replace the agent's.

    >>> r = await fork(rt, store, node_id, agent=calc, sampling={"seed": 7, "temperature": 1.0})  # doctest: +SKIP
    >>> store.children(node_id)        # the original continuation and the fork's    # doctest: +SKIP
    """
    from .runtime import Episode

    node = reader.node(node_id)
    path = reader.messages(node.trajectory_id)
    prefix = path[:next(i for i, n in enumerate(path) if n.id == node_id) + 1]
    t = reader.trajectory(node.trajectory_id)
    changes: dict[str, Any] = {}
    if sampling is not None:
        changes["sampling"] = sampling if isinstance(sampling, Sampling) else agent.sampling.model_copy(update=sampling)
    if policy is not None:
        changes["policy"] = policy
    forked = agent.model_copy(update=changes) if changes else agent
    [result] = await rt.run([Episode(forked, t.task, messages=[n.message for n in prefix],
                                     meta={"parent_node": node_id, "fork_of": t.id})])
    return result


__all__ = ["Mismatch", "ReplayError", "ReplayResult", "append_message", "call_key", "fork", "recorded_value",
           "render", "replay"]
