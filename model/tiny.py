"""The embedded default model: a small random NemotronH written as a Hugging Face checkpoint.

It has every layer type (Mamba-2, attention, MLP, LatentMoE) and one MTP step, so the CPU path
exercises the same code as a real Nemotron 3 checkpoint, and it goes through the same loader.
Creation is deterministic: the same files, byte for byte, on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .network import NemotronH

TINY_VERSION = "1"
TINY_CONFIG = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 2048,
    "hidden_size": 256,
    "hybrid_override_pattern": "M*M-MEM*E",
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 768,
    "mlp_hidden_act": "relu2",
    "mamba_num_heads": 8,
    "mamba_head_dim": 32,
    "ssm_state_size": 32,
    "n_groups": 2,
    "conv_kernel": 4,
    "chunk_size": 64,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 256,
    "moe_shared_expert_intermediate_size": 512,
    "moe_latent_size": 128,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1,
    "mtp_hybrid_override_pattern": "*E",
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": False,  # transformers does not tie NemotronH heads; keep it loadable there
    "max_position_embeddings": 8192,
    "torch_dtype": "float32",
}


def tiny_dir() -> Path:
    """Where the embedded model lives: `$AGENTRT_HOME/models/tiny-v<N>` (default `~/.cache/agentrt`)."""
    home = Path(os.environ.get("AGENTRT_HOME", Path.home() / ".cache" / "agentrt"))
    return home / "models" / f"tiny-v{TINY_VERSION}"


def _init_weights(model: NemotronH, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
            elif name.endswith("dt_bias"):  # softplus^-1 of steps spread over [1e-3, 1e-1]
                dt = torch.exp(torch.rand(p.shape, generator=g) * (torch.log(torch.tensor(100.0))) + torch.log(torch.tensor(1e-3)))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif p.dim() == 1:
                p.fill_(1.0) if ("norm" in name or name.endswith(".D")) else p.zero_()
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def checkpoint_tensors(model: NemotronH) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names: experts split per expert, tied head left out."""
    out = {}
    tied = model.lm_head.weight is model.backbone.embeddings.weight
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith((".experts.up_proj", ".experts.down_proj")):
            base, proj = name.rsplit(".", 1)
            out.update({f"{base}.{e}.{proj}.weight": t[e].contiguous() for e in range(t.shape[0])})
        else:
            out[name] = t.contiguous()
    return out


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> None:
    """Write the embedded model (config, weights, tokenizer, chat template) into `directory`."""
    from .tiny_tokenizer import TINY_EOS_TOKENS, write_tiny_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    cfg = dict(TINY_CONFIG, bos_token_id=ids["<s>"], pad_token_id=ids["<pad>"], eos_token_id=ids[TINY_EOS_TOKENS[0]])
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": ids["<s>"], "eos_token_id": [ids[t] for t in TINY_EOS_TOKENS], "pad_token_id": ids["<pad>"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    model = NemotronH(ModelConfig.from_dict(cfg))
    _init_weights(model, seed)
    save_file(checkpoint_tensors(model), directory / "model.safetensors", metadata={"format": "pt"})


def ensure_tiny() -> Path:
    """The embedded model's directory, created on first use (atomically, safe across processes)."""
    target = tiny_dir()
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_checkpoint(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
