"""The wheel carries every package under the `agentrt` namespace, templates included."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_layout_and_import(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("agentrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ["agentrt/__init__.py", "agentrt/model/network.py", "agentrt/model/templates/tiny.jinja",
                     "agentrt/model/templates/nemotron3.jinja", "agentrt/kernels/mamba.py", "agentrt/kernels/cpu_mamba.c",
                     "agentrt/tools/__init__.py", "agentrt/environments/__init__.py"]:
        assert expected in names
    assert not [n for n in names if n.split("/")[0] in {"model", "kernels", "tools", "environments", "tests"}]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import agentrt.model.tokenizer as t; print(t.__file__); print(t.builtin_template('tiny')[:2])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.stdout.splitlines()[0].startswith(str(site))
