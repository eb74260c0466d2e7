"""The NemotronH engine: network, checkpoints, tokenizer, chat formats and the batching `Engine`.

>>> from agentrt.model import Engine, Request, SamplingParams, load      # doctest: +SKIP
>>> lm = load("tiny")                               # the embedded default, or a checkpoint path
>>> async with Engine(lm) as engine:
...     ids = lm.chat_format.render(messages)
...     result = await engine.submit(Request(ids, SamplingParams(max_tokens=64))).result()
"""

from .chat import ChatFormat, ParsedMessage, ToolCall, ToolCallError
from .checkpoint import load_model
from .config import ModelConfig
from .engine import Engine, EngineConfig, EngineStats, RequestHandle
from .errors import CheckpointError
from .generate import generate
from .loading import LoadedModel, load
from .network import NemotronH
from .request import Constraint, Request, Result, SamplingParams, ThinkingBudget, TokenEvent
from .state import SequenceState, StateView
from .tokenizer import Tokenizer

__all__ = [
    "ChatFormat",
    "CheckpointError",
    "Constraint",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "LoadedModel",
    "ModelConfig",
    "NemotronH",
    "ParsedMessage",
    "Request",
    "RequestHandle",
    "Result",
    "SamplingParams",
    "SequenceState",
    "StateView",
    "ThinkingBudget",
    "TokenEvent",
    "Tokenizer",
    "ToolCall",
    "ToolCallError",
    "generate",
    "load",
    "load_model",
]
