"""Tokenizer loading, chat templates (checked against transformers), streaming decode, the tiny tokenizer."""

import json
import shutil
import time

import jinja2
import pytest

from agentrt.model.errors import CheckpointError
from agentrt.model.tiny_tokenizer import TINY_EOS_TOKENS, TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE, write_tiny_tokenizer
from agentrt.model.tokenizer import IncrementalDecoder, Tokenizer, builtin_template

UNICODE_TEXTS = [
    "Hello, world!",
    "naïve café in Zürich costs 12,50 € — “quoted”",
    "東京 and Москва, emoji 😀🚚 and a clef 𝄞",
    "  leading and trailing spaces \n\ttabs\n",
    'def f(x):\n    return {"a": [1, 2.5, null]}',
]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web <fast> & cheap.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "Hi there"}],
    "system_and_history": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
        {"role": "user", "content": "and 3+3?"},
    ],
    "tool_calls_and_grouped_results": [
        {"role": "user", "content": "Weather in Oslo and Zürich, then search news."},
        {"role": "assistant", "content": None, "reasoning_content": "Two cities.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"id": "b", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}},
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "-3 °C, snow"},
        {"role": "tool", "tool_call_id": "b", "content": '{"temp": 4, "sky": "clear"}'},
        {"role": "assistant", "content": "Let me search.", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": {"query": "news <today>"}}}]},
        {"role": "tool", "content": "nothing new"},
        {"role": "assistant", "content": "Oslo snows, Zürich is clear; no news.", "thinking": "Summarize."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def nemotron_dir(tiny_dir, tmp_path_factory):
    """The tiny tokenizer carrying the Nemotron 3 fixture template (and no explicit chat format)."""
    path = tmp_path_factory.mktemp("nemotron")
    for f in tiny_dir.iterdir():
        shutil.copy(f, path / f.name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = builtin_template("nemotron3")
    del config["agentrt_chat_format"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def copy_with(src, dst, **files):
    """Copy a tokenizer dir into `dst`, overwriting the named JSON files (name_json=dict)."""
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    for name, data in files.items():
        (dst / name.replace("_json", ".json")).write_text(json.dumps(data))
    return dst


def test_missing_tokenizer_json_names_path_and_expectation(tmp_path):
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_added_tokens_decoder_disagreeing_with_tokenizer_json(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["7"]["content"] = "<think>"  # really id 6
    bad = copy_with(tiny_dir, tmp_path / "bad", tokenizer_config_json=config)
    with pytest.raises(CheckpointError, match=r"'<think>' at id 7 but tokenizer.json has it at 6"):
        Tokenizer.from_dir(bad)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_specials_are_single_ids(tok):
    assert tok.vocab_size == TINY_VOCAB_SIZE == 2048
    for i, special in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.encode(special) == [i]
        assert tok.token_to_id(special) == i and tok.id_to_token(i) == special
    ids = tok.encode("a<think>b</think><tool_call>{}</tool_call>")
    assert [i for i in ids if i < len(TINY_SPECIAL_TOKENS)] == [6, 7, 8, 9]
    assert tok.special_token_ids == set(range(len(TINY_SPECIAL_TOKENS)))
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_ids) == (1, 3, [5])
    assert tok.decode(ids, skip_special_tokens=True) == "ab{}"


def test_eos_ids_union_config_and_generation_config(tiny_dir, tmp_path):
    listed = copy_with(tiny_dir, tmp_path / "listed", generation_config_json={"eos_token_id": [2, 5, 2]})
    assert Tokenizer.from_dir(listed).eos_token_ids == [5, 2]
    single = copy_with(tiny_dir, tmp_path / "single", generation_config_json={"eos_token_id": 2})
    assert Tokenizer.from_dir(single).eos_token_ids == [5, 2]
    assert [Tokenizer.from_dir(listed).token_to_id(t) for t in TINY_EOS_TOKENS] == [5, 2]


def test_special_tokens_given_as_dicts(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "</s>", "special": True}
    tok = Tokenizer.from_dir(copy_with(tiny_dir, tmp_path / "d", tokenizer_config_json=config))
    assert tok.eos_token == "</s>" and tok.eos_token_ids == [2]


@pytest.fixture(scope="module")
def hf_tokenizers(tiny_dir, nemotron_dir):
    transformers = pytest.importorskip("transformers")
    return {d: transformers.AutoTokenizer.from_pretrained(d) for d in (tiny_dir, nemotron_dir)}


@pytest.mark.parametrize("which", ["tiny", "nemotron"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(hf_tokenizers, tiny_dir, nemotron_dir, which, conversation,
                                            with_tools, enable_thinking, add_generation_prompt):
    path = tiny_dir if which == "tiny" else nemotron_dir
    ours, hf = Tokenizer.from_dir(path), hf_tokenizers[path]
    kwargs = dict(tools=[WEATHER, SEARCH] if with_tools else None, add_generation_prompt=add_generation_prompt,
                  enable_thinking=enable_thinking)
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = ours.apply_chat_template(messages, **kwargs)
    assert ids == hf.apply_chat_template(messages, return_dict=False, **kwargs)
    assert ours.decode(ids) == text
    assert ids.count(ours.token_to_id("<|im_start|>")) == text.count("<|im_start|>")
    if add_generation_prompt:
        assert text.endswith("<|im_start|>assistant\n" + ("<think>\n" if enable_thinking else "<think></think>"))
    assert ("<tools>" in text) == with_tools


def test_tiny_tokenizer_loads_in_transformers(tiny_dir, hf_tokenizers, tok):
    hf = hf_tokenizers[tiny_dir]
    for text in UNICODE_TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_token_id, 5, tok.pad_token_id)
    assert len(hf) == TINY_VOCAB_SIZE


def test_template_helpers_behave_like_transformers(tiny_dir, hf_tokenizers, tmp_path):
    source = ("{{ data | tojson }}|{{ data | tojson(indent=2, sort_keys=True) }}|"
              "{{ data | tojson(separators=(',', ':')) }}|{{ strftime_now('%Y') | length }}"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = source
    tok = Tokenizer.from_dir(copy_with(tiny_dir, tmp_path / "t", tokenizer_config_json=config))
    data = {"b": "<tag> & 'ü'", "a": [1, None]}
    messages = [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]
    ours = tok.apply_chat_template(messages, tokenize=False, data=data)
    assert ours == hf_tokenizers[tiny_dir].apply_chat_template(messages, chat_template=source, tokenize=False,
                                                                data=data)
    assert '"<tag> & \'ü\'"' in ours and ours.endswith("|4x")


def test_raise_exception_and_missing_template(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('only user turns, got ' + messages[0].role) }}"
    tok = Tokenizer.from_dir(copy_with(tiny_dir, tmp_path / "raise", tokenizer_config_json=config))
    with pytest.raises(jinja2.TemplateError, match="only user turns, got system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    del config["chat_template"]
    tok = Tokenizer.from_dir(copy_with(tiny_dir, tmp_path / "none", tokenizer_config_json=config))
    with pytest.raises(CheckpointError, match="no chat template 'default'"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_named_templates_and_template_file(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    path = copy_with(tiny_dir, tmp_path / "named", tokenizer_config_json=config)
    tok = Tokenizer.from_dir(path)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "D"
    assert tok.apply_chat_template(messages, [WEATHER], tokenize=False) == "T"
    (path / "chat_template.jinja").write_text("F{{ bos_token }}")
    assert Tokenizer.from_dir(path).apply_chat_template(messages) == [tok.token_to_id("F"), 1]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_incremental_decoder_equals_full_decode(tok, text):
    ids = tok.encode("<|im_start|>" + text + "<|im_end|>")
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("𝄞")  # a 4-byte character the tiny vocabulary never merged
    assert len(ids) == 4
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids] == ["", "", "", "𝄞"]
    dec.push(ids[0])  # a lone lead byte is held back, then flushed as a replacement character
    assert dec.flush() == "\ufffd"


def test_incremental_decoder_skips_specials(tok):
    dec = IncrementalDecoder(tok, skip_special_tokens=True)
    ids = tok.encode("<think>hi</think> there")
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "hi there"


def test_write_tiny_tokenizer_is_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    write_tiny_tokenizer(tmp_path / "a")
    elapsed = time.perf_counter() - start
    write_tiny_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert elapsed < 5.0
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == builtin_template("tiny") and config["agentrt_chat_format"] == "json"


def test_builtin_template_unknown_name():
    with pytest.raises(ValueError, match=r"no built-in chat template 'nope'; expected one of \['nemotron3', 'tiny'\]"):
        builtin_template("nope")
