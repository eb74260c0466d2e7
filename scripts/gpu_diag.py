"""On CUDA: the kernel forward's error per position against an fp32 oracle, for both paths and
both dtypes (what showed that bf16 against bf16 is the wrong oracle; see docs/kernels.md).

    python scripts/gpu_diag.py        (from the repository root, on a machine with a GPU)
"""

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch

from agentrt.bench.kernels import NANO, write_checkpoint
from agentrt.kernels import KERNELS_ENV
from agentrt.model import Engine, EngineConfig, load

sys.path.insert(0, "tests")
from test_engine import teacher_forced  # noqa: E402

tmp = Path(tempfile.mkdtemp())
write_checkpoint(tmp, dataclasses.replace(NANO, vocab_size=4096), layers=4, dtype=torch.bfloat16)
g = torch.Generator().manual_seed(0)
shared = torch.randint(300, 4096, (700,), generator=g).tolist()
streams = [(shared + torch.randint(300, 4096, (n,), generator=g).tolist(), p)
           for n, p in [(40, 700), (300, 200), (9, 705), (150, 600)]]


def logits(lm, mode):
    os.environ[KERNELS_ENV] = mode
    engine = Engine(lm, EngineConfig(max_running=8, token_budget=512))
    return torch.cat([torch.stack(per).float() for per in teacher_forced(engine, streams)])


lm32 = load(tmp, device="cuda", dtype=torch.float32)
oracle = logits(lm32, "ref")
t32 = logits(lm32, "triton")
del lm32
lm16 = load(tmp, device="cuda", dtype=torch.bfloat16)
ref16, tri16 = logits(lm16, "ref"), logits(lm16, "triton")


def stats(name, x, y):
    per = ((x - y).norm(dim=-1) / y.norm(dim=-1))
    q = torch.quantile(per, torch.tensor([0.5, 0.9, 0.99], device=per.device)).tolist()
    print(f"{name:28s} overall {((x-y).norm()/y.norm()).item():.4f}  median {q[0]:.4f}  p90 {q[1]:.4f}  "
          f"p99 {q[2]:.4f}  max {per.max().item():.4f}  mean {per.mean().item():.4f}  argmax agree "
          f"{(x.argmax(-1) == y.argmax(-1)).float().mean().item():.3f}")


stats("triton fp32 vs ref fp32", t32, oracle)
stats("ref bf16 vs ref fp32", ref16, oracle)
stats("triton bf16 vs ref fp32", tri16, oracle)
stats("triton bf16 vs ref bf16", tri16, ref16)
