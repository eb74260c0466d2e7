"""Constrained decoding: whatever the grammar lets through parses, in both chat formats, and validates.

The embedded model has random weights, so the decode loop here nudges the structural tokens (end-think, tool-call
start, end of turn) the way a trained model would prefer them; the nudge changes which allowed path is sampled,
never what the grammar allows. Random walks over the mask (uniform among allowed tokens) stress the odd corners.
"""

from __future__ import annotations

import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from agentrt.model import load
from agentrt.model.chat import ChatFormat, JsonChatFormat, NemotronChatFormat
from agentrt.model.constraints import GrammarBackend
from agentrt.model.generate import sample
from agentrt.model.request import Constraint
from agentrt.model.tokenizer import Tokenizer, builtin_template

# New-token limit per format. The tiny BPE never saw the XML syntax: each <parameter=...> wrapper costs it ~24 tokens.
MAX_NEW = {"json": 120, "nemotron": 200}


def tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    tool("get_weather", "Current weather for a city.", {
        "city": {"type": "string", "enum": ["Oslo", "Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "alerts": {"type": "boolean"},
    }, ["city"]),
    tool("book_truck", "Book a truck between two warehouses.", {
        "origin": {"type": "string", "maxLength": 10},
        "destination": {"type": "string", "minLength": 2, "maxLength": 10},
        "pallets": {"type": "integer", "minimum": 1, "maximum": 33},
        "window": {"type": "object", "properties": {
            "day": {"type": "string", "enum": ["mon", "tue", "wed"]},
            "hour": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["day"]},
    }, ["origin", "destination", "pallets"]),
    tool("send_email", "Send a short email.", {
        "to": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 2},
        "subject": {"type": "string", "maxLength": 16},
        "priority": {"type": ["integer", "null"], "minimum": 1, "maximum": 3},
    }, ["to", "subject"]),
    tool("lookup_price", "Price of a stock-keeping unit.", {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "qty": {"type": "number", "minimum": 0, "maximum": 100},
    }, ["sku"]),
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER = {  # the json_schema constraint
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["ship", "hold", "cancel"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "reasons": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
        "route": {"type": "object", "properties": {"from": {"type": "string", "maxLength": 8},
                                                   "stops": {"type": "integer", "minimum": 0, "maximum": 3}},
                  "required": ["from"]},
    },
    "required": ["verdict", "score"],
}
PROMPT = [{"role": "user", "content": "Book a truck from Oslo to Lima, then tell me the weather."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGENTRT_HOME", str(home))
        lm = load("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token decode steps of a tiny model: threads only add overhead
    yield lm
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def formats(tiny, tmp_path_factory):
    """name -> (tokenizer, chat format, backend): the tiny checkpoint's JSON calls, and its tokenizer with the
    Nemotron 3 template (XML calls)."""
    nemotron = tmp_path_factory.mktemp("nemotron")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tiny.path / name).is_file():
            shutil.copy(tiny.path / name, nemotron / name)
    config = json.loads((nemotron / "tokenizer_config.json").read_text())
    config.update(chat_template=builtin_template("nemotron3"), agentrt_chat_format="nemotron")
    (nemotron / "tokenizer_config.json").write_text(json.dumps(config))
    out = {}
    for name, tok in (("json", tiny.tokenizer), ("nemotron", Tokenizer.from_dir(nemotron))):
        fmt = ChatFormat.for_tokenizer(tok)
        out[name] = tok, fmt, GrammarBackend(tok, fmt, tiny.config.vocab_size)
    assert isinstance(out["json"][1], JsonChatFormat) and isinstance(out["nemotron"][1], NemotronChatFormat)
    return out


@pytest.fixture(scope="module")
def decode(tiny):
    """decode(fmt entry, constraint, thinking, temperature, seed) -> (output text, terminated)."""
    prefilled = {}  # prompt ids -> (state after prefill, last logits); the prompt is read once

    @torch.inference_mode()
    def run(entry, constraint: Constraint, thinking: bool, temperature: float, seed: int) -> tuple[str, bool]:
        tok, fmt, backend = entry
        limit = MAX_NEW["nemotron" if isinstance(fmt, NemotronChatFormat) else "json"]
        prompt = tuple(fmt.render(PROMPT, tools=TOOLS, enable_thinking=thinking))
        if prompt not in prefilled:
            state = tiny.model.new_state()
            prefilled[prompt] = state, tiny.model.logits(tiny.model(torch.tensor(prompt), [state])[-1:])
        model_state, logits = prefilled[prompt]
        model_state = model_state.clone()
        grammar = backend.matcher(constraint, thinking_open=thinking)
        mask = backend.allocate_bitmask(1)
        generator = torch.Generator().manual_seed(seed)
        ids = {m: tok.token_to_id(m) for m in (fmt.think_end, fmt.tool_call_start, fmt.tool_call_end)}
        eos = tok.eos_token_ids[0]
        out: list[int] = []
        for _ in range(limit):
            calls = out.count(ids[fmt.tool_call_end])
            nudge = torch.zeros_like(logits)
            nudge[0, ids[fmt.think_end]] = 6.0
            nudge[0, ids[fmt.tool_call_start]] = 5.0 if calls == 0 else 1.0
            nudge[0, eos] = 2.0 if calls == 0 else 6.0
            logits = logits + nudge
            grammar.fill_mask(mask, 0)
            backend.apply_bitmask(logits, mask)
            token = sample(logits[0], temperature, 1.0, generator)
            assert grammar.accept(token), f"masked sampling produced a rejected token {token}"
            out.append(token)
            if grammar.is_terminated():
                return tok.decode(out), True
            logits = tiny.model.logits(tiny.model(torch.tensor([token]), [model_state]))
        return tok.decode(out), False

    return run


def check_calls(fmt: ChatFormat, text: str, thinking: bool, require_call: bool) -> list[str]:
    parsed = fmt.parse(text, thinking_open=thinking, tools=TOOLS)
    assert not parsed.errors, f"{text!r}: {parsed.errors}"
    for call in parsed.tool_calls:
        assert call.name in PARAMS, text
        jsonschema.validate(call.arguments, PARAMS[call.name])
    if thinking:
        assert parsed.reasoning is not None and fmt.think_end in text, text
        first_call = text.find(fmt.tool_call_start)
        assert first_call < 0 or text.index(fmt.think_end) < first_call, f"a call opened inside reasoning: {text!r}"
    if require_call:
        assert parsed.tool_calls and parsed.content == "", f"required call missing or free text given: {text!r}"
    return [c.name for c in parsed.tool_calls]


@pytest.fixture(scope="module")
def tool_runs(formats, decode):
    """Every combination of format, tool choice, thinking and temperature, decoded once."""
    runs = {}
    for seed, (name, require_call, thinking, temperature) in enumerate(
            (n, r, t, temp) for n in formats for r in (False, True) for t in (False, True) for temp in (1.0, 0.7, 0.0)):
        constraint = Constraint(tools=TOOLS, require_call=require_call)
        runs[name, require_call, thinking, temperature] = decode(formats[name], constraint, thinking, temperature, seed)
    return runs


@pytest.mark.parametrize("name", ["json", "nemotron"])
@pytest.mark.parametrize("require_call", [False, True])
@pytest.mark.parametrize("thinking", [False, True])
def test_tool_outputs_parse_and_validate(formats, tool_runs, name, require_call, thinking):
    fmt = formats[name][1]
    for temperature in (1.0, 0.7, 0.0):
        text, terminated = tool_runs[name, require_call, thinking, temperature]
        assert terminated, f"T={temperature}: no end of turn within {MAX_NEW[name]} tokens: {text!r}"
        check_calls(fmt, text, thinking, require_call)


def test_tool_runs_cover_every_tool(formats, tool_runs):
    called = {}
    for (name, require_call, thinking, _), (text, _) in tool_runs.items():
        called.setdefault(name, set()).update(check_calls(formats[name][1], text, thinking, require_call))
    assert called == {"json": set(PARAMS), "nemotron": set(PARAMS)}


@pytest.mark.parametrize("name", ["json", "nemotron"])
def test_json_schema_output_is_one_valid_json_value(formats, decode, name):
    tok, fmt, backend = formats[name]
    for seed, (thinking, temperature) in enumerate([(False, 1.0), (False, 0.0), (True, 0.7), (True, 1.0)]):
        text, terminated = decode(formats[name], Constraint(json_schema=ANSWER), thinking, temperature, 100 + seed)
        assert terminated, text
        parsed = fmt.parse(text, thinking_open=thinking)
        if thinking:
            assert parsed.reasoning is not None, text
        value = json.loads(parsed.content)
        jsonschema.validate(value, ANSWER)
        assert json.dumps(value, ensure_ascii=False) == parsed.content  # compact: no free whitespace


def random_walk(backend: GrammarBackend, state, rng: random.Random, eos: int, limit: int = 400) -> tuple[list[int], bool]:
    """Sample uniformly among the allowed tokens (end of turn, when allowed, half of the time) until the grammar ends."""
    mask, out = backend.allocate_bitmask(1), []
    bits = torch.arange(32, dtype=torch.int32)
    for _ in range(limit):
        state.fill_mask(mask, 0)
        allowed = ((mask[0].unsqueeze(1) >> bits) & 1).flatten()[: backend.vocab_size].nonzero().flatten().tolist()
        token = eos if eos in allowed and rng.random() < 0.5 else rng.choice(allowed)
        assert state.accept(token)
        out.append(token)
        if state.is_terminated():
            return out, True
    return out, False


HONOURED = {  # JSON-schema keywords xgrammar 0.2.8 enforces (see constraints.py for those it does not)
    "maxLength/minLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "enum/const": {"type": "object", "properties": {"a": {"enum": ["x", 3, None]}, "b": {"const": "k"}},
                   "required": ["a", "b"]},
    "minimum/maximum": {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 40}, "maxItems": 3},
    "exclusive/multipleOf": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 50, "multipleOf": 7},
    "number range": {"type": "number", "minimum": 0.5, "maximum": 2},
    "minItems/maxItems": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "pattern/format": {"type": "array", "prefixItems": [{"type": "string", "pattern": "^[a-c]{2}[0-9]$"},
                                                        {"type": "string", "format": "date"}], "items": False},
    "anyOf/type list": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": ["string", "null"],
                                                                                     "maxLength": 3}]},
    "required/optional/$ref": {"$defs": {"P": {"type": "integer", "minimum": 1, "maximum": 2}}, "type": "object",
                               "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"type": "boolean"}},
                               "required": ["p"]},
    "min/maxProperties": {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 2,
                          "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "boolean"}}},
}


