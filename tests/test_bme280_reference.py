"""The Bosch transcription's int32 model over the documented domain, and the viper kernel's
source run at 32- and 64-bit width (tests/viper32.py) against it.

If a step of Bosch's 32-bit formulas overflowed somewhere in the domain, the chip (and
the firmware, which must match it) would silently return garbage there: the domain in
docs/bme280.md is only honest if wrapped and unbounded arithmetic agree at every step.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canopy_host.paths import FIRMWARE_DIR
from reference.bosch_bme280 import (
    DOMAIN_ADC_H,
    DOMAIN_ADC_P,
    DOMAIN_CAL,
    EXAMPLE_CAL,
    Arith,
    adc_t_range,
    compensate,
    compensate_t,
    to_s32,
    to_u32,
)


@st.composite
def domain_case(draw):
    cal = {k: draw(st.integers(lo, hi)) for k, (lo, hi) in DOMAIN_CAL.items()}
    lo, hi = adc_t_range(cal)
    adc_t = draw(st.integers(lo, hi))
    adc_p = draw(st.integers(*DOMAIN_ADC_P))
    adc_h = draw(st.integers(*DOMAIN_ADC_H))
    return cal, adc_t, adc_p, adc_h


def _traces(cal, adc_t, adc_p, adc_h):
    w, e = Arith(wrap=True), Arith(wrap=False)
    rw = compensate(adc_t, adc_p, adc_h, cal, w)
    re_ = compensate(adc_t, adc_p, adc_h, cal, e)
    return rw, re_, w.trace, e.trace


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(domain_case())
def test_int32_model_never_wraps_in_domain(case) -> None:
    cal, adc_t, adc_p, adc_h = case
    rw, re_, tw, te = _traces(cal, adc_t, adc_p, adc_h)
    assert len(tw) == len(te)
    for (name, a), (_, b) in zip(tw, te):
        assert a == b, f"step {name} wraps: int32 {a} vs exact {b} for {case}"
    assert rw == re_


def test_domain_corners_never_wrap() -> None:
    """Hypothesis shrinks toward small values; the extremes of every range matter most."""
    rng = random.Random(280)
    for _ in range(3000):
        cal = {k: (lo, hi)[rng.randrange(2)] if rng.random() < 0.7 else rng.randint(lo, hi)
               for k, (lo, hi) in DOMAIN_CAL.items()}
        tlo, thi = adc_t_range(cal)
        adc_t = rng.choice((tlo, thi, rng.randint(tlo, thi)))
        adc_p = rng.choice((*DOMAIN_ADC_P, rng.randint(*DOMAIN_ADC_P)))
        adc_h = rng.choice((*DOMAIN_ADC_H, rng.randint(*DOMAIN_ADC_H)))
        _, _, tw, te = _traces(cal, adc_t, adc_p, adc_h)
        assert tw == te, (cal, adc_t, adc_p, adc_h)


def test_model_detects_overflow_outside_domain() -> None:
    """The trace comparison can fail: a 120 degC t_fine overflows the pressure formula."""
    cal = dict(EXAMPLE_CAL)
    _, _, tw, te = _traces(cal, 900000, 400000, 30000)
    assert tw != te


def test_wrapping_helpers() -> None:
    assert to_s32(0x7FFFFFFF + 1) == -(2**31)
    assert to_s32(-1) == -1
    assert to_u32(-1) == 0xFFFFFFFF
    assert to_u32(3125 * 1048576) == 3125 * 1048576  # 3.28e9 fits uint32, not int32


def test_datasheet_temperature_example_in_reference() -> None:
    # BMP280/BME280 datasheet worked example: adc_T 519888 -> t_fine 128422, T 25.08 degC.
    assert compensate_t(519888, EXAMPLE_CAL) == (128422, 2508)


def test_pressure_uses_both_bosch_branches_in_domain() -> None:
    """Both division branches of BME280_compensate_P_int32 occur inside the domain."""
    cal = dict(EXAMPLE_CAL)
    for adc_p, expect_high in ((DOMAIN_ADC_P[0], True), (DOMAIN_ADC_P[1], False)):
        a = Arith()
        compensate(519888, adc_p, 30000, cal, a)
        p0 = dict(a.trace)["p.p0"]
        assert (p0 >= 0x80000000) == expect_high, p0


viper32 = pytest.importorskip("viper32")


def test_viper_kernel_source_matches_reference_at_32_and_64_bits() -> None:
    """The driver's kernel, executed with ESP32 (32-bit) and unix-port (64-bit) int semantics."""
    from array import array

    mods = viper32.load_widths(FIRMWARE_DIR / "canopy" / "bme280.py", whole_module=False)
    rng = random.Random(32)
    names = list(DOMAIN_CAL)
    for i in range(1000):
        cal = {k: (lo, hi)[rng.randrange(2)] if rng.random() < 0.4 else rng.randint(lo, hi)
               for k, (lo, hi) in DOMAIN_CAL.items()}
        if i == 0:
            cal = dict(EXAMPLE_CAL)
        tlo, thi = adc_t_range(cal)
        adc_t = rng.choice((tlo, thi, rng.randint(tlo, thi)))
        adc_p = rng.choice((*DOMAIN_ADC_P, rng.randint(*DOMAIN_ADC_P)))
        adc_h = rng.choice((*DOMAIN_ADC_H, rng.randint(*DOMAIN_ADC_H)))
        data = bytearray([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4,
                          adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0xF) << 4,
                          adc_h >> 8, adc_h & 0xFF])

        def call(mod):
            out = array("i", [0, 0, 0])
            tf = mod.compensate(array("i", [cal[k] for k in names]), data, out, 1 << 31)
            return [tf, *out]

        got = viper32.run_widths(mods, call)
        assert got == list(compensate(adc_t, adc_p, adc_h, cal)), (cal, adc_t, adc_p, adc_h)
