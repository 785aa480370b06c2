"""The node's viper kernels (CRC, reading formatter) at both native-int widths (ESP32 32-bit, unix x64 64-bit).

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


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), min_size=1, max_size=15))
def test_reading_formatter_matches_python_at_both_widths(mod, values: list[int]) -> None:
    """_put_ints: int32 values to comma-separated decimals, -2**31 included, at both widths."""
    from array import array

    dst = bytearray(300)
    end = mod._put_ints(dst, 5, array("i", values), len(values), 1 << 31, 250)
    assert bytes(dst[5:end]) == ",".join(str(v) for v in values).encode()
    assert not mod.overflows()
