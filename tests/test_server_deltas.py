"""The server's output splitter: however the text is cut into pieces, the same reasoning, content and
tool calls come out, and they agree with `ChatFormat.parse` on the whole text."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agentrt.model.chat import JsonChatFormat
from agentrt.server.deltas import Delta, OutputSplitter

FMT = JsonChatFormat()
CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
WORDS = st.sampled_from(["hello", " world", "\n", "  ", "<", "</", "<thi", "think", ">", "tool", "_call", "{", "}",
                         "é", "2 + 3", "<think>", "</think>", CALL])


def run(pieces: list[str], thinking_open: bool) -> Delta:
    splitter = OutputSplitter(FMT, None, thinking_open)
    out = Delta()
    for piece in pieces:
        out.extend(splitter.push(piece))
    out.extend(splitter.finish())
    return out


def strip_ids(delta: Delta) -> tuple:
    return delta.reasoning, delta.content, [(c["index"], c["function"]["name"], c["function"]["arguments"])
                                            for c in delta.tool_calls]


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, max_size=14), st.booleans(), st.data())
def test_any_cut_gives_what_the_whole_text_gives(words, thinking_open, data):
    text = "".join(words)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert strip_ids(run(pieces, thinking_open)) == strip_ids(run([text], thinking_open))


def test_reasoning_content_and_calls_agree_with_parse():
    text = "<think>\n2 and 3 make 5.\n</think>\n\nIt is 5.\n" + CALL + "\n" + CALL.replace("1", "7") + "\nDone."
    whole = FMT.parse(text)
    out = run([text[i:i + 3] for i in range(0, len(text), 3)], False)
    assert out.reasoning == whole.reasoning and out.content == whole.content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == [
        (c.name, c.arguments) for c in whole.tool_calls]
    assert [c["index"] for c in out.tool_calls] == [0, 1] and len({c["id"] for c in out.tool_calls}) == 2


def test_open_thinking_and_unparsable_calls():
    out = run(["still thinking", " here</think>answer"], True)
    assert (out.reasoning, out.content) == ("still thinking here", "answer")
    bad = '<tool_call>{"name": 3}</tool_call>'
    out = run(["x ", bad, " y"], False)
    assert out.tool_calls == [] and out.content == "x " + bad + " y"  # passed through as text
    out = run(["<tool_call>{\"name\": \"add\""], False)  # cut off by max_tokens: text, not a call
    assert out.tool_calls == [] and out.content == '<tool_call>{"name": "add"'
