"""Every firmware module must compile for the real chips, not just run in the unix port.

The unix port accepts things the ESP32 build rejects (for example viper literals of
2**30 or more), so this is the check that keeps the firmware deployable.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from canopy_host.paths import FIRMWARE_DIR, mpy_cross_command

MODULES = sorted(p for p in FIRMWARE_DIR.rglob("*.py"))
ARCHES = ["xtensawin", "rv32imc"]


def test_firmware_has_modules() -> None:
    assert MODULES, "firmware/ has no modules to cross-compile"


@pytest.mark.parametrize("arch", ARCHES)
def test_cross_compiles(arch: str, tmp_path: Path) -> None:
    failures = []
    for module in MODULES:
        out = tmp_path / (module.stem + ".mpy")
        proc = subprocess.run(
            mpy_cross_command() + [f"-march={arch}", "-o", str(out), str(module)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0 or not out.exists() or out.stat().st_size == 0:
            failures.append(f"{module.relative_to(FIRMWARE_DIR)}: {proc.stderr.strip()}")
    assert not failures, f"modules that do not compile for {arch}:\n" + "\n".join(failures)
