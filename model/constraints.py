"""Constrained decoding with xgrammar: a JSON schema for the whole output, or a tool-call turn in the chat format's syntax.

One `GrammarBackend` per engine turns each request's `Constraint` into a compiled grammar (cached) and a fresh
`ConstraintState`; per decode step the state fills one row of a token bitmask and the backend applies it to the
logits. Everything here may be called from a worker thread other than the one that built it; one state is used by
one thread at a time.

What the grammars accept (markers are the chat format's `think_end`, `tool_call_start`, ...):
- json_schema: ``[REASONING </think>] [\\n] JSON`` then end of turn; JSON is compact (``, `` and ``: `` separators).
- tools: ``[REASONING </think>] TEXT CALL*`` (``[\\n] CALL+`` with `require_call`; one call at most without
  `parallel_calls`), calls separated by an optional
  newline, then end of turn. REASONING only when `thinking_open`; TEXT and REASONING never contain a marker.
  JsonChatFormat:     ``<tool_call>{"name": "NAME", "arguments": ARGS}</tool_call>``, ARGS compact JSON.
  NemotronChatFormat: ``<tool_call>\\n<function=NAME>\\n`` + ``<parameter=KEY>\\nVALUE\\n</parameter>\\n`` per property
  in schema order (optional ones may be left out) + ``</function>\\n</tool_call>``. VALUE is raw text for a plain
  string property (as the template writes it) and compact JSON for anything else.

Known gaps: xgrammar 0.2.8 does not enforce `uniqueItems`, `not`, `if`/`then`/`else`, `dependentRequired`,
`dependentSchemas`, `contains`, multi-branch `allOf`, and treats overlapping `oneOf` as `anyOf` (a warning names them);
a raw XML string value never contains ``<`` followed by a letter or ``/`` (length-bounded ones no ``<`` at all); a JSON
string value may spell a marker (or ``</parameter>``) out of ordinary tokens: the marker tokens themselves are excluded
when every marker is one special token ("token mode"), and allowed as text otherwise.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections import OrderedDict
from typing import Any

import torch

from .chat import ChatFormat, JsonChatFormat, NemotronChatFormat
from .request import Constraint
from .tokenizer import Tokenizer

# The character classes of xgrammar's JSON string rules let through control characters (length-bounded strings;
# invalid in JSON) and UTF-8-encoded surrogates (all strings; they decode to U+FFFD, changing the length). Narrow
# them; if xgrammar ever prints them differently the replacement is a no-op.
_STRING_CHARS = '[^\\0-\\x1f\\"\\\\\\uD800-\\uDFFF]'
_STRING_CHAR_FIXES = ('[^\\"\\\\\\r\\n]', '[^\\0-\\x1f\\"\\\\\\r\\n]')
_UNENFORCED = ("uniqueItems", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
               "contains", "minContains", "maxContains", "oneOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema
_ANNOTATIONS = {"description", "title", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
_XML_TOP_LEVEL = {"type", "properties", "required", "additionalProperties", "$defs", "definitions", "$schema", "$id",
                  "strict", *_ANNOTATIONS}
_RAW_STRING_KEYS = {"type", "enum", "const", "minLength", "maxLength", *_ANNOTATIONS}
_XML_SAFE_NAME = re.compile(r"[^\s<>]([^<>\n]*[^\s<>])?")


class GrammarBackend:
    """Compiles constraints for one tokenizer and chat format, and applies token bitmasks to logits.

    `vocab_size` is the model's (the logits' width); ids past the tokenizer's vocabulary are always masked, as are
    special tokens other than end-of-turn and the format's markers.

    >>> backend = GrammarBackend(lm.tokenizer, lm.chat_format, lm.config.vocab_size)       # doctest: +SKIP
    >>> state = backend.matcher(Constraint(tools=[weather_schema]), thinking_open=True)
    >>> mask = backend.allocate_bitmask(batch=1)
    >>> state.fill_mask(mask, 0); backend.apply_bitmask(logits, mask)                      # logits: [1, vocab]
    >>> state.accept(token_id)                       # False: the grammar rejects it, finish the request with an error
    """

    def __init__(self, tokenizer: Tokenizer, chat_format: ChatFormat, vocab_size: int, *, cache_size: int = 128):
        import xgrammar as xgr

        if vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
                             "pass the model's vocab_size (config.vocab_size)")
        self._xgr = xgr
        self.chat_format = chat_format
        self.vocab_size = vocab_size
        fmt = chat_format
        self.markers = (fmt.think_start, fmt.think_end, fmt.tool_call_start, fmt.tool_call_end)
        ids = {m: i for m in self.markers if (i := _special_id(tokenizer, m)) is not None}
        # Token mode: every marker is one special token, matched only as that token (never as text inside a JSON
        # string or free text). Otherwise markers are matched as strings.
        self._marker_ids = ids if len(ids) == len(self.markers) else {}
        info = _tokenizer_info(tokenizer, vocab_size, set(ids.values()), token_mode=bool(self._marker_ids))
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # the LRU below caches whole constraints
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint, *, thinking_open: bool) -> ConstraintState:
        """A fresh state for one request; compiles `constraint` or reuses the compiled grammar.

        `thinking_open`: the prompt ends inside a think block, so the output must first close it.
        Raises ValueError when the schema or tool list cannot be compiled, saying what to fix.
        """
        try:
            key = json.dumps([constraint.json_schema, constraint.tools, constraint.require_call,
                              constraint.parallel_calls, thinking_open],
                             ensure_ascii=False, separators=(",", ":"))  # not sorted: property order is generated
        except (TypeError, ValueError) as e:
            raise ValueError(f"constraint is not JSON-serializable ({e}); schemas must be plain JSON data") from None
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            compiled = self._compile(constraint, thinking_open)
            with self._lock:
                self._cache[key] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return ConstraintState(self._xgr.GrammarMatcher(compiled), self.vocab_size)

    def allocate_bitmask(self, batch: int) -> torch.Tensor:
        """A CPU int32 bitmask [batch, ceil(vocab / 32)], all tokens allowed; `ConstraintState.fill_mask` fills rows."""
        return self._xgr.allocate_token_bitmask(batch, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
        """Set disallowed logits to -inf in place. logits: [B, vocab] fp32; bitmask: [B or more, ceil(vocab / 32)].

        Only `rows` are touched (all rows when None), so unconstrained rows keep their logits bit for bit.
        """
        if rows is not None and len(rows) == 0:
            return
        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                              indices=None if rows is None else list(rows))

    # -- grammar construction: structural-tag formats as plain JSON dicts -------------------------------------------

    def _compile(self, constraint: Constraint, thinking_open: bool) -> Any:
        if constraint.json_schema is not None:
            schema = constraint.json_schema
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"json_schema is a {type(schema).__name__}; expected a JSON Schema object (a dict)")
            _check_schema(schema, "json_schema")
            body = _seq(_opt(_const("\n")) if thinking_open else None, _grammar(_json_ebnf(schema, "json_schema")))
        else:
            body = self._tools_format(constraint.tools, constraint.require_call, constraint.parallel_calls)
        fmt = _seq(self._reasoning() if thinking_open else None, body)
        try:
            return self._compiler.compile_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
        except RuntimeError as e:
            raise ValueError(f"the constraint could not be compiled by xgrammar ({_detail(e)})") from None

    def _marker(self, text: str) -> dict:
        token = self._marker_ids.get(text)
        return _const(text) if token is None else {"type": "token", "token": token}

    def _free_text(self, *excluded: str) -> dict:
        if self._marker_ids:
            return {"type": "any_tokens", "exclude_tokens": [self._marker_ids[m] for m in excluded]}
        return {"type": "any_text", "excludes": list(excluded)}

    def _reasoning(self) -> dict:
        # No marker inside: the think block closes before any call starts.
        return _seq(self._free_text(*self.markers), self._marker(self.chat_format.think_end))

    def _tools_format(self, tools: Any, require_call: bool, parallel_calls: bool = True) -> dict:
        if not isinstance(tools, list) or not tools:
            raise ValueError(f"tools is {tools!r}; expected a non-empty list of OpenAI-style tool schemas "
                             '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
        calls, seen = [], set()
        for i, tool in enumerate(tools):
            name, params = _tool_name_and_parameters(tool, i)
            if name in seen:
                raise ValueError(f"tool {name!r} appears twice in tools; give each tool a unique name")
            seen.add(name)
            calls.append(self._call(name, params))
        call = _or(calls)
        if require_call:
            more = _star(_seq(_opt(_const("\n")), call)) if parallel_calls else None
            return _seq(_opt(_const("\n")), call, more)
        repeat = _star if parallel_calls else _opt  # without parallel calls: at most one
        return _seq(self._free_text(*self.markers), repeat(_seq(_opt(_const("\n")), call)))

    def _call(self, name: str, params: dict) -> dict:
        fmt = self.chat_format
        what = f"tool {name!r} parameters"
        _check_schema(params, what)
        if isinstance(fmt, JsonChatFormat):
            head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
            body = [_const(head), _grammar(_json_ebnf(params, what)), _const("}")]
        elif isinstance(fmt, NemotronChatFormat):
            body = [_const(f"\n<function={name}>\n"), *self._xml_parameters(params, what), _const("</function>\n")]
        else:
            raise ValueError(f"{type(fmt).__name__} has no tool-call grammar; tool constraints support "
                             "JsonChatFormat and NemotronChatFormat")
        return _seq(self._marker(fmt.tool_call_start), *body, self._marker(fmt.tool_call_end))

    def _xml_parameters(self, params: dict, what: str) -> list[dict]:
        composite = sorted({"$ref", "anyOf", "oneOf", "allOf"} & set(params))
        if composite:
            raise ValueError(f"{what}: the Nemotron XML call format writes one <parameter=...> per entry of "
                             f"`properties`, so top-level {composite} cannot be expressed; inline it into `properties`")
        ignored = sorted(set(params) - _XML_TOP_LEVEL)
        if ignored:
            warnings.warn(f"{what}: top-level {ignored} are not enforced by the XML call grammar", stacklevel=2)
        properties, required = params.get("properties", {}), params.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise ValueError(f"{what}: `properties` must be an object and `required` a list; got "
                             f"{type(properties).__name__} and {type(required).__name__}")
        defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
        out = []
        for key, schema in properties.items():
            if not _XML_SAFE_NAME.fullmatch(key):
                raise ValueError(f"{what}: property name {key!r} cannot be written as <parameter={key}>; "
                                 "use a name without '<', '>', newlines or surrounding spaces")
            value = self._xml_value(schema, defs, f"{what} property {key!r}")
            param = _seq(_const(f"<parameter={key}>\n"), value, _const("\n</parameter>\n"))
            out.append(param if key in required else _opt(param))
        return out

    @staticmethod
    def _xml_value(schema: Any, defs: dict, what: str) -> dict:
        # Raw text where the template writes raw text and the parser gives it back unchanged, JSON otherwise.
        if isinstance(schema, dict) and schema.get("type") in ("string", ["string"]) and set(schema) <= _RAW_STRING_KEYS:
            choices = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
            if choices is None:
                return _raw_string(schema.get("minLength", 0), schema.get("maxLength"), what)
            if choices and all(isinstance(c, str) and _raw_safe(c) for c in choices):
                return _or([_const(c) for c in choices])
        sub = {**schema, **defs} if isinstance(schema, dict) else schema
        return _grammar(_json_ebnf(sub, what))


class ConstraintState:
    """One request's position in its grammar; use it from one thread at a time (any thread)."""

    __slots__ = ("_matcher", "_vocab_size", "_scratch")

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._scratch: torch.Tensor | None = None

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a CPU tensor from `allocate_bitmask`)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. False when the grammar rejects it: the state is unchanged and the engine
        must finish the request with finish reason "error" (this only happens if the mask was not applied)."""
        return bool(self._matcher.accept_token(int(token_id)))

    def is_terminated(self) -> bool:
        """True once the grammar has accepted an end-of-turn token; nothing more may be generated."""
        return bool(self._matcher.is_terminated())

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (speculative decoding)."""
        self._matcher.rollback(n)

    def forced_tokens(self, limit: int = 16) -> list[int]:
        """The tokens the grammar forces next, in order: each is the only token allowed at its step. Does not
        change the state; accept them to skip their forward passes' sampling."""
        if self._scratch is None:
            self._scratch = torch.empty((1, (self._vocab_size + 31) // 32), dtype=torch.int32)
        matcher, out = self._matcher.fork(), []
        while len(out) < limit and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(self._scratch, 0)
            words = self._scratch[0].nonzero()
            if len(words) != 1:
                break
            word = int(self._scratch[0, words[0, 0]]) & 0xFFFFFFFF
            if word & (word - 1):
                break
            token = int(words[0, 0]) * 32 + word.bit_length() - 1
            matcher.accept_token(token)
            out.append(token)
        return out


def _special_id(tokenizer: Tokenizer, text: str) -> int | None:
    # The id of `text` when the tokenizer encodes it as one special token.
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 and ids[0] in tokenizer.special_token_ids else None


def _tokenizer_info(tokenizer: Tokenizer, vocab_size: int, marker_ids: set[int], *, token_mode: bool) -> Any:
    """xgrammar's view of the vocabulary: special tokens are not text. End-of-turn ids keep their text (xgrammar
    allows them only where the grammar may end). Marker ids keep their text in string mode; in token mode they get a
    placeholder no text rule matches (0xFF bytes), so only the grammar's token rules produce them. Other specials
    are empty, which xgrammar never allows."""
    import xgrammar as xgr

    vocab_type = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
    kind, add_prefix_space = vocab_type["vocab_type"], vocab_type["add_prefix_space"]
    placeholder = {xgr.VocabType.BYTE_LEVEL: "ÿÿ", xgr.VocabType.BYTE_FALLBACK: "<0xFF>"}.get(kind, b"\xff\xff")
    stop_ids = [i for i in tokenizer.eos_token_ids if i < vocab_size]
    encoded: list[str | bytes] = [""] * vocab_size
    for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            encoded[i] = token
    for i in tokenizer.special_token_ids:
        if i < vocab_size and i not in stop_ids:
            encoded[i] = (placeholder if token_mode else encoded[i]) if i in marker_ids else ""
    return xgr.TokenizerInfo(encoded, kind, vocab_size=vocab_size, stop_token_ids=stop_ids or None,
                             add_prefix_space=add_prefix_space)


def _tool_name_and_parameters(tool: Any, index: int) -> tuple[str, dict]:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict):
        raise ValueError(f"tools[{index}] is {tool!r}; expected "
                         '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
    name = fn.get("name")
    if not isinstance(name, str) or not _XML_SAFE_NAME.fullmatch(name):
        raise ValueError(f"tools[{index}] has name {name!r}; expected a non-empty function name without spaces "
                         "around it, '<', '>' or newlines")
    params = fn.get("parameters")
    if params is None:
        return name, {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ValueError(f"tool {name!r} parameters must be a JSON Schema of type 'object' (arguments are a JSON "
                         f"object); got {json.dumps(params)[:80]}")
    return name, params


def _check_schema(schema: Any, what: str) -> None:
    """Raise on contradictions xgrammar accepts silently; warn about keywords it does not enforce."""
    unenforced: set[str] = set()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}/{i}")
            return
        if not isinstance(node, dict):
            return
        unenforced.update(k for k in _UNENFORCED if k in node)
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            unenforced.add("allOf")
        props, required = node.get("properties"), node.get("required")
        if isinstance(required, list) and node.get("additionalProperties", False) is False:
            missing = [r for r in required if r not in (props if isinstance(props, dict) else {})]
            if missing:
                raise ValueError(f"{what}{' at ' + path if path else ''}: required {missing} are not in "
                                 "`properties`, so no output could satisfy the schema; add them to `properties` or "
                                 "drop them from `required`")
        for key, value in node.items():
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for name, sub in value.items():
                    walk(sub, f"{path}/{key}/{name}")
            elif key not in _SCHEMA_MAPS and key not in ("enum", "const", "default", "examples", "required"):
                walk(value, f"{path}/{key}")

    walk(schema, "")
    if unenforced:
        warnings.warn(f"{what}: constrained decoding does not enforce {sorted(unenforced)} (xgrammar limitation); "
                      "validate the output after parsing", stacklevel=2)


def _json_ebnf(schema: Any, what: str) -> str:
    """Compact JSON (no free whitespace) for `schema`, as EBNF text."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    except RuntimeError as e:
        raise ValueError(f"{what}: not a JSON Schema xgrammar can compile ({_detail(e)}); fix the schema") from None
    ebnf = str(grammar)
    for chars in _STRING_CHAR_FIXES:
        ebnf = ebnf.replace(chars, _STRING_CHARS)
    return ebnf


def _raw_string(min_length: int, max_length: int | None, what: str) -> dict:
    # Raw XML text the parser keeps as is: first character not a quote or space (else it could decode as a JSON
    # string), no tag inside. Bounded lengths count characters, so '<' is left out entirely there.
    if not isinstance(min_length, int) or not (max_length is None or isinstance(max_length, int)):
        raise ValueError(f"{what}: minLength/maxLength must be integers; got {min_length!r}, {max_length!r}")
    if max_length is not None and max_length < min_length:
        raise ValueError(f"{what}: maxLength {max_length} < minLength {min_length}; no string fits")
    if max_length == 0:
        return _const("")
    first, char = '[^<" \\t\\n\\r\\uD800-\\uDFFF]', "[^<\\uD800-\\uDFFF]"  # no surrogates: see _STRING_CHARS
    if max_length is None and min_length <= 1:
        body = f"{first}({char}|<[^/<A-Za-z\\uD800-\\uDFFF])*"
    else:
        upper = "" if max_length is None else str(max_length - 1)
        body = f"{first}{char}{{{max(min_length - 1, 0)},{upper}}}"
    return {"type": "regex", "pattern": f"({body})?" if min_length == 0 else body}


def _raw_safe(value: str) -> bool:
    # Written raw, `value` parses back to itself: no tag character, and it does not decode as a JSON string.
    try:
        decoded = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        decoded = None
    return "<" not in value and not isinstance(decoded, str)


def _detail(error: Exception) -> str:
    # xgrammar prefixes C++ errors with "[time] /path/file.cc:123: "; keep the message.
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(error).strip())


def _const(value: str) -> dict:
    return {"type": "const_string", "value": value}


def _grammar(ebnf: str) -> dict:
    return {"type": "grammar", "grammar": ebnf}


def _seq(*elements: dict | None) -> dict:
    kept = [e for e in elements if e is not None]
    return kept[0] if len(kept) == 1 else {"type": "sequence", "elements": kept}


def _or(elements: list[dict]) -> dict:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": elements}


def _opt(content: dict) -> dict:
    return {"type": "optional", "content": content}


def _star(content: dict) -> dict:
    return {"type": "star", "content": content}
