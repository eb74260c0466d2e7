"""The embedded default model: deterministic, complete, loaded like any checkpoint, equal to transformers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentrt.model import CheckpointError, generate, load
from agentrt.model.tiny import ensure_tiny, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGENTRT_HOME", str(home))
        return load("tiny")


def digest(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_creation_is_deterministic(tmp_path):
    write_tiny_checkpoint(tmp_path / "a")
    write_tiny_checkpoint(tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(digest(tmp_path / "a"))


def test_tiny_has_every_layer_type_and_a_small_size(tiny):
    cfg = tiny.config
    assert set(cfg.layer_types) == {"linear_attention", "full_attention", "mlp", "moe"}
    assert cfg.moe_latent_size and cfg.num_nextn_predict_layers == 1
    params = sum(p.numel() for p in tiny.model.parameters())
    assert 5e6 <= params <= 20e6
    assert tiny.model.dtype == torch.float32
    assert tiny.path.parent.name == "models" and "tiny" in tiny.path.name


def test_ensure_tiny_reuses_the_existing_directory(tiny, monkeypatch):
    monkeypatch.setenv("AGENTRT_HOME", str(tiny.path.parents[1]))
    before = (tiny.path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny() == tiny.path
    assert (tiny.path / "model.safetensors").stat().st_mtime_ns == before


@torch.no_grad()
def test_tiny_matches_transformers(tiny):
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    ids = torch.randint(0, tiny.config.vocab_size, (70,), generator=torch.Generator().manual_seed(0))
    expected = oracle(ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(tiny.model.logits(tiny.model(ids)), expected, atol=1e-4, rtol=0)


def test_chat_render_and_seeded_generation(tiny):
    ids = tiny.chat_format.render([{"role": "user", "content": "hello"}], enable_thinking=False)
    text = tiny.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n<think></think>")
    run = lambda seed: [t for t, _ in generate(tiny.model, ids, 24, temperature=1.0, seed=seed)]
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c and len(a) == 24
    greedy = list(generate(tiny.model, ids, 8))
    assert all(lp <= 0 for _, lp in greedy)
    first = tiny.model.logits(tiny.model(torch.tensor(ids)))[-1]
    assert greedy[0][0] == int(first.argmax())


def test_generation_stops_at_a_stop_id(tiny):
    ids = tiny.chat_format.render([{"role": "user", "content": "hi"}])
    free = [t for t, _ in generate(tiny.model, ids, 10)]
    stopped = [t for t, _ in generate(tiny.model, ids, 10, stop_ids=[free[3]])]
    assert stopped == free[: free.index(free[3]) + 1]


def test_load_rejects_an_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="neither 'tiny' nor an existing checkpoint directory"):
        load(tmp_path / "missing")


def test_chat_example_runs(tiny):
    env = {"AGENTRT_HOME": str(tiny.path.parents[1]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "chat.py"), "--max-tokens", "16"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tok/s" in out.stdout and "prompt:" in out.stdout
