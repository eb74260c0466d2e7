"""Import rules from DESIGN.md, checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_after(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))

@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("agentrt", ["torch", "textual", "aiohttp", "sqlalchemy", "agentrt.model", "transformers"]),
        ("agentrt.model", ["textual", "aiohttp", "sqlalchemy", "transformers", "agentrt.tools", "agentrt.environments"]),
        ("agentrt.kernels", ["textual", "aiohttp", "sqlalchemy", "agentrt.tools", "agentrt.environments"]),
        ("agentrt.tools", ["torch", "textual"]),
        ("agentrt.environments", ["torch", "textual"]),
    ],
)
def test_import_rules(module, forbidden):
    loaded = loaded_after(module)
    assert module in loaded
    assert not [m for m in forbidden if m in loaded], f"importing {module} pulled in {[m for m in forbidden if m in loaded]}"
