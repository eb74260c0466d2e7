"""Every bad checkpoint gives one clear CheckpointError naming what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from agentrt.model.checkpoint import load_model
from agentrt.model.errors import CheckpointError
from nemotron_fixtures import write_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    write_checkpoint("moe_gqa4_grouped", directory)
    return directory


@pytest.fixture
def ckpt(good, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(good, directory)
    return directory


def edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (directory / "config.json").write_text(json.dumps(cfg))


def error_of(directory) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(directory, "cpu")
    return str(info.value)


def test_good_checkpoint_loads(good):
    assert load_model(good, "cpu").config.num_layers == 5


def test_missing_tensor_is_named(ckpt):
    edit_weights(ckpt, lambda t: t.pop("backbone.layers.2.mixer.q_proj.weight"))
    msg = error_of(ckpt)
    assert "missing tensors: backbone.layers.2.mixer.q_proj.weight" in msg


def test_missing_expert_is_named_with_its_index(ckpt):
    edit_weights(ckpt, lambda t: t.pop("backbone.layers.1.mixer.experts.5.up_proj.weight"))
    msg = error_of(ckpt)
    assert "backbone.layers.1.mixer.experts.up_proj (experts [5])" in msg


def test_unexpected_tensor_is_named(ckpt):
    edit_weights(ckpt, lambda t: t.update({"backbone.layers.9.mixer.extra.weight": torch.zeros(2)}))
    assert "unexpected tensors: backbone.layers.9.mixer.extra.weight" in error_of(ckpt)


def test_misshaped_tensor_names_both_shapes(ckpt):
    edit_weights(ckpt, lambda t: t.update({"backbone.norm_f.weight": torch.ones(31)}))
    assert "backbone.norm_f.weight: checkpoint [31], model expects [32]" in error_of(ckpt)


def test_all_problems_reported_together(ckpt):
    def edit(t):
        t.pop("lm_head.weight")
        t["surprise"] = torch.zeros(1)
        t["backbone.embeddings.weight"] = torch.zeros(3, 3)
    edit_weights(ckpt, edit)
    msg = error_of(ckpt)
    assert "missing tensors: lm_head.weight" in msg
    assert "unexpected tensors: surprise" in msg
    assert "backbone.embeddings.weight: checkpoint [3, 3], model expects [128, 32]" in msg


def test_config_that_does_not_fit_the_weights(ckpt):
    edit_config(ckpt, layers_block_type=None, hybrid_override_pattern="ME*E")  # one layer fewer than on disk
    msg = error_of(ckpt)
    assert "unexpected tensors: backbone.layers.4" in msg


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    assert "unsupported model_type 'llama'" in error_of(ckpt)


def test_invalid_config_values(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    assert "num_attention_heads=8 is not a multiple of num_key_value_heads=3" in error_of(ckpt)
    edit_config(ckpt, num_key_value_heads=2, layers_block_type=None, hybrid_override_pattern="MX*")
    assert "unknown characters ['X']" in error_of(ckpt)


def test_missing_files(ckpt, tmp_path):
    assert "does not exist" in error_of(tmp_path / "nowhere")
    (ckpt / "model.safetensors").unlink()
    assert "no weights in" in error_of(ckpt)
    (ckpt / "config.json").unlink()
    assert "config.json" in error_of(ckpt)


def test_index_naming_a_missing_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}}))
    assert "shard files that do not exist: ['gone.safetensors']" in error_of(ckpt)


def test_loading_does_not_double_materialise(tmp_path):
    """Peak RSS while loading stays near the checkpoint size (weights are not held twice)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(hybrid_override_pattern="-" * 12, vocab_size=256, hidden_size=1024,
                             intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    model = NemotronHForCausalLM(config)
    model.save_pretrained(tmp_path, max_shard_size="100MB")
    size = sum(p.numel() * 4 for p in model.parameters())
    del model
    script = textwrap.dedent(f"""
        import resource, torch
        from agentrt.model.checkpoint import load_model
        torch.zeros(1) @ torch.zeros(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m = load_model({str(tmp_path)!r}, "cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert size > 350e6
    assert grown < 1.25 * size, f"loading {size / 1e6:.0f} MB of weights raised peak RSS by {grown / 1e6:.0f} MB"
