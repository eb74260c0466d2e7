"""Generated text, piece by piece, into the reasoning, content and tool-call deltas of a chat completion.

The server answers streamed and non-streamed requests through the same splitter, so the deltas of a
stream always add up to the message of the same request made without streaming. Markers are found
however the text is cut into pieces: a piece ending in what may be the start of a marker is held back
until the next piece decides it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from agentrt.model.chat import ChatFormat


@dataclass(slots=True)
class Delta:
    """What one piece of text added: reasoning, content, and completed tool calls (OpenAI delta form)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: Delta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


class _Channel:
    """Emits text with leading and trailing whitespace removed, and `separator` between segments,
    as `ChatFormat.parse` strips and joins the pieces of content around tool calls."""

    def __init__(self, separator: str = ""):
        self.separator, self.started, self.new_segment, self.spaces = separator, False, False, ""

    def push(self, text: str) -> str:
        body = text.rstrip()
        trailing = text[len(body):]
        if not body:
            self.spaces += trailing if self.started and not self.new_segment else ""
            return ""
        if not self.started or self.new_segment:
            body = body.lstrip()
            lead = self.separator if self.started else ""
            self.started, self.new_segment = True, False
        else:
            lead = self.spaces
        self.spaces = trailing
        return lead + body

    def segment(self) -> None:
        """What follows is a new segment (after a tool call): trimmed, joined by the separator."""
        self.new_segment, self.spaces = True, ""


class OutputSplitter:
    """Feed decoded text with `push`; each call returns the `Delta` the text completes; `finish` flushes.

    `thinking_open`: the prompt ended inside a think block, so the output starts with reasoning.
    A tool call whose text does not parse is passed through as content (a client cannot be given a
    call that has no valid arguments); with constrained decoding, which the server uses whenever
    tools are offered, that does not happen.

    >>> s = OutputSplitter(fmt, tools=None, thinking_open=True)        # doctest: +SKIP
    >>> s.push("Let me th"), s.push("ink</thi"), s.push("nk>\\nHello")
    """

    def __init__(self, fmt: ChatFormat, tools: list[dict] | None, thinking_open: bool):
        self.fmt, self.tools = fmt, tools
        self.state = "reasoning" if thinking_open else "start"
        self.pending = ""  # text not yet decided
        self.reasoning, self.content = _Channel(), _Channel("\n")
        self.calls = 0
        self.all = Delta()  # everything emitted so far

    def push(self, text: str) -> Delta:
        self.pending += text
        out = Delta()
        while self.pending and self._step(out):
            pass
        self.all.extend(out)
        return out

    def finish(self) -> Delta:
        """Flush what is held back: a partial marker is text after all; an unclosed call is content."""
        out = Delta()
        text, self.pending = self.pending, ""
        if self.state == "reasoning":
            out.reasoning += self.reasoning.push(text)
        else:
            out.content += self.content.push(self.fmt.tool_call_start + text if self.state == "call" else text)
        self.all.extend(out)
        return out

    @property
    def finish_reason_override(self) -> str | None:
        return "tool_calls" if self.calls else None

    # -- one decision at a time; returns False when more text is needed ----------------------------
    def _step(self, out: Delta) -> bool:
        fmt = self.fmt
        if self.state == "start":  # reasoning only if the output opens with <think> (after whitespace)
            head = self.pending.lstrip()
            if not head:
                return False
            if head.startswith(fmt.think_start):
                self.pending, self.state = head[len(fmt.think_start):], "reasoning"
            elif fmt.think_start.startswith(head):
                return False
            else:
                self.state = "content"
            return True
        if self.state == "reasoning":
            before, found = self._until(fmt.think_end)
            out.reasoning += self.reasoning.push(before)
            if found:
                self.state = "content"
            return found
        if self.state == "content":
            before, found = self._until(fmt.tool_call_start)
            out.content += self.content.push(before)
            if found:
                self.state = "call"
            return found
        # in a tool call: wait for its end marker
        end = self.pending.find(fmt.tool_call_end)
        if end < 0:
            return False
        raw = fmt.tool_call_start + self.pending[:end] + fmt.tool_call_end
        self.pending, self.state = self.pending[end + len(fmt.tool_call_end):], "content"
        parsed = fmt.parse(raw, tools=self.tools)
        if parsed.tool_calls:
            call = parsed.tool_calls[0]
            out.tool_calls.append({"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                   "function": {"name": call.name, "arguments": json.dumps(call.arguments)}})
            self.calls += 1
            self.content.segment()
        else:
            out.content += self.content.push(raw)
        return True

    def _until(self, marker: str) -> tuple[str, bool]:
        """Take pending text up to `marker` (consumed) or, without it, all but a possible partial marker."""
        at = self.pending.find(marker)
        if at >= 0:
            before, self.pending = self.pending[:at], self.pending[at + len(marker):]
            return before, True
        keep = _partial_suffix(self.pending, marker)
        before = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(before):]
        return before, False


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def message_of(delta: Delta) -> dict[str, Any]:
    """The assistant message of a whole reply (non-streamed responses)."""
    message: dict[str, Any] = {"role": "assistant", "content": delta.content or (None if delta.tool_calls else "")}
    if delta.reasoning:
        message["reasoning_content"] = delta.reasoning
    if delta.tool_calls:
        message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in delta.tool_calls]
    return message
