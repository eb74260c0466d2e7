"""Chat formats: render/parse round trips, structured errors for malformed tool calls, parse never raises."""

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentrt.model.chat import ChatFormat, JsonChatFormat, NemotronChatFormat, ParsedMessage, ToolCall
from agentrt.model.tiny_tokenizer import write_tiny_tokenizer
from agentrt.model.tokenizer import Tokenizer, builtin_template

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string"}, "days": {"type": "integer"},
            "units": {"type": "array"}, "exact": {"type": "boolean"}, "extra": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email.",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}}}},
]
CALLS = [
    ("get_weather", {"city": "Zürich", "zip": "8001", "days": 3, "units": ["c", "f"], "exact": True, "extra": None}),
    ("send_email", {"to": "bob@example.com", "body": "Line one\n  indented line, \"quoted\" <b>ok</b>"}),
]


def _dir_with_template(src, dst, template, chat_format):
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    config.pop("agentrt_chat_format")
    if chat_format:
        config["agentrt_chat_format"] = chat_format
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    write_tiny_tokenizer(root / "tiny")
    nemotron = _dir_with_template(root / "tiny", root / "nemotron", builtin_template("nemotron3"), None)
    return {"json": Tokenizer.from_dir(root / "tiny"), "nemotron": Tokenizer.from_dir(nemotron)}


def test_for_tokenizer_picks_format(tokenizers, tmp_path):
    assert type(ChatFormat.for_tokenizer(tokenizers["json"])) is JsonChatFormat  # explicit key
    assert type(ChatFormat.for_tokenizer(tokenizers["nemotron"])) is NemotronChatFormat  # `<function=` in template
    tiny = tokenizers["json"].path
    forced = _dir_with_template(tiny, tmp_path / "forced", builtin_template("tiny"), "nemotron")
    assert type(ChatFormat.for_tokenizer(Tokenizer.from_dir(forced))) is NemotronChatFormat
    guessed = _dir_with_template(tiny, tmp_path / "guessed", builtin_template("tiny"), None)
    assert type(ChatFormat.for_tokenizer(Tokenizer.from_dir(guessed))) is JsonChatFormat
    bad = _dir_with_template(tiny, tmp_path / "bad", builtin_template("tiny"), "xml")
    with pytest.raises(ValueError, match=r"agentrt_chat_format is 'xml'; expected one of \['json', 'nemotron'\]"):
        ChatFormat.for_tokenizer(Tokenizer.from_dir(bad))


def _assistant_text(fmt, message, enable_thinking=True):
    """Render [user, assistant] and return the assistant turn's text, without the turn markers."""
    ids = fmt.render([{"role": "user", "content": "Do both."}, message], TOOLS, add_generation_prompt=False,
                     enable_thinking=enable_thinking)
    text = fmt.tokenizer.decode(ids)
    turn = text.rsplit("<|im_start|>assistant\n", 1)[1]
    assert turn.endswith("<|im_end|>\n")
    return turn[: -len("\n")]


