"""The host package type-checks: mypy over canopy_host with host_tools/pyproject.toml's
[tool.mypy] settings. Annotations that lie are bugs waiting; this keeps them honest."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_canopy_host_type_checks() -> None:
    host = REPO_ROOT / "host_tools"
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(host / "pyproject.toml"), "canopy_host"],
                          cwd=host, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
