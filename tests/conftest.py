"""Shared fixtures: the tests drive firmware in the unix port from CPython."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FIRMWARE_DIR = REPO_ROOT / "firmware"
# MicroPython-side helpers used by tests (adapters around firmware APIs).
MPY_TEST_DIR = TESTS_DIR / "mpy"

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
