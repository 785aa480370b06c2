"""The node's viper CRC kernel at both native-int widths (ESP32 32-bit, unix x64 64-bit).

The unix port only exercises 64-bit viper ints; tests/viper32.py runs the same viper
source under CPython with 32-bit semantics (signed ptr32 loads, wrapped arithmetic)
so the chip's behaviour is checked too. Reference: zlib.crc32.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import viper32
from canopy_host.paths import FIRMWARE_DIR

SRC = FIRMWARE_DIR / "canopy" / "protocol.py"


@pytest.fixture(scope="module", params=[32, 64])
def mod(request):
    return viper32.load(str(SRC), width=request.param)


def test_no_static_issues(mod) -> None:
    assert mod.static_issues == []


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=260))
def test_crc_kernel_matches_zlib_at_both_widths(mod, data: bytes) -> None:
    assert mod.crc_hex(data) == b"%08x" % zlib.crc32(data)
    assert not mod.overflows()
