"""What every single-seat world must do besides its rules: run an agent on the embedded model to a
reward in [0, 1], and stay light to import (no torch, textual or matplotlib until used)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from agentrt import Agent, Budget, Runtime, Sampling
from agentrt.environments import run_environment
from agentrt.environments.churn import ChurnWorld
from agentrt.environments.fleet import FleetWorld

WORLDS = [("churn", lambda: ChurnWorld(40), "analyst"), ("fleet", FleetWorld, "fleet_manager")]


@pytest.mark.parametrize("reward,make,seat", WORLDS, ids=[w[0] for w in WORLDS])
def test_the_embedded_model_plays_without_crashing(reward, make, seat):
    world = make()
    agent = Agent(name=seat, budget=Budget(tool_calls=4, turns=3, think_tokens=16), sampling=Sampling(max_tokens=96))

    async def main():
        async with Runtime(model="tiny") as rt:
            return await run_environment(rt, world, seed=0, agent=agent)

    (result,) = asyncio.run(main())
    assert result.status in ("done", "max_turns", "budget"), result.error
    assert 0.0 <= result.rewards[reward] <= 1.0


@pytest.mark.parametrize("module", ["churn", "fleet"])
def test_importing_the_world_stays_light(module):
    code = (f"import sys, agentrt.environments.{module}; "
            "print(sorted({'torch', 'textual', 'matplotlib'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
