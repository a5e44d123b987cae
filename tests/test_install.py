"""scripts/install on a machine whose Python cannot make a virtualenv (Debian without python3-venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the script installs the package instead")
def test_install_names_python3_venv_when_venv_cannot_bootstrap_pip(tmp_path):
    # Debian's python3 without python3-venv: `import ensurepip` fails, and `python3 -m venv` stops half-way
    hide = tmp_path / "hide"
    (hide / "ensurepip").mkdir(parents=True)
    (hide / "ensurepip" / "__init__.py").write_text('raise ImportError("No module named ensurepip")\n')
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install", repo / "scripts" / "install")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(hide)}
    p = subprocess.run(["bash", str(repo / "scripts" / "install"), ""], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "missing system packages: python3-venv" in p.stderr and "(install them as root)" in p.stderr
    assert not (repo / ".venv").exists()  # nothing half-made
