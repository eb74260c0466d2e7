"""`load()`: the one way in — the embedded default model or any NemotronH checkpoint directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import ChatFormat
from .checkpoint import load_model
from .compute import compute
from .config import ModelConfig
from .errors import CheckpointError
from .network import NemotronH
from .tiny import ensure_tiny
from .tokenizer import Tokenizer


@dataclass(slots=True)
class LoadedModel:
    """A network with the tokenizer and chat format of its checkpoint."""

    model: NemotronH
    tokenizer: Tokenizer
    chat_format: ChatFormat
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-turn ids: the tokenizer's and generation_config's, else config.json's."""
        return self.tokenizer.eos_token_ids or self.config.eos_token_ids


def load(name_or_path: str | Path = "tiny", *, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None) -> LoadedModel:
    """Load "tiny" (the embedded default, created on first use) or a Hugging Face checkpoint directory.

    >>> lm = load("tiny")                                        # doctest: +SKIP
    >>> ids = lm.chat_format.render([{"role": "user", "content": "hi"}])
    """
    return compute.call(_load, name_or_path, device, dtype)  # see compute.py: one thread runs torch


def _load(name_or_path: str | Path, device: str | torch.device | None, dtype: torch.dtype | None) -> LoadedModel:
    if str(name_or_path) == "tiny":
        path = ensure_tiny()
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"model {str(name_or_path)!r} is neither 'tiny' nor an existing checkpoint directory; pass 'tiny' "
                "or the path of a Hugging Face NemotronH checkpoint (config.json, *.safetensors, tokenizer.json)"
            )
    model = load_model(path, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; the tokenizer does not belong to these weights"
        )
    return LoadedModel(model, tokenizer, ChatFormat.for_tokenizer(tokenizer), path)
