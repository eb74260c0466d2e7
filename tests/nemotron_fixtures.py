"""Random NemotronH checkpoints written with transformers, the numerical oracle for our network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    mamba_num_heads=8,
    mamba_head_dim=4,
    ssm_state_size=8,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24,
)

# name -> (config overrides, save options). Together they cover: several Mamba groups, GQA ratio 1
# and 4, MoE with shared expert + correction bias + group-limited routing, LatentMoE, plain MLP
# layers, an attention-free stack, MTP layers, sharded checkpoints and a tied LM head.
CONFIGS = {
    "groups4_mha": (dict(hybrid_override_pattern="M*M-M*", n_groups=4, num_attention_heads=4, num_key_value_heads=4), {}),
    "moe_gqa4_grouped": (
        dict(hybrid_override_pattern="ME*EM", num_attention_heads=8, num_key_value_heads=2, n_group=4, topk_group=2,
             num_experts_per_tok=3, routed_scaling_factor=2.5),
        {},
    ),
    "latent_moe_sharded": (
        dict(hybrid_override_pattern="M*EME", hidden_size=48, moe_latent_size=16, num_experts_per_tok=2),
        {"max_shard_size": "20KB"},
    ),
    "attention_free_tied": (dict(hybrid_override_pattern="MM-ME", tie_word_embeddings=True), {"drop_lm_head": True}),
    "mtp": (
        dict(hybrid_override_pattern="M*E-", num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E"),
        {"mtp": True},
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every weight a scale that makes logits O(1), so a 1e-4 tolerance means something."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 15 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(rand(p.shape) * 2.5 - 3.0)  # some heads below the dt floor
            elif name.endswith("e_score_correction_bias"):
                p.copy_(rand(p.shape) * 0.1)
            elif "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.2 * rand(p.shape))
            elif "embeddings" in name:
                p.copy_(rand(p.shape))
            elif p.dim() == 1:
                p.copy_(rand(p.shape) * 0.2)
            else:
                p.copy_(rand(p.shape) / math.sqrt(p.shape[-1]))


def mtp_tensors(config, seed: int) -> dict[str, torch.Tensor]:
    """Random MTP weights in the Nemotron 3 Super layout (transformers itself ignores `mtp.*`)."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock

    g = torch.Generator().manual_seed(seed)
    H, pattern = config.hidden_size, config.mtp_layers_block_type
    out = {}
    for i in range(config.num_nextn_predict_layers * len(pattern)):
        sub = type(config).from_dict({**config.to_dict(), "layers_block_type": [pattern[i % len(pattern)]]})
        block = NemotronHBlock(sub, layer_idx=0)
        randomize(block, seed + i)
        out.update({f"mtp.layers.{i}.{k}": v.contiguous() for k, v in block.state_dict().items()})
        if i % len(pattern) == 0:
            out[f"mtp.layers.{i}.enorm.weight"] = 1 + 0.2 * torch.randn(H, generator=g)
            out[f"mtp.layers.{i}.hnorm.weight"] = 1 + 0.2 * torch.randn(H, generator=g)
            out[f"mtp.layers.{i}.eh_proj.weight"] = torch.randn(H, 2 * H, generator=g) / math.sqrt(2 * H)
        if i % len(pattern) == len(pattern) - 1:
            out[f"mtp.layers.{i}.final_layernorm.weight"] = 1 + 0.2 * torch.randn(H, generator=g)
    # per-expert names, as NVIDIA's checkpoints store them
    for name in [n for n in out if n.endswith((".experts.up_proj", ".experts.down_proj"))]:
        stacked = out.pop(name)
        for e in range(stacked.shape[0]):
            out[f"{name.rsplit('.', 1)[0]}.{e}.{name.rsplit('.', 1)[1]}.weight"] = stacked[e].contiguous()
    return out


def write_checkpoint(name: str, directory: Path, seed: int = 0):
    """Build, randomise and save a transformers NemotronH; return the (eval-mode) oracle model."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    overrides, opts = CONFIGS[name]
    config = NemotronHConfig(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config).eval()
    randomize(model, seed)
    if opts.get("drop_lm_head"):  # a tied head: same values, and no lm_head tensor on disk
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    model.save_pretrained(directory, max_shard_size=opts.get("max_shard_size", "5GB"))
    if opts.get("drop_lm_head"):
        _rewrite(directory, lambda tensors: {k: v for k, v in tensors.items() if k != "lm_head.weight"})
    if opts.get("mtp"):
        _add_shard(directory, "mtp.safetensors", mtp_tensors(config, seed + 100))
    return model


def _rewrite(directory: Path, edit) -> None:
    from safetensors.torch import load_file

    for f in directory.glob("*.safetensors"):
        tensors = load_file(f)
        save_file(edit(tensors), f, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in _all_names(directory)}
        index.write_text(json.dumps(data))


def _all_names(directory: Path) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names.update(h.keys())
    return names


def _add_shard(directory: Path, filename: str, tensors: dict[str, torch.Tensor]) -> None:
    """Add a shard and (re)write the index so the checkpoint is sharded with an index."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {}
        for f in directory.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                weight_map.update(dict.fromkeys(h.keys(), f.name))
    save_file(tensors, directory / filename, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, filename))
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