@pytest.mark.parametrize("keyword", list(HONOURED))
def test_json_schema_keywords_are_honoured(formats, keyword):
    backend, schema = formats["json"][2], HONOURED[keyword]
    rng = random.Random(keyword)
    for _ in range(25):
        state = backend.matcher(Constraint(json_schema=schema), thinking_open=False)
        out, terminated = random_walk(backend, state, rng, formats["json"][0].eos_token_ids[0])
        text = formats["json"][0].decode(out[:-1])
        assert terminated, text
        jsonschema.validate(json.loads(text), schema)  # json.loads also rejects raw control characters in strings


@pytest.mark.parametrize("name", ["json", "nemotron"])
def test_random_walks_through_tool_calls_parse(formats, name):
    tok, fmt, backend = formats[name]
    rng, counts = random.Random(name), []
    for i in range(12):
        constraint = Constraint(tools=[TOOLS[i % len(TOOLS)]], require_call=True)
        state = backend.matcher(constraint, thinking_open=False)
        out, terminated = random_walk(backend, state, rng, tok.eos_token_ids[0])
        assert terminated, tok.decode(out)
        counts.append(len(check_calls(fmt, tok.decode(out), thinking=False, require_call=True)))
    assert max(counts) > 1, "no walk made two calls in a row"


