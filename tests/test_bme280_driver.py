"""The real driver (canopy/bme280.py) in the MicroPython unix port, on the simulated bus.

Expected values come from the datasheet's worked example and from the CPython
transcription of Bosch's formulas (tests/reference/bosch_bme280.py), never from the
driver itself.
"""

from __future__ import annotations

import random

import pytest

from canopy_host.unixport import call_batch
from conftest import MPY_TEST_DIR
from reference.bosch_bme280 import (
    CAL_NAMES,
    DOMAIN_ADC_H,
    DOMAIN_ADC_P,
    DOMAIN_CAL,
    EXAMPLE_CAL,
    Arith,
    adc_t_range,
    compensate,
)

ADAPTER = "bme280_adapter"


def _batch(func: str, cases: list) -> list:
    # The default unix-port heap is small; thousands of result lists need more room.
    return call_batch(ADAPTER, func, cases, extra_path=[MPY_TEST_DIR], heapsize="32m")


def _cal_list(cal: dict[str, int]) -> list[int]:
    return [cal[k] for k in CAL_NAMES]


def test_datasheet_worked_example() -> None:
    """dig_T1..T3 = 27504, 26435, -1000 and adc_T = 519888 -> t_fine 128422, T 25.08 degC."""
    cal = dict(EXAMPLE_CAL, T1=27504, T2=26435, T3=-1000)
    blocking, pipelined = _batch(
        "read_blocking", [[_cal_list(cal), 519888, 415148, 30000]]
    ) + _batch("compensate_raw", [[_cal_list(cal), [[519888, 415148, 30000]]]])
    assert blocking[:2] == [128422, 2508]
    assert pipelined[0][:2] == [128422, 2508]


def _random_cal(rng: random.Random) -> dict[str, int]:
    # Edges of each range are where overflow would show; bias toward them.
    return {
        k: (lo, hi)[rng.randrange(2)] if rng.random() < 0.3 else rng.randint(lo, hi)
        for k, (lo, hi) in DOMAIN_CAL.items()
    }


def test_driver_matches_bosch_reference_over_domain() -> None:
    rng = random.Random(20260601)
    cases = []
    for i in range(500):
        cal = dict(EXAMPLE_CAL) if i == 0 else _random_cal(rng)
        tlo, thi = adc_t_range(cal)
        triples = []
        for _ in range(10):
            triples.append([
                rng.choice((tlo, thi, rng.randint(tlo, thi), rng.randint(tlo, thi))),
                rng.choice((*DOMAIN_ADC_P, rng.randint(*DOMAIN_ADC_P), rng.randint(*DOMAIN_ADC_P))),
                rng.choice((*DOMAIN_ADC_H, rng.randint(*DOMAIN_ADC_H), rng.randint(*DOMAIN_ADC_H))),
            ])
        # Bosch switches division branch where diff * 3125 reaches 2**31: hit both sides.
        a = Arith()
        compensate(triples[0][0], 400000, 0, cal, a)
        var2 = dict(a.trace)["p.var2c"]
        for diff in (687194, 687195):
            adc_p = 1048576 - (var2 >> 12) - diff
            if DOMAIN_ADC_P[0] <= adc_p <= DOMAIN_ADC_P[1]:
                triples.append([triples[0][0], adc_p, triples[0][2]])
        cases.append((cal, triples))
    results = _batch("compensate_raw", [[_cal_list(c), t] for c, t in cases])
    assert len(results) == len(cases)
    mismatches = []
    for (cal, triples), got in zip(cases, results):
        for triple, g in zip(triples, got):
            want = list(compensate(*triple, cal))
            if g != want:
                mismatches.append((cal, triple, g, want))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"


