"""`agentrt bench engine`: its command line, its workload, and a tiny run of the transformers peers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from agentrt.bench.engine import Workload, first_difference
from agentrt.cli import cli

TINY_RUN = ["--only", "hf-per-agent,hf-batched", "--agents", "2", "--turns", "2", "--system-tokens", "32",
            "--user-tokens", "8", "--gen-tokens", "4"]


def bench_engine(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["bench", "engine", *args], env=env)


def test_help_names_every_option():
    result = bench_engine("--help")
    assert result.exit_code == 0, result.output
    for option in ("--agents", "--turns", "--system-tokens", "--user-tokens", "--gen-tokens", "--only", "--json",
                   "--markdown", "--hf-dt-clamp", "--repeat", "--dtype"):
        assert option in result.output
    assert "bench" in CliRunner().invoke(cli, ["--help"]).output


@pytest.mark.parametrize("args, env, message", [
    (["--agents", "0"], None, "Invalid value for '--agents': 0 is not in the range x>=1"),
    (["--gen-tokens", "many"], None, "Invalid value for '--gen-tokens': 'many' is not a valid integer"),
    (["--only", "hf-batched,vllm"], None,
     "Invalid value for '--only': unknown contestant 'vllm'; choose one or more of agentrt,hf-per-agent,hf-batched"),
    (["--only", ","], None, "Invalid value for '--only': no contestant given"),
    (["--repeat", "0"], None, "Invalid value for '--repeat': 0 is not in the range x>=1"),
    (["--dtype", "fp8"], None, "Invalid value for '--dtype': 'fp8' is not one of 'auto', 'float32', 'bfloat16'"),
    (["--turns", "2", "--frobnicate"], None, "No such option '--frobnicate'"),
    ([], {"AGENTRT_BENCH_ENGINE_TURNS": "-1"}, "Invalid value for '--turns': -1 is not in the range x>=1"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, env, message):
    result = bench_engine(*args, env=env)
    assert result.exit_code == 2
    assert message in result.output and "Try 'agentrt bench engine --help' for help." in result.output


def test_workload_is_seeded_and_shares_only_the_system_prompt():
    w = Workload(agents=3, turns=2, system_tokens=16, user_tokens=8, gen_tokens=4)
    first = w.prompt(0, 0)
    assert first == Workload(agents=3, turns=2, system_tokens=16, user_tokens=8, gen_tokens=4).prompt(0, 0)
    assert first[:16] == w.prompt(1, 0)[:16] and first[16:] != w.prompt(1, 0)[16:]
    assert all(12 <= t < 2048 for t in first)
    second = w.prompt(0, 1, first, [7, 7, 7, 7])
    assert second == first + [7, 7, 7, 7] + w.user_message(0, 1) and w.user_message(0, 1) != w.user_message(0, 0)
    assert w.prompt_lengths() == [len(first), len(second)]
    assert w.short().user_message(1, 1) == w.user_message(1, 1)  # the short check's workload is a prefix
    assert Workload(seed=1).system_prompt() != Workload().system_prompt()
    assert Workload().ideal_hit_rate() == pytest.approx(1 - (1024 + 32 * 4 * 64) / (32 * (4 * 1024 + 64 * 10 + 32 * 6)))
    with pytest.raises(ValueError, match="agents=0 must be >= 1; gen_tokens=0 must be >= 1"):
        Workload(agents=0, gen_tokens=0)


def test_first_difference_names_agent_turn_and_token():
    a = [[[1, 2, 3]], [[4, 5, 6]]]
    assert first_difference(a, a, ("x", "y")) is None
    assert first_difference(a, [[[1, 2, 3]], [[4, 9, 6]]], ("x", "y")) == "agent 1, turn 0, token 1: x 5, y 9"
    assert first_difference(a, [[[1, 2]], [[4, 5, 6]]], ("x", "y")) == "agent 0, turn 0, token 2: x 3, y end after 2 tokens"


def test_cli_and_bench_import_without_torch():
    code = "import json, sys, agentrt.cli, agentrt.bench.engine; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {"torch", "transformers", "agentrt.model"} & set(json.loads(out.stdout))


def test_tiny_run_of_the_transformers_peers(tmp_path):
    path = tmp_path / "results.json"
    result = bench_engine(*TINY_RUN, "--json", str(path), "--markdown",
                          env={"AGENTRT_HOME": str(tmp_path / "home"), "TRANSFORMERS_VERBOSITY": "error"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert next(line for line in lines if line.startswith("contestant")).split() == [
        "contestant", "generated", "tokens", "wall", "s", "cpu", "s", "tokens/s", "prompt", "tokens", "computed",
        "prefix", "hit", "rate", "peak", "RSS", "MB", "agentrt", "speedup"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("hf-per-agent ", "hf-batched "))}
    assert set(rows) == {"hf-per-agent", "hf-batched"}
    prompts = 2 * ((32 + 8) + (32 + 8 + 4 + 8))  # two agents, two turns each
    for name, row in rows.items():
        assert row[1] == "16" and float(row[4]) > 0, row  # 2 agents x 2 turns x 4 tokens, a positive rate
        assert row[5:8] == [str(prompts), "of", str(prompts)] and row[8] == "0.0%" and row[-1] == "-", row
    assert "ok   hf-per-agent == hf-batched on all 2 agents x 2 turns" in lines
    assert "FAIL" not in result.stdout and "PASS" not in result.stdout  # no targets without agentrt
    assert f"agentrt bench engine {' '.join(TINY_RUN[2:])} --seed 0 --only hf-per-agent,hf-batched" in result.stdout
    assert any(line.startswith("| hf-batched | 16 | ") for line in lines)

    report = json.loads(path.read_text())
    per_agent, batched = (report["contestants"][n]["tokens"] for n in ("hf-per-agent", "hf-batched"))
    assert per_agent == batched
    assert [[len(g) for g in turns] for turns in per_agent] == [[4, 4], [4, 4]]
    assert report["ok"] and all(c["ok"] for c in report["checks"])


def test_dtype_is_every_contestants_dtype(tmp_path):
    """--dtype bfloat16 (CUDA's default) on CPU: both models in bf16, named in the machine line."""
    path = tmp_path / "results.json"
    result = bench_engine(*TINY_RUN, "--dtype", "bfloat16", "--json", str(path), "--markdown",
                          env={"AGENTRT_HOME": str(tmp_path / "home"), "TRANSFORMERS_VERBOSITY": "error"})
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["machine"]["dtype"] == "bfloat16"
    assert "cpu bfloat16;" in result.stdout
    command = next(line for line in result.stdout.splitlines() if line.startswith("agentrt bench engine"))
    assert command.endswith("--dtype bfloat16 --markdown")


def test_repeat_reports_each_contestant_by_its_median_run(tmp_path):
    path = tmp_path / "results.json"
    result = bench_engine(*TINY_RUN, "--repeat", "3", "--json", str(path), "--markdown",
                          env={"AGENTRT_HOME": str(tmp_path / "home"), "TRANSFORMERS_VERBOSITY": "error"})
    assert result.exit_code == 0, result.output
    assert "(round 3 of 3)" in result.output
    report = json.loads(path.read_text())
    for name in ("hf-per-agent", "hf-batched"):
        r = report["contestants"][name]
        assert len(r["runs_s"]) == 3 and r["wall_s"] == sorted(r["runs_s"])[1]
        assert f"ok   {name}: the same tokens in all 3 rounds" in result.stdout
    assert "3 interleaved rounds; each contestant's row is its median run" in result.stdout
    command = next(line for line in result.stdout.splitlines() if line.startswith("agentrt bench engine"))
    assert command.endswith("--repeat 3 --markdown")


def test_peak_rss_sees_memory_freed_before_the_end():
    from agentrt.bench.engine import PeakRSS

    with PeakRSS() as memory:
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        del block
    assert 60 * 2**20 <= memory.above_start < 512 * 2**20