def test_unconstrained_rows_are_untouched(formats, tiny):
    _, _, backend = formats["json"]
    logits = torch.randn(3, tiny.config.vocab_size, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    mask = backend.allocate_bitmask(3)
    backend.matcher(Constraint(tools=TOOLS, require_call=True), thinking_open=False).fill_mask(mask, 1)
    backend.apply_bitmask(logits, mask, rows=[])
    assert torch.equal(logits, before)
    backend.apply_bitmask(logits, mask, rows=[1])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1])
    assert 0 < int(allowed.sum()) < 10 and torch.equal(logits[1][allowed], before[1][allowed])


def test_padded_vocab_and_special_tokens_are_masked(formats, tiny):
    tok, fmt, _ = formats["json"]
    vocab = tiny.config.vocab_size + 40
    backend = GrammarBackend(tok, fmt, vocab)
    state = backend.matcher(Constraint(tools=TOOLS), thinking_open=False)
    mask = backend.allocate_bitmask(1)

    def allowed() -> set[int]:
        state.fill_mask(mask, 0)
        logits = torch.zeros(1, vocab)
        backend.apply_bitmask(logits, mask)
        return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())

    ids = {t: tok.token_to_id(t) for t in ("<s>", "<pad>", "<|im_start|>", "<tool_response>", "<tool_call>",
                                           "</tool_call>", "<think>", "</think>", "<|im_end|>")}
    free_text = allowed()
    assert max(free_text) < tok.vocab_size
    assert ids["<tool_call>"] in free_text and ids["<|im_end|>"] in free_text
    assert not free_text & {ids[t] for t in ("<s>", "<pad>", "<|im_start|>", "<tool_response>", "</tool_call>",
                                             "<think>", "</think>")}
    for token in tok.encode('<tool_call>{"name": "book_truck", "arguments": {"origin": "Os'):
        assert state.accept(token)
    in_string = allowed()
    assert tok.encode("lo")[0] in in_string
    assert not in_string & {ids[t] for t in ("<tool_call>", "</tool_call>", "</think>", "<|im_end|>")}


