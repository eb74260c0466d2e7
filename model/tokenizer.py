"""Tokenizer loading, chat-template rendering with Hugging Face semantics, and streaming detokenization."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError

TEMPLATES_DIR = Path(__file__).parent / "templates"
# Names a message's reasoning may come under; templates read the first (as transformers does).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def builtin_template(name: str) -> str:
    """The text of a chat template shipped with agentrt, e.g. ``builtin_template("tiny")``."""
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
        raise ValueError(f"no built-in chat template {name!r}; expected one of {known}")
    return path.read_text(encoding="utf-8")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes `<>&'`; chat templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once, in the sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or remove the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    # Special tokens are written as "<s>" or as {"content": "<s>", ...}.
    return value.get("content") if isinstance(value, dict) else value


def _template_message(message: Any) -> dict:
    # As transformers does: drop None-valued keys and expose reasoning under `reasoning_content`.
    msg = {k: v for k, v in dict(message).items() if v is not None}
    reasoning = next((msg[k] for k in REASONING_KEYS if k in msg), None)
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return msg


class Tokenizer:
    """A Hugging Face fast tokenizer plus its chat template and special tokens.

    >>> tok = Tokenizer.from_dir("checkpoints/tiny")
    >>> tok.decode(tok.encode("hello world"))
    'hello world'
    >>> ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    """

    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None,
                 generation_config: dict | None = None, chat_template: str | None = None, path: Path | None = None):
        self.backend = tokenizer
        self.config = config or {}
        self.path = path
        self.chat_templates = self._read_templates(self.config.get("chat_template"), chat_template)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.unk_token = _token_text(self.config.get("unk_token"))
        self._check_added_tokens()
        gen = generation_config or {}
        self.bos_token_id = self._id_of(self.bos_token, "bos_token")
        if self.bos_token_id is None and isinstance(gen.get("bos_token_id"), int):
            self.bos_token_id = gen["bos_token_id"]
        self.pad_token_id = self._id_of(self.pad_token, "pad_token")
        if self.pad_token_id is None and isinstance(gen.get("pad_token_id"), int):
            self.pad_token_id = gen["pad_token_id"]
        eos = [self._id_of(self.eos_token, "eos_token")]
        gen_eos = gen.get("eos_token_id")
        eos += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos if i is not None))
        unk_id = tokenizer.token_to_id(self.unk_token) if self.unk_token else None  # unused; absent is harmless
        named = [self.bos_token_id, self.pad_token_id, unk_id, *self.eos_token_ids]
        added = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_token_ids: set[int] = added | {i for i in named if i is not None}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` from a checkpoint dir."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(
                f"no tokenizer.json in {path}; expected a Hugging Face checkpoint directory holding tokenizer.json "
                "(the `tokenizers` fast-tokenizer file) and tokenizer_config.json"
            )
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception on bad files
            raise CheckpointError(f"{file} could not be read by the `tokenizers` library ({e})") from e
        template_file = path / "chat_template.jinja"  # newer transformers save the template beside the config
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return cls(backend, _read_json(path / "tokenizer_config.json"),
                   _read_json(path / "generation_config.json"), template, path)

    @staticmethod
    def _read_templates(value: Any, override: str | None) -> dict[str, str]:
        # tokenizer_config's chat_template is a string or a list of {"name", "template"}.
        templates = {}
        if isinstance(value, str):
            templates["default"] = value
        elif isinstance(value, list):
            templates = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t}
        if override is not None:
            templates["default"] = override
        return templates

    def _check_added_tokens(self) -> None:
        for key, entry in self.config.get("added_tokens_decoder", {}).items():
            text = _token_text(entry)
            actual = self.backend.token_to_id(text)
            if actual != int(key):
                raise CheckpointError(
                    f"tokenizer_config.json puts {text!r} at id {key} but tokenizer.json has it at {actual}; "
                    "the two files come from different tokenizers"
                )

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"tokenizer_config.json {what} {token!r} is not in the vocabulary of tokenizer.json")
        return token_id

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the checkpoint has none."""
        return self.chat_templates.get("default")

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their single ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None, *,
                            add_generation_prompt: bool = True, enable_thinking: bool = True,
                            tokenize: bool = True, **extra: Any) -> list[int] | str:
        """Render `messages` (and tool JSON schemas) with the checkpoint's chat template, as transformers does.

        >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        '<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n<think>\\n'
        """
        name = "tool_use" if tools and "tool_use" in self.chat_templates else "default"
        source = self.chat_templates.get(name)
        if source is None:
            where = self.path or "this tokenizer"
            raise CheckpointError(
                f"{where} has no chat template {name!r}; expected a `chat_template` in tokenizer_config.json "
                "or a chat_template.jinja file"
            )
        specials = dict(bos_token=self.bos_token, eos_token=self.eos_token,
                        unk_token=self.unk_token, pad_token=self.pad_token)
        text = compile_template(source).render(
            **{k: v for k, v in specials.items() if v is not None},
            messages=[_template_message(m) for m in messages], tools=tools,
            add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, **extra,
        )
        # The template writes BOS itself when it wants one, so encoding adds nothing.
        return self.encode(text) if tokenize else text


class IncrementalDecoder:
    """Turns a token stream into text pieces, holding back incomplete UTF-8 sequences.

    Joined, the pieces from `push` and `flush` equal ``tokenizer.decode(all_ids)``.

    >>> dec = IncrementalDecoder(tok)
    >>> "".join(dec.push(i) for i in tok.encode("naïve 東京")) + dec.flush()
    'naïve 東京'
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # Text is emitted up to `read`; decoding restarts at `prefix` so that decoders which treat the first
        # token specially (SentencePiece's leading space) see the same context as a full decode.
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Return what is still held back (bytes that never formed a character decode as U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
