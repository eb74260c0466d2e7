"""The engine's forward through the Triton kernels (Triton's interpreter on CPU, forced with
AGENTRT_KERNELS=triton) against the same engine on the torch references: a mixed workload of
prefills sharing a prompt, decodes and resumed turns gives the same greedy tokens and logprobs."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from agentrt.kernels import KERNELS_ENV, kernel_mode, use_triton
from agentrt.model import Engine, EngineConfig, Request, SamplingParams, load


def workload(lm, monkeypatch, mode: str, calls: Counter | None = None):
    monkeypatch.setenv(KERNELS_ENV, mode)

    async def main():
        async with Engine(lm, EngineConfig(max_running=8)) as engine:
            shared = list(range(5, 90))  # a shared prefix, then four prompts of different lengths
            greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
            first = [engine.submit(Request(shared + [100 + i] * (i + 1), greedy)) for i in range(4)]
            first = [await h.result() for h in first]
            # second turns resume from each first turn's cached state (Mamba snapshot + KV)
            follow = [engine.submit(Request(shared + [100 + i] * (i + 1) + r.token_ids + [7, 8], greedy))
                      for i, r in enumerate(first)]
            second = [await h.result() for h in follow]
            return first + second, engine.stats()

    return asyncio.run(main())


@pytest.mark.slow
def test_the_kernel_forward_matches_the_reference_forward(monkeypatch):
    import agentrt.kernels.triton_attention as ta
    import agentrt.kernels.triton_mamba as tm
    import agentrt.kernels.triton_moe as tmoe
    import agentrt.kernels.triton_ssd as ts

    lm = load("tiny")
    ref, _ = workload(lm, monkeypatch, "ref")
    calls: Counter = Counter()
    for module, name in [(ta, "paged_attention"), (ta, "write_kv"), (tm, "selective_state_update_slots"),
                         (tm, "causal_conv1d_varlen"), (tm, "causal_conv1d_update_slots"), (tm, "gated_rmsnorm"),
                         (ts, "ssd_scan_varlen"), (tmoe, "moe_experts")]:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _name=name, **k: (calls.update([_name]), _fn(*a, **k))[1])
    kernel, stats = workload(lm, monkeypatch, "triton")
    assert len(calls) == 8, calls  # every kernel ran
    assert stats.cached_prompt_tokens > 0  # the resumed turns started from cached state
    for r, k in zip(ref, kernel):
        assert k.token_ids == r.token_ids
        assert k.logprobs == pytest.approx(r.logprobs, abs=1e-4)


def test_kernel_mode_is_read_from_the_environment(monkeypatch):
    import torch

    monkeypatch.setenv(KERNELS_ENV, "ref")
    assert not use_triton(torch.device("cpu"))
    monkeypatch.setenv(KERNELS_ENV, "triton")
    assert use_triton(torch.device("cpu"))
    monkeypatch.delenv(KERNELS_ENV)
    assert kernel_mode() == "auto" and not use_triton(torch.device("cpu"))  # auto: Triton on CUDA only
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match="AGENTRT_KERNELS='fast' is not one of auto, ref, triton"):
        use_triton(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the CUDA kernel forward needs a GPU")
def test_cuda_kernel_forward_matches_the_reference_at_nano_layer_shapes(tmp_path, monkeypatch):
    """CUDA, a random NemotronH with Nemotron 3 Nano's layer shapes (4 layers: Mamba, attention,
    Mamba, MoE; a small vocabulary): teacher-forced logits of a mixed prefill/decode workload
    through the kernels against the same engine on the torch references.

    In fp32 the two compute the same function. In bf16 both are held to the fp32 oracle, and the
    kernels must be as close to it as the references are: per position most logits are within
    about 1%, but where bf16 rounding flips an expert in the router's top-6 of 128 a position is
    off by up to 30% on either path (seen on an H100: p99 0.29 for both), so bf16 against bf16
    says nothing."""
    import dataclasses

    import torch

    from agentrt.bench.kernels import NANO, write_checkpoint
    from test_engine import teacher_forced

    write_checkpoint(tmp_path, dataclasses.replace(NANO, vocab_size=4096), layers=4, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(300, 4096, (700,), generator=g).tolist()
    streams = [(shared + torch.randint(300, 4096, (n,), generator=g).tolist(), p)
               for n, p in [(40, 700), (300, 200), (9, 705), (150, 600)]]

    def logits(lm, mode: str) -> torch.Tensor:
        monkeypatch.setenv(KERNELS_ENV, mode)
        engine = Engine(lm, EngineConfig(max_running=8, token_budget=512))
        return torch.cat([torch.stack(per).float() for per in teacher_forced(engine, streams)])

    def errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:  # per position
        return (got - want).norm(dim=-1) / want.norm(dim=-1)

    lm = load(tmp_path, device="cuda", dtype=torch.float32)
    oracle = logits(lm, "ref")
    assert errors(logits(lm, "triton"), oracle).max() < 1e-4
    del lm
    lm = load(tmp_path, device="cuda", dtype=torch.bfloat16)
    ref, kernels = errors(logits(lm, "ref"), oracle), errors(logits(lm, "triton"), oracle)
    assert kernels.median() < 1.5 * ref.median() and kernels.mean() < 1.5 * ref.mean(), (kernels, ref)
    assert kernels.median() < 0.02
