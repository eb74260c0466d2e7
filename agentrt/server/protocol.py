"""The OpenAI wire format the server accepts: request bodies as pydantic models, errors as OpenAI error bodies.

Validation happens here, once, so the handlers only see well-formed requests; every problem becomes an
`ApiError` whose body names the offending field (`param`) the way the OpenAI API does.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_THINKING_GRACE = 32  # tokens a reasoning line may run past max_thinking_tokens (same as ChatOptions)


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do: clients send vendor extras freely.
    model_config = ConfigDict(extra="ignore")


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` if it is a valid JSON Schema, else a ValueError saying where it is not."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise ValueError(f"not a valid JSON Schema at {where}: {e.message}") from None
    return schema


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    _valid_parameters = field_validator("parameters")(_json_schema)


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    _valid_schema = field_validator("schema_")(_json_schema)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object: {"name": ..., "schema": {...}}')
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for i, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i} has type {part.get('type')!r}; only text parts "
                                     '({"type": "text", "text": "..."}) are supported')
            return "".join(part["text"] for part in content)
        return content

    @model_validator(mode="after")
    def _content_where_needed(self) -> Message:
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def for_template(self) -> dict:
        """The message as the chat template expects it (developer messages are system messages)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        return out


class SamplingFields(_Body):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # vendor extension (vLLM, SGLang): 0 is off
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vendor extension
    return_token_ids: bool = False  # vendor extension (as vLLM): prompt and output token ids in the response

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Any) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 16:
            raise ValueError(f"{len(stops)} stop sequences given; at most 16 are allowed")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence is empty; give non-empty strings")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n}: only one choice per request is supported; send n requests instead "
                             "(they share the prompt's cache)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value != 0:
            raise ValueError(f"{value} is not supported: the engine has no repetition penalties; use 0")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_thinking_tokens: int | None = Field(default=None, ge=0)  # NVIDIA's reasoning budget field
    thinking_grace_tokens: int | None = Field(default=None, ge=0)  # agentrt: how far a line may run past it
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: {"enable_thinking": false}

    @field_validator("top_logprobs")
    @classmethod
    def _sampled_only(cls, value: int | None) -> int | None:
        if value:
            raise ValueError(f"{value} alternatives were asked for, but the engine reports only the sampled "
                             "token's logprob; use logprobs=true with top_logprobs 0 or unset")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: function names must be unique, got {names}")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not among the "
                             f"tools {names}")
        if choice == "required" and not names:
            raise ValueError('tool_choice "required" needs tools')
        wants_json = self.response_format is not None and self.response_format.type != "text"
        if wants_json and names and self.tool_choice != "none":
            raise ValueError('response_format json_schema/json_object cannot be combined with tool calls; '
                             'set tool_choice "none" or drop the tools')
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def enable_thinking(self) -> bool:
        kwargs = self.chat_template_kwargs or {}
        return bool(kwargs.get("enable_thinking", True)) and self.max_thinking_tokens != 0


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] = Field()
    logprobs: int | None = Field(default=None, ge=0, le=0)  # the sampled token's logprob only
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"{len(prompt)} prompts given; send one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty; give text or token ids")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported; the prompt is not repeated in the output")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this model")
        return suffix


def parse_body(raw: bytes, model: type[BaseModel]) -> tuple[Any, dict]:
    """The validated request and the JSON object it came from, or an `ApiError` 400 naming the
    first bad field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body is a JSON {type(data).__name__}; send a JSON object")
    try:
        return model.model_validate(data), data
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(error: ValidationError) -> ApiError:
    """The first problem of a pydantic error as an OpenAI 400, with `param` the dotted field path."""
    first = error.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"] if not _is_type_tag(p)]
    param = ".".join(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "this field is required"
    got = first.get("input")
    detail = f"{param}: {message}" if param else message
    if first["type"] not in ("missing",) and not isinstance(got, (dict, list)) and got is not None:
        detail += f" (got {got!r:.80})"
    more = error.error_count() - 1
    if more:
        detail += f"; and {more} more problem{'s' if more > 1 else ''}"
    return ApiError(400, detail, param=param)


def _is_type_tag(part: Any) -> bool:
    # pydantic puts the union member tried into the location (e.g. "str", "list[int]", "function-after[...]")
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list",
                                                               "NamedToolChoice"))
