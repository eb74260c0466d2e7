"""The NemotronH engine: network, checkpoints, tokenizer and chat formats.

>>> from agentrt.model import load                  # doctest: +SKIP
>>> lm = load("tiny")                               # the embedded default, or a checkpoint path
>>> hidden = lm.model(torch.tensor(lm.chat_format.render(messages)))
"""

from .chat import ChatFormat, ParsedMessage, ToolCall, ToolCallError
from .checkpoint import load_model
from .config import ModelConfig
from .errors import CheckpointError
from .generate import generate
from .loading import LoadedModel, load
from .network import NemotronH
from .state import SequenceState, StateView
from .tokenizer import Tokenizer

__all__ = [
    "ChatFormat",
    "CheckpointError",
    "LoadedModel",
    "ModelConfig",
    "NemotronH",
    "ParsedMessage",
    "SequenceState",
    "StateView",
    "Tokenizer",
    "ToolCall",
    "ToolCallError",
    "generate",
    "load",
    "load_model",
]
