"""The NemotronH network: embeddings, the hybrid block stack, final norm, LM head, optional MTP."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Block, Linear, RMSNorm, drop_packed
from .state import SequenceBatchView, SequenceState, StateView


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, t, i) for i, t in enumerate(config.layer_types))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class MTPLayer(Block):
    """One layer of a multi-token-prediction step.

    The first layer of a step fuses the embedding of the next token with the hidden state the
    previous step produced (enorm, hnorm, eh_proj); the last one ends with its own final norm.
    """

    def __init__(self, config: ModelConfig, layer_type: str, layer: int, first: bool, last: bool):
        super().__init__(config, layer_type, layer)
        H, eps = config.hidden_size, config.layer_norm_epsilon
        if first:
            self.enorm, self.hnorm = RMSNorm(H, eps), RMSNorm(H, eps)
            self.eh_proj = Linear(2 * H, H, bias=False)
        if last:
            self.final_layernorm = RMSNorm(H, eps)
        self.first, self.last = first, last


class MTP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        pattern, offset = config.mtp_layer_types, config.num_layers
        n = len(pattern) * config.num_nextn_predict_layers
        self.steps = config.num_nextn_predict_layers
        self.layers = nn.ModuleList(
            MTPLayer(config, pattern[i % len(pattern)], offset + i, i % len(pattern) == 0, i % len(pattern) == len(pattern) - 1)
            for i in range(n)
        )


class NemotronH(nn.Module):
    """NemotronH over a flat token batch, with per-sequence incremental state.

    >>> model = NemotronH(config)                                   # doctest: +SKIP
    >>> state = model.new_state()
    >>> logits = model.logits(model(prompt_ids, [state]))          # prefill
    >>> logits = model.logits(model(torch.tensor([tok]), [state]))  # one decode step
    """

    def __init__(self, config: ModelConfig, tie_word_embeddings: bool | None = None):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        tie = config.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.mtp = MTP(config) if config.num_nextn_predict_layers else None
        self.attn_scale = config.head_dim**-0.5

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def weights_changed(self) -> int:
        """Say that weights were written where torch keeps no version (through `.data`, or by a
        C extension): the packed copies the CPU kernels multiply from are dropped and rebuilt at
        next use. Other writes (`copy_` under `no_grad`, `load_state_dict`, optimizer steps) are
        noticed without this. Returns how many copies were dropped."""
        return drop_packed(self)

    def new_state(self) -> SequenceState:
        return SequenceState(self.config, self.device, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        states: list[SequenceState] | None = None,
        seq_lens: list[int] | None = None,
        view: StateView | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] for the flat token batch `input_ids` [T].

        `seq_lens` splits the T tokens into sequences (default: one sequence). Pass `states`
        (one `SequenceState` per sequence) to continue from and update their caches, or a ready
        `view` (the engine's pools); with neither, every sequence starts fresh and nothing is kept.
        """
        commit = view is None
        view = view if view is not None else self._view(input_ids, states, seq_lens)
        h = self.backbone.embeddings(input_ids)
        for block in self.backbone.layers:
            h = block(h, view)
        if commit:
            view.commit()
        return self.backbone.norm_f(h)

    def _view(self, ids: torch.Tensor, states: list[SequenceState] | None, seq_lens: list[int] | None) -> StateView:
        """A view over per-sequence states (fresh ones when none are given)."""
        seq_lens = [int(ids.shape[0])] if seq_lens is None else list(seq_lens)
        if sum(seq_lens) != ids.shape[0]:
            raise ValueError(f"seq_lens {seq_lens} sum to {sum(seq_lens)}, but {ids.shape[0]} tokens were given")
        states = states if states is not None else [self.new_state() for _ in seq_lens]
        return SequenceBatchView(states, seq_lens, self.attn_scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> fp32 logits [T, vocab]."""
        return self.lm_head(hidden).float()

    def mtp_forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        step: int = 0,
        states: list[SequenceState] | None = None,
        seq_lens: list[int] | None = None,
        view: StateView | None = None,
    ) -> torch.Tensor:
        """One MTP step: from the hidden state at position t and token t+1, the hidden state for t+2.

        hidden: [T, hidden] (the backbone's output, or the previous step's); next_ids: [T].
        Returns [T, hidden]; `logits()` of it are the draft distribution. Caches as in `forward`.
        """
        if self.mtp is None:
            raise ValueError("this checkpoint has no MTP layers (num_nextn_predict_layers == 0)")
        if not 0 <= step < self.mtp.steps:
            raise ValueError(f"MTP step {step} out of range; the checkpoint has {self.mtp.steps}")
        if view is None:  # MTP layers keep their own KV rows in the same states
            view = self._view(next_ids, states, seq_lens)
        per_step = len(self.mtp.layers) // self.mtp.steps
        h = hidden
        for layer in self.mtp.layers[step * per_step : (step + 1) * per_step]:
            if layer.first:
                e = self.backbone.embeddings(next_ids)
                h = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h)], dim=-1))
            h = layer(h, view)
            if layer.last:
                h = layer.final_layernorm(h)
        return h
