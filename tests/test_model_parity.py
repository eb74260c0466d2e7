"""Our NemotronH against transformers' NemotronHForCausalLM (fp32), and incremental decoding
against our own full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from agentrt.model.checkpoint import load_model
from nemotron_fixtures import CONFIGS, write_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    oracle = write_checkpoint(request.param, directory, seed=len(request.param))
    return request.param, oracle, load_model(directory, "cpu")


def random_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_sequence_logits_match_transformers(pair):
    name, oracle, ours = pair
    ids = random_ids(45, ours.config.vocab_size, 1)  # crosses several SSD chunks (chunk_size 8)
    expected = oracle(ids[None], use_cache=False).logits[0]
    got = ours.logits(ours(ids))
    assert expected.abs().max() > 0.5, "weights too small for the tolerance to mean anything"
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@torch.no_grad()
def test_batched_sequences_match_transformers(pair):
    """Several sequences of different lengths in one flat batch, each equal to transformers alone."""
    _, oracle, ours = pair
    seqs = [random_ids(n, ours.config.vocab_size, 10 + n) for n in (3, 17, 1, 9)]
    got = ours.logits(ours(torch.cat(seqs), seq_lens=[len(s) for s in seqs])).split([len(s) for s in seqs])
    for s, g in zip(seqs, got):
        torch.testing.assert_close(g, oracle(s[None], use_cache=False).logits[0], atol=TOL, rtol=0)


@torch.no_grad()
def test_incremental_decoding_matches_full_sequence(pair):
    """Prefill 13 tokens, then 32 one-token steps with our caches == the full-sequence logits."""
    _, _, ours = pair
    ids = random_ids(13 + 32, ours.config.vocab_size, 2)
    full = ours.logits(ours(ids))
    state = ours.new_state()
    steps = [ours.logits(ours(ids[:13], [state]))]
    for t in range(13, len(ids)):
        steps.append(ours.logits(ours(ids[t : t + 1], [state])))
    assert state.length == len(ids)
    torch.testing.assert_close(torch.cat(steps), full, atol=TOL, rtol=0)


@torch.no_grad()
def test_chunked_prefill_and_mixed_batch_match_full_sequence(pair):
    """Prefill resumed from a cached state in uneven chunks, batched with a decoding sequence."""
    _, _, ours = pair
    a = random_ids(30, ours.config.vocab_size, 3)
    b = random_ids(12, ours.config.vocab_size, 4)
    full_a, full_b = ours.logits(ours(a)), ours.logits(ours(b))
    sa, sb = ours.new_state(), ours.new_state()
    ours(b[:10], [sb])
    got_a, got_b = [], []
    for lo, hi, bt in ((0, 5, 10), (5, 6, 11), (6, 19, None), (19, 30, None)):
        if bt is None:
            got_a.append(ours.logits(ours(a[lo:hi], [sa])))
            continue
        h = ours.logits(ours(torch.cat([a[lo:hi], b[bt : bt + 1]]), [sa, sb], seq_lens=[hi - lo, 1]))
        got_a.append(h[: hi - lo])
        got_b.append(h[hi - lo :])
    torch.testing.assert_close(torch.cat(got_a), full_a, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat(got_b), full_b[10:12], atol=TOL, rtol=0)


@torch.no_grad()
def test_forked_state_continues_independently(pair):
    _, _, ours = pair
    ids = random_ids(20, ours.config.vocab_size, 5)
    state = ours.new_state()
    ours(ids[:12], [state])
    twin = state.clone()
    x = ours.logits(ours(ids[12:], [state]))
    y = ours.logits(ours(ids[12:], [twin]))
    torch.testing.assert_close(x, y, atol=0, rtol=0)
    torch.testing.assert_close(x, ours.logits(ours(ids))[12:], atol=TOL, rtol=0)


@torch.no_grad()
def test_mtp_layers_load_and_decode_incrementally(tmp_path):
    write_checkpoint("mtp", tmp_path, seed=7)
    model = load_model(tmp_path, "cpu")
    assert model.mtp is not None and len(model.mtp.layers) == 2
    assert model.mtp.layers[0].eh_proj.weight.abs().sum() > 0
    ids = random_ids(24, model.config.vocab_size, 6)
    hidden = model(ids)
    full = model.logits(model.mtp_forward(hidden[:-1], ids[1:]))  # draft for position t+2
    assert full.shape == (23, model.config.vocab_size)
    assert not torch.allclose(full, model.logits(hidden[:-1]), atol=1e-2), "MTP head must differ from the LM head"
    state = model.new_state()
    h = model(ids[:10], [state])
    steps = [model.logits(model.mtp_forward(h[:-1], ids[1:10], states=[state]))]
    for t in range(10, 24):
        h_t = model(ids[t : t + 1], [state])
        steps.append(model.logits(model.mtp_forward(h[-1:], ids[t : t + 1], states=[state])))
        h = h_t
    torch.testing.assert_close(torch.cat(steps), full, atol=TOL, rtol=0)


@torch.no_grad()
def test_bf16_load_keeps_router_bias_fp32_and_stays_close(tmp_path):
    write_checkpoint("moe_gqa4_grouped", tmp_path, seed=3)
    fp32 = load_model(tmp_path, "cpu")
    bf16 = load_model(tmp_path, "cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    ids = random_ids(20, fp32.config.vocab_size, 8)
    a, b = fp32.logits(fp32(ids)), bf16.logits(bf16(ids))
    assert b.dtype == torch.float32
    assert ((a - b).norm() / a.norm()) < 0.05
