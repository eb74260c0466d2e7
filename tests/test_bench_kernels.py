"""`agentrt bench kernels`: the whole command on CPU at small shapes, its table, and its argument errors."""

from __future__ import annotations

import math
import re

import pytest
from click.testing import CliRunner

from agentrt.bench.kernels import NANO, SHAPES, TARGETS, layer_pattern
from agentrt.cli import cli

KERNEL_ROWS = ["decode attention", "prefill attention", "write_kv", "selective state update", "SSD scan varlen",
               "conv1d varlen", "conv1d update", "gated RMSNorm", "moe_experts batch 1", "moe_experts batch 8",
               "moe_experts batch 64", "moe_forward batch 64"]
COMMAND = ["bench", "kernels", "--shapes", "small", "--iters", "1", "--layers", "4"]


def bench_kernels(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, [*COMMAND[:2], *args], env=env)


@pytest.fixture(scope="module")
def full_run():
    """One run with every part (kernels and engine against transformers), with --markdown."""
    result = CliRunner().invoke(cli, [*COMMAND, "--markdown"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _cells(output: str, name: str) -> list[str]:
    line = next((ln for ln in output.splitlines() if ln.startswith(name + " ")), None)
    assert line is not None, f"no row {name!r} in:\n{output}"
    return re.split(r"\s{2,}", line.strip())


def test_every_kernel_row_has_positive_finite_bandwidth(full_run):
    text = full_run.split("```")[0]  # the text table, before the Markdown part
    header = re.split(r"\s{2,}", next(ln for ln in text.splitlines() if ln.startswith("kernel ")).strip())
    gbps, tflops = header.index("GB/s"), header.index("TFLOP/s")
    for name in KERNEL_ROWS:
        cells = _cells(text, name)
        assert len(cells) == len(header), cells
        value = float(cells[gbps].replace(",", ""))
        assert math.isfinite(value) and value > 0, (name, cells)
        assert float(cells[tflops].replace(",", "")) >= 0
        if name in TARGETS:
            assert re.search(r">= \d+% BW: (met|not met)$", cells[-1]), cells


def test_cpu_rows_put_each_c_kernel_beside_the_torch_operator_it_replaces(full_run):
    from agentrt.kernels import cpu

    if not cpu.available():
        pytest.skip("no C compiler: the CPU path keeps its torch kernels")
    text = full_run.split("```")[0]
    lines = [ln for ln in text.splitlines()
             if ln.startswith(("linear ", "moe_experts batch 32 ", "moe_experts batch 2048 "))]
    impls = sorted(re.split(r"\s{2,}", ln.strip())[2] for ln in lines)
    assert impls == ["C packed"] * 4 + ["torch"] * 2 + ["torch fast"] * 2, lines
    attention = [re.split(r"\s{2,}", ln.strip())[2] for ln in text.splitlines() if ln.startswith("decode attention ")]
    assert attention == ["torch ref", "C"], attention


def test_ceilings_and_engine_row(full_run):
    copy = re.search(r"^copy bandwidth: ([\d,.]+) GB/s", full_run, re.M)
    matmul = re.search(r"^matmul rate: ([\d.e+-]+) TFLOP/s \(\d+x\d+x\d+ \w+ matmul\)", full_run, re.M)
    assert copy and float(copy.group(1).replace(",", "")) > 0
    assert matmul and float(matmul.group(1)) > 0
    engine = re.search(r"^engine decode \(M\*ME, batch 64, prompt 128, 64 tokens greedy\): agentrt ([\d,.]+) tokens/s, "
                       r"transformers ([\d,.]+) tokens/s, ratio ([\d.]+)x$", full_run, re.M)
    assert engine, full_run
    assert all(float(g.replace(",", "")) > 0 for g in engine.groups())


def test_markdown_has_the_command_line_and_every_row(full_run):
    markdown = full_run[full_run.index("```"):]
    assert markdown.startswith("```\nagentrt bench kernels --shapes small --layers 4 --iters 1 --markdown\n```")
    assert "| kernel | shape | impl | ms | GB/s | % copy BW | TFLOP/s | % matmul | target |" in markdown
    for name in KERNEL_ROWS:
        assert f"| {name} |" in markdown
    assert "- engine decode (M*" in markdown


def test_skip_engine_runs_only_the_kernels():
    result = bench_kernels("--shapes", "small", "--iters", "1", "--skip-engine")
    assert result.exit_code == 0, result.output
    assert "engine decode" not in result.output and "moe_forward batch 64" in result.output


@pytest.mark.parametrize("args, env, message", [
    (["--shapes", "huge"], None, "Invalid value for '--shapes': 'huge' is not one of 'nano', 'small'"),
    (["--iters", "0"], None, "Invalid value for '--iters': 0 is not in the range x>=1"),
    (["--layers", "many"], None, "Invalid value for '--layers': 'many' is not a valid integer"),
    (["--frobnicate"], None, "No such option '--frobnicate'"),
    ([], {"AGENTRT_BENCH_KERNELS_ITERS": "-1"}, "Invalid value for '--iters': -1 is not in the range x>=1"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, env, message):
    result = bench_kernels(*args, env=env)
    assert result.exit_code == 2
    assert message in result.output and "Try 'agentrt bench kernels --help' for help." in result.output


def test_nano_shapes_and_layer_pattern():
    assert (NANO.hidden, NANO.mamba_heads, NANO.mamba_head_dim, NANO.ssm_state, NANO.n_groups) == (2688, 64, 64, 128, 8)
    assert (NANO.conv_kernel, NANO.chunk_size, NANO.q_heads, NANO.kv_heads, NANO.head_dim) == (4, 128, 32, 2, 128)
    assert (NANO.experts, NANO.top_k, NANO.expert_intermediate, NANO.shared_intermediate) == (128, 6, 1856, 3712)
    assert set(SHAPES) == {"nano", "small"}
    assert layer_pattern(4) == "M*ME" and layer_pattern(2) == "M*" and layer_pattern(6) == "M*MEM*"
