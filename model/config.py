"""NemotronH configuration, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import CheckpointError

LAYER_TYPES = ("linear_attention", "full_attention", "moe", "mlp")
PATTERN_CHARS = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
LEGACY_LAYER_NAMES = {"mamba": "linear_attention", "attention": "full_attention"}
# Older NemotronH configs spell some Mamba fields with a `mamba_` prefix.
LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}
SUPPORTED_MODEL_TYPES = ("nemotron_h",)


def parse_layer_types(value: list[str] | str, what: str) -> list[str]:
    """Turn a `hybrid_override_pattern` string ("M*E-") or a layer-type list into a list of types."""
    if isinstance(value, str):
        bad = sorted(set(value) - set(PATTERN_CHARS))
        if bad:
            raise CheckpointError(
                f"{what} {value!r} has unknown characters {bad}; use M (Mamba), * (attention), E (MoE), - (MLP)"
            )
        return [PATTERN_CHARS[c] for c in value]
    types = [LEGACY_LAYER_NAMES.get(t, t) for t in value]
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise CheckpointError(f"{what} has unknown layer types {bad}; expected each of {list(LAYER_TYPES)}")
    return types


@dataclass(slots=True)
class ModelConfig:
    """The subset of a NemotronH `config.json` the network needs; invariants checked on creation.

    >>> cfg = ModelConfig(vocab_size=64, hidden_size=32, layer_types=["linear_attention", "full_attention"],
    ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    ...                   mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2)
    >>> cfg.mamba_intermediate, cfg.conv_dim
    (32, 64)
    """

    vocab_size: int
    hidden_size: int
    layer_types: list[str]
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    # MLP
    intermediate_size: int = 21504
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    chunk_size: int = 128
    use_bias: bool = False
    time_step_min: float = 0.001
    mamba_hidden_act: str = "silu"
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_layer_types: list[str] = field(default_factory=lambda: ["full_attention", "moe"])
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        self.layer_types = parse_layer_types(self.layer_types, "layer types")
        self.mtp_layer_types = parse_layer_types(self.mtp_layer_types, "MTP layer types")
        problems = []
        if not self.layer_types:
            problems.append("the model has no layers (layers_block_type / hybrid_override_pattern is empty)")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.mamba_num_heads % self.n_groups:
            problems.append(f"mamba_num_heads={self.mamba_num_heads} is not a multiple of n_groups={self.n_groups}")
        if self.n_routed_experts % self.n_group:
            problems.append(f"n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}")
        if self.has("moe") and self.num_experts_per_tok > self.n_routed_experts:
            problems.append(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}"
            )
        if self.topk_group > self.n_group:
            problems.append(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        for act, name in ((self.mlp_hidden_act, "mlp_hidden_act"), (self.mamba_hidden_act, "mamba_hidden_act")):
            if act not in ("relu2", "silu"):
                problems.append(f"{name}={act!r} is not supported (relu2 or silu)")
        if problems:
            raise CheckpointError("invalid NemotronH config: " + "; ".join(problems))

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def has(self, layer_type: str) -> bool:
        mtp = self.mtp_layer_types if self.num_nextn_predict_layers else []
        return layer_type in self.layer_types or layer_type in mtp

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Build from a `config.json` mapping, accepting legacy key spellings and ignoring unknown keys."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {model_type!r}: agentrt runs {list(SUPPORTED_MODEL_TYPES)} checkpoints "
                "(NemotronH, Nemotron Nano 2, Nemotron 3)"
            )
        if raw.get("sliding_window"):
            raise CheckpointError(
                f"sliding_window={raw['sliding_window']} is not supported; NemotronH attention is global"
            )
        raw = {LEGACY_KEYS.get(k, k): v for k, v in raw.items()}
        if raw.get("layers_block_type") is not None:
            raw["layer_types"] = raw["layers_block_type"]
        elif raw.get("hybrid_override_pattern") is not None:
            raw["layer_types"] = raw["hybrid_override_pattern"]
        else:
            raise CheckpointError("config.json names no layers: set `layers_block_type` or `hybrid_override_pattern`")
        mtp = raw.get("mtp_layers_block_type") or raw.get("mtp_hybrid_override_pattern")
        if mtp:
            raw["mtp_layer_types"] = mtp
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("vocab_size", "hidden_size") if k not in raw]
        if missing:
            raise CheckpointError(f"config.json lacks required keys {missing}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} not found: a checkpoint directory needs a Hugging Face config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(raw)
