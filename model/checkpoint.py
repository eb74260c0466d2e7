"""Load NemotronH weights from a Hugging Face checkpoint directory.

The network is built on the `meta` device and given empty storage once; each tensor is then read
from the safetensors files (memory-mapped) and copied into its parameter, so peak memory is the
model plus one tensor. Expert weights stored per expert (`experts.7.up_proj.weight`) are copied
into their slice of the stacked parameter. Every problem — missing, unexpected and mis-shaped
tensors — is collected and reported in one `CheckpointError`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import CheckpointError
from .network import NemotronH

EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mixer\.experts)\.(?P<e>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
STACKED_KEY = re.compile(r"^(.*\.mixer\.experts\.(?:up|down)_proj)\.weight$")  # all experts in one tensor
MAX_LISTED = 12


def weight_files(directory: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (single file, index, or glob)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); it needs a 'weight_map'") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return {name: directory / f for name, f in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no weights in {directory}: expected model.safetensors, or shards with model.safetensors.index.json"
        )
    names: dict[str, Path] = {}
    for f in files:
        with safe_open(f, "pt") as handle:
            names.update(dict.fromkeys(handle.keys(), f))
    return names


def canonical_name(name: str) -> str:
    """Checkpoint name -> our parameter name (transformers-internal `model.` prefix -> `backbone.`)."""
    for prefix in ("model.", "language_model.backbone.", "language_model.model."):
        if name.startswith(prefix):
            return "backbone." + name[len(prefix):]
    if name.startswith("language_model."):
        return name[len("language_model."):]
    return name


def build_model(config: ModelConfig, checkpoint_names: set[str], device: torch.device, dtype: torch.dtype) -> NemotronH:
    """The network with uninitialised storage; the LM head is tied only if the checkpoint has none."""
    tie = config.tie_word_embeddings and "lm_head.weight" not in checkpoint_names
    with torch.device("meta"):
        model = NemotronH(config, tie_word_embeddings=tie).to(dtype)
    model = model.to_empty(device=device)
    if tie:  # moving off `meta` makes new Parameters, so tie again
        model.lm_head.weight = model.backbone.embeddings.weight
    for module in model.modules():  # the router bias stays fp32, as in the reference checkpoints
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias = torch.empty(config.n_routed_experts, device=device)
    return model


def load_weights(model: NemotronH, directory: Path) -> None:
    files = weight_files(directory)
    targets = dict(model.named_parameters(remove_duplicate=True))
    targets.update(model.named_buffers())
    pending = set(targets)
    expert_pending: dict[str, set[int]] = {}
    for name, t in targets.items():
        if name.endswith(("experts.up_proj", "experts.down_proj")):
            expert_pending[name] = set(range(t.shape[0]))
    unexpected, misshaped = [], []

    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(f, "pt", device="cpu") as handle:
                for raw in names:
                    name = canonical_name(raw)
                    m = EXPERT_KEY.match(name)
                    if m:
                        target_name = f"{m['prefix']}.{m['proj']}"
                        target = targets.get(target_name)
                        e = int(m["e"])
                        if target is None or e >= target.shape[0]:
                            unexpected.append(raw)
                            continue
                        dest = target[e]
                    else:
                        stacked = STACKED_KEY.match(name)
                        target_name = stacked[1] if stacked else name
                        target = targets.get(target_name)
                        if target is None:
                            unexpected.append(raw)
                            continue
                        dest = target
                    shape = tuple(handle.get_slice(raw).get_shape())
                    if shape != tuple(dest.shape):  # reported as mis-shaped, not also as missing
                        misshaped.append(f"{raw}: checkpoint {list(shape)}, model expects {list(dest.shape)}")
                    else:
                        dest.copy_(handle.get_tensor(raw))
                    if m:
                        expert_pending[target_name].discard(e)
                        if not expert_pending[target_name]:
                            pending.discard(target_name)
                    else:
                        pending.discard(target_name)
                        expert_pending.pop(target_name, None)

    missing = []
    for name in sorted(pending):
        if name in expert_pending and len(expert_pending[name]) < targets[name].shape[0]:
            missing.append(f"{name} (experts {sorted(expert_pending[name])[:8]})")
        else:
            missing.append(name)
    problems = []
    for label, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:MAX_LISTED]) + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")
            problems.append(f"{label} tensors: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not match its config.json: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights (layer pattern, sizes, MTP layers)."
        )


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> NemotronH:
    """Build a `NemotronH` from a checkpoint directory: fp32 on CPU and bf16 on CUDA by default."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = ModelConfig.from_file(directory / "config.json")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    names = {canonical_name(n) for n in weight_files(directory)}
    model = build_model(config, names, device, dtype)
    load_weights(model, directory)
    return model.eval().requires_grad_(False)  # an inference engine: no autograd bookkeeping