@pytest.mark.parametrize("name", ["json", "nemotron"])
@pytest.mark.parametrize("thinking_open", [False, True])
def test_render_parse_round_trip(tokenizers, name, thinking_open):
    fmt = ChatFormat.for_tokenizer(tokenizers[name])
    message = {"role": "assistant", "reasoning_content": "Weather first,\nthen mail.", "content": "On it.",
               "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                              for i, (n, a) in enumerate(CALLS)]}
    original = text = _assistant_text(fmt, message)
    assert text.startswith("<think>\nWeather first,\nthen mail.\n</think>\nOn it.\n<tool_call>")
    if thinking_open:  # as generated after a prompt that already opened <think>
        text = text[len("<think>\n"):]
    parsed = fmt.parse(text, thinking_open=thinking_open, tools=TOOLS)
    assert parsed.errors == []
    assert parsed.reasoning == "Weather first,\nthen mail."
    assert parsed.content == "On it."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == CALLS
    assert [c.id for c in parsed.tool_calls] == ["call_0", "call_1"]
    # Parsing and rendering again gives the same turn, so the next prompt extends the cached one.
    assert _assistant_text(fmt, parsed.to_message()) == original


def test_nemotron_schema_coercion_keeps_string_parameters_raw():
    fmt = NemotronChatFormat()
    text = ("<tool_call>\n<function=get_weather>\n<parameter=zip>\n8001\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=extra>\nnull\n</parameter>\n"
            "<parameter=city>\nnot json {\n</parameter>\n</function>\n</tool_call>")
    assert fmt.parse(text).tool_calls[0].arguments == {"zip": 8001, "days": 3, "extra": None, "city": "not json {"}
    assert fmt.parse(text, tools=TOOLS).tool_calls[0].arguments == {
        "zip": "8001", "days": 3, "extra": None, "city": "not json {"}


def test_render_accepts_openai_string_arguments(tokenizers):
    fmt = ChatFormat.for_tokenizer(tokenizers["nemotron"])
    as_dict = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    as_string = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert _assistant_text(fmt, as_dict) == _assistant_text(fmt, as_string)
    as_string["tool_calls"][0]["function"]["arguments"] = '["Oslo"]'
    with pytest.raises(ValueError, match="message 1 tool call 0: arguments are a JSON array; expected a JSON object"):
        _assistant_text(fmt, as_string)


@pytest.mark.parametrize("name", ["json", "nemotron"])
def test_render_with_thinking_off_and_history(tokenizers, name):
    fmt = ChatFormat.for_tokenizer(tokenizers[name])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    text = fmt.tokenizer.decode(fmt.render(messages, enable_thinking=False))
    assert text.endswith("<|im_start|>assistant\n<think></think>hello<|im_end|>\n"
                         "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n<think></think>")
    assert text.startswith("<|im_start|>system\n<|im_end|>\n")
    parsed = fmt.parse("see you<|im_end|></s>")  # thinking off: output is content only
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == (None, "see you", [])


@pytest.mark.parametrize("fmt", [JsonChatFormat(), NemotronChatFormat()], ids=["json", "nemotron"])
def test_reasoning_boundaries(fmt):
    assert fmt.parse("still thinking about it", thinking_open=True) == ParsedMessage("still thinking about it", "")
    assert fmt.parse("plan\n</think>\nanswer", thinking_open=True) == ParsedMessage("plan", "answer")
    assert fmt.parse("  <think>\nplan\n</think>\n\nanswer") == ParsedMessage("plan", "answer")
    assert fmt.parse("<think>\ncut off") == ParsedMessage("cut off", "")
    assert fmt.parse("plan</think>answer") == ParsedMessage("plan", "answer")  # prompt opened it, caller forgot
    assert fmt.parse("<think></think>answer") == ParsedMessage("", "answer")
    assert fmt.parse("just an answer") == ParsedMessage(None, "just an answer")
    # Calls written inside reasoning are not calls.
    assert fmt.parse("<tool_call>x</tool_call>", thinking_open=True).tool_calls == []


def _one_error(fmt, text):
    parsed = fmt.parse(text)
    assert parsed.tool_calls == [] and len(parsed.errors) == 1, parsed
    return parsed.errors[0]


@pytest.mark.parametrize("body, expected", [
    ('{"name": "f", "arguments": {"a": 1 "b": 2}}',
     "tool call 1: not valid JSON (Expecting ',' delimiter: line 1 column 36 (char 35)); "
     'expected {"name": ..., "arguments": {...}}'),
    ('{"arguments": {}}', 'tool call 1: no name; expected a function name string: {"name": ..., "arguments": {...}}'),
    ('{"name": 7, "arguments": {}}', "tool call 1: name 7; expected a function name string"),
    ('{"name": "f", "arguments": [1, 2]}',
     'tool call 1: arguments is a JSON array; expected a JSON object: {"name": ..., "arguments": {...}}'),
    ('{"name": "f", "arguments": "{bad"}', "tool call 1: arguments string is not valid JSON (Expecting"),
    ('["f", {}]', "tool call 1: a JSON array is not a call"),
])
def test_json_malformed_calls_become_errors(body, expected):
    prefix = "Sure.\n"
    text = prefix + "<tool_call>" + body + "</tool_call>"
    error = _one_error(JsonChatFormat(), text)
    assert error.message.startswith(expected)
    assert error.raw == text[len(prefix):] and error.offset == len(prefix)


def test_deeply_nested_json_is_an_error_not_a_crash():
    deep = "[" * 100_000
    error = _one_error(JsonChatFormat(), f"<tool_call>{deep}</tool_call>")
    assert error.message.startswith("tool call 1: not valid JSON (maximum recursion depth exceeded")
    text = f"<tool_call>\n<function=f>\n<parameter=a>\n{deep}\n</parameter>\n</function>\n</tool_call>"
    assert NemotronChatFormat().parse(text).tool_calls[0].arguments == {"a": deep}


def test_json_unclosed_call_then_good_call():
    text = 'x<tool_call>{"name": "f"\n<tool_call>{"name": "g", "arguments": {"k": [1]}, "id": "mine"}</tool_call>'
    parsed = JsonChatFormat().parse(text)
    assert parsed.tool_calls == [ToolCall("mine", "g", {"k": [1]})]
    [error] = parsed.errors
    assert error.message == ('tool call 1: <tool_call> is not closed; expected '
                             '<tool_call>{"name": ..., "arguments": {...}}</tool_call>')
    assert (error.raw, error.offset) == ('<tool_call>{"name": "f"\n', 1)
    assert parsed.content == "x"


def test_json_missing_arguments_means_no_arguments():
    parsed = JsonChatFormat().parse('<tool_call>{"name": "now"}</tool_call><tool_call>{"name": "now"}</tool_call>')
    assert parsed.tool_calls == [ToolCall("call_0", "now", {}), ToolCall("call_1", "now", {})]


@pytest.mark.parametrize("body, expected", [
    ("\n<function>get_weather</function>\n", "tool call 1: does not start with <function=NAME>; expected"),
    ("\nget_weather(city='Oslo')\n", "tool call 1: does not start with <function=NAME>"),
    ("\n<function=get_weather\n<parameter=city>\nOslo\n</parameter>\n</function>\n",
     "tool call 1: does not start with <function=NAME>"),
    ("\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n",
     "tool call 1: <function=get_weather> is not closed; expected </function> before </tool_call>"),
    ("\n<function=get_weather>\n<parameter=city>\nOslo\n</function>\n",
     "tool call 1: <parameter=city> is not closed; expected VALUE then </parameter>"),
    ("\n<function=get_weather>\ncity: Oslo\n</function>\n",
     "tool call 1: unexpected text 'city: Oslo' inside <function=get_weather>; expected <parameter=ARG>"),
    ("\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=a>\n2\n</parameter>\n</function>\n",
     "tool call 1: parameter 'a' given twice; give each parameter once"),
    ("\n<function=f>\n</function>\ntrailing\n", "tool call 1: unexpected text after </function>"),
])
def test_nemotron_malformed_calls_become_errors(body, expected):
    text = "<tool_call>" + body + "</tool_call>"
    error = _one_error(NemotronChatFormat(), text)
    assert error.message.startswith(expected), error.message
    assert (error.raw, error.offset) == (text, 0)


def test_nemotron_unclosed_tool_call():
    text = "ok\n<tool_call>\n<function=f>\n<parameter=a>\n1"
    error = _one_error(NemotronChatFormat(), text)
    assert error.message.startswith("tool call 1: <tool_call> is not closed; expected <tool_call>\\n<function=NAME>")
    assert (error.raw, error.offset) == (text[3:], 3)


def test_nemotron_call_without_parameters():
    parsed = NemotronChatFormat().parse("<tool_call>\n<function=list_files>\n</function>\n</tool_call>")
    assert parsed.tool_calls == [ToolCall("call_0", "list_files", {})] and parsed.errors == []


MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=", "<function=f>", "</function>",
           "<parameter=", "<parameter=a>", "</parameter>", "<|im_end|>", "{", "}", '"name"', '"arguments"', ":",
           "\n", ">", '{"name": "f", "arguments": {}}']


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.one_of(st.sampled_from(MARKERS), st.text(max_size=6)), max_size=30),
       thinking_open=st.booleans(), with_tools=st.booleans())
def test_parse_never_raises(pieces, thinking_open, with_tools):
    text = "".join(pieces)
    for fmt in (JsonChatFormat(), NemotronChatFormat()):
        parsed = fmt.parse(text, thinking_open=thinking_open, tools=TOOLS if with_tools else None)
        assert isinstance(parsed.content, str)
        assert all(isinstance(c.arguments, dict) and c.name for c in parsed.tool_calls)
        assert all(0 <= e.offset < len(text) and text.startswith(e.raw, e.offset) for e in parsed.errors)
        if not thinking_open and "think>" not in text:
            # Every opened call is accounted for, as a call or as an error.
            assert len(parsed.tool_calls) + len(parsed.errors) == text.count("<tool_call>")