def test_thinking_open_must_close_reasoning_first(formats):
    tok, fmt, backend = formats["nemotron"]
    call = '<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>'
    for thinking, text, ok in [(True, "Oslo it is.\n</think>\n" + call, True), (True, call, False),
                               (False, call, True), (False, "</think>" + call, False)]:
        state = backend.matcher(Constraint(tools=TOOLS, require_call=True), thinking_open=thinking)
        accepted = all(state.accept(t) for t in tok.encode(text)) and state.accept(tok.eos_token_ids[0])
        assert accepted == ok and state.is_terminated() == ok, (thinking, text)


def test_state_works_from_another_thread_forces_and_rolls_back(formats):
    tok, _, backend = formats["json"]
    noop = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
    state = backend.matcher(Constraint(tools=[noop], require_call=True), thinking_open=False)
    prefix = tok.encode('<tool_call>{"name": "noop", "arguments": {}}')

    def step() -> list[int]:  # the engine's mask worker
        mask = backend.allocate_bitmask(2)
        for token in prefix:
            state.fill_mask(mask, 1)
            assert (mask[1, token // 32] >> (token % 32)) & 1
            assert state.accept(token)
        return state.forced_tokens()

    with ThreadPoolExecutor(1) as pool:
        forced = pool.submit(step).result()
    assert forced == [tok.token_to_id("</tool_call>")]
    state.rollback(len(prefix))
    assert not state.accept(tok.encode("hello")[0])  # back at the start, where text is not allowed
    assert all(state.accept(t) for t in prefix + forced + tok.eos_token_ids[:1]) and state.is_terminated()


def test_compiled_grammars_are_cached(formats):
    backend = formats["json"][2]
    constraint = Constraint(tools=TOOLS[:2])
    backend.matcher(constraint, thinking_open=False)
    size = len(backend._cache)
    backend.matcher(Constraint(tools=TOOLS[:2]), thinking_open=False)
    assert len(backend._cache) == size
    backend.matcher(constraint, thinking_open=True)
    assert len(backend._cache) == size + 1


BAD = [
    (Constraint(json_schema={"type": "strin"}), r"json_schema: .*Unsupported type \"strin\""),
    (Constraint(json_schema={"type": "string", "maxLength": "5"}), "maxLength must be an integer"),
    (Constraint(json_schema={"$ref": "#/$defs/missing"}), "json_schema: .*missing"),
    (Constraint(json_schema={"type": "object", "properties": {"a": {}}, "required": ["b"]}),
     r"required \['b'\] are not in `properties`"),
    (Constraint(tools=[]), "non-empty list"),
    (Constraint(tools=[{"type": "function", "function": {"description": "no name"}}]), r"tools\[0\] has name None"),
    (Constraint(tools=[TOOLS[0], TOOLS[0]]), "'get_weather' appears twice"),
    (Constraint(tools=[tool("f", "", {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, [])]),
     "tool 'f' parameters.*minimum greater than maximum"),
    (Constraint(tools=[{"type": "function", "function": {"name": "g", "parameters": {"type": "array"}}}]),
     "tool 'g' parameters must be a JSON Schema of type 'object'"),
]


@pytest.mark.parametrize("name", ["json", "nemotron"])
@pytest.mark.parametrize("constraint, message", BAD)
def test_bad_schemas_raise_clear_errors(formats, name, constraint, message):
    with pytest.raises(ValueError, match=message):
        formats[name][2].matcher(constraint, thinking_open=False)


def test_nemotron_specific_errors_and_unenforced_keywords(formats):
    backend = formats["nemotron"][2]
    top_any_of = {"type": "function", "function": {"name": "h", "parameters": {
        "type": "object", "anyOf": [{"properties": {"a": {"type": "string"}}}]}}}
    with pytest.raises(ValueError, match="tool 'h' parameters: .*top-level \\['anyOf'\\]"):
        backend.matcher(Constraint(tools=[top_any_of]), thinking_open=False)
    bad_key = tool("k", "", {"a<b": {"type": "string"}}, [])
    with pytest.raises(ValueError, match="property name 'a<b'"):
        backend.matcher(Constraint(tools=[bad_key]), thinking_open=False)
    unique = tool("u", "", {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, [])
    with pytest.warns(UserWarning, match="does not enforce \\['uniqueItems'\\]"):
        backend.matcher(Constraint(tools=[unique]), thinking_open=False)