ERROR_CASES = {
    # name: (exception class, substrings the message must contain)
    "missing": ("BME280Error", ["no BME280", "0x76", "wiring"]),
    "wrong_address": ("BME280Error", ["no BME280", "0x76", "0x77"]),
    "gone": ("BME280Error", ["no BME280"]),
    "bmp280": ("BME280Error", ["BMP280", "0x58", "humidity"]),
    "unknown_id": ("BME280Error", ["not a BME280", "0x61", "0x60"]),
    "timeout": ("BME280Error", ["still measuring"]),
    "bad_osrs": ("ValueError", ["osrs_t", "1..5"]),
    "bad_iir": ("ValueError", ["iir", "0..4"]),
    "bad_address": ("ValueError", ["address"]),
}


def test_error_handling() -> None:
    names = list(ERROR_CASES) + ["read_into_gone"]
    results = dict(zip(names, _batch("error_case", [[n] for n in names])))
    for name, (cls, words) in ERROR_CASES.items():
        got = results[name]
        assert got[0] == cls, (name, got)
        for w in words:
            assert w in got[2], (name, w, got)
        if cls == "BME280Error":
            assert got[1] is True, "BME280Error must be an OSError subclass"
    # During read_into the bus error itself propagates (ENODEV from the simulated bus).
    assert results["read_into_gone"][0] == "OSError"
    assert results["read_into_gone"][3] == 19


@pytest.mark.parametrize(
    "regs, h4, h5",
    [
        # 0xE4 = H4[11:4], 0xE5 = H5[3:0] << 4 | H4[3:0], 0xE6 = H5[11:4] (datasheet table 16)
        ([0x6A, 0x01, 0x00, 0x13, 0x20, 0x03, 0x1E], 0x130, 0x032),  # typical part: 304, 50
        ([0x6A, 0x01, 0x00, 0xFF, 0xFE, 0xFF, 0x1E], -2, -1),
        ([0x6A, 0x01, 0x00, 0x80, 0x00, 0x80, 0xE2], -2048, -2048),
        ([0x6A, 0x01, 0x00, 0xEC, 0x5B, 0xF9, 0xE2], -309, -107),
    ],
)
def test_calibration_parsing_signed_h4_h5(regs: list[int], h4: int, h5: int) -> None:
    from_bus, direct = _batch("calibration_from_registers", [[regs]])[0]
    expected_h = [EXAMPLE_CAL["H1"], 0x016A, 0x00, h4, h5, regs[6] - 256 if regs[6] & 0x80 else regs[6]]
    assert from_bus[13:] == expected_h[1:]
    assert direct[13:] == expected_h[1:]
    assert from_bus[:12] == [EXAMPLE_CAL[k] for k in CAL_NAMES[:12]]


def test_measuring_bit_honoured() -> None:
    busy = 4
    first, second, polls, early_reads, pipelined = _batch("measuring", [[busy]])[0]
    # The second read must return the new environment (30 degC, 1020 hPa, 70 %RH), which
    # only reaches the data registers when the sim's measurement completes.
    assert abs(first[0] - 1000) <= 1 and abs(second[0] - 3000) <= 1
    assert abs(second[1] - 102000) <= 2
    assert abs(second[2] - 70 * 1024) <= 5  # one adc_H count is ~4.6/1024 %RH here
    assert polls >= busy + 1, "the driver did not wait for the measuring bit to clear"
    assert early_reads == 0, "the driver read data registers while the sim was measuring"
    assert pipelined == [False] * busy + [True]


def test_read_into_allocates_nothing() -> None:
    """start/ready/read_into (and the simulated bus and sensor under them) under heap_lock."""
    (readies, out, errno, _), (f_readies, f_out, f_errno, spiked) = _batch(
        "heap_locked", [[200, False], [50, True]]
    )
    assert readies == 200 and f_readies == 50
    assert abs(out[0] - 2150) <= 1 and abs(out[1] - 99000) <= 3 and abs(out[2] - 45 * 1024) <= 5
    assert errno == 19 and f_errno == 19
    # with faults: +5 degC spike on the first reading, then the +0.5 degC offset (+ tiny drift)
    assert abs(spiked - (2150 + 50 + 500)) <= 2
    assert 2199 <= f_out[0] <= 2203
