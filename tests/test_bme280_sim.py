"""The simulated BME280 and I2C bus under CPython (the same module the unix port runs).

Raw counts the sim produces are checked with the independent Bosch transcription
(tests/reference/bosch_bme280.py); register packing with struct and the datasheet layout.
"""

from __future__ import annotations

import random
import struct
import sys

import pytest

from canopy_host.paths import FIRMWARE_DIR
from reference.bosch_bme280 import CAL_NAMES, DOMAIN_CAL, EXAMPLE_CAL, compensate

if str(FIRMWARE_DIR) not in sys.path:
    sys.path.insert(0, str(FIRMWARE_DIR))

from canopy.sim.bme280 import SimBME280  # noqa: E402
from canopy.sim.i2c import SimI2C  # noqa: E402

ADDR = 0x76
CTRL_HUM, STATUS, CTRL_MEAS, CONFIG = 0xF2, 0xF3, 0xF4, 0xF5
X16_FORCED = (5 << 5) | (5 << 2) | 1


class FakeClock:
    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> int:
        return self.ms


def rig(cal=None, clock=None):
    sim = SimBME280(calibration=cal, clock_ms=clock)
    bus = SimI2C()
    bus.attach(ADDR, sim)
    return sim, bus


def measure(bus: SimI2C, ctrl_meas: int = X16_FORCED, osrs_h: int = 5) -> tuple[int, int, int]:
    bus.writeto_mem(ADDR, CTRL_HUM, bytes([osrs_h]))
    bus.writeto_mem(ADDR, CTRL_MEAS, bytes([ctrl_meas]))
    d = bus.readfrom_mem(ADDR, 0xF7, 8)
    return ((d[3] << 12) | (d[4] << 4) | (d[5] >> 4), (d[0] << 12) | (d[1] << 4) | (d[2] >> 4),
            (d[6] << 8) | d[7])


def _random_cal(rng: random.Random) -> dict[str, int]:
    return {k: rng.randint(lo, hi) for k, (lo, hi) in DOMAIN_CAL.items()}


def test_calibration_registers_follow_datasheet_layout() -> None:
    rng = random.Random(7)
    cals = [dict(EXAMPLE_CAL), dict(EXAMPLE_CAL, H4=-309, H5=-107, H6=-128, H2=-32768, H1=255, H3=200)]
    cals += [{k: rng.randint(*r) for k, r in zip(CAL_NAMES, [(0, 65535)] + [(-32768, 32767)] * 2 + [(0, 65535)]
              + [(-32768, 32767)] * 8 + [(0, 255), (-32768, 32767), (0, 255), (-2048, 2047), (-2048, 2047),
                                         (-128, 127)])} for _ in range(50)]
    for cal in cals:
        _, bus = rig(cal)
        tp = struct.unpack("<HhhHhhhhhhhh", bus.readfrom_mem(ADDR, 0x88, 24))
        assert list(tp) == [cal[k] for k in CAL_NAMES[:12]]
        assert bus.readfrom_mem(ADDR, 0xA1, 1)[0] == cal["H1"]
        h2, h3, e4, e5, e6, h6 = struct.unpack("<hBbBbb", bus.readfrom_mem(ADDR, 0xE1, 7))
        assert (h2, h3, h6) == (cal["H2"], cal["H3"], cal["H6"])
        # datasheet table 16: dig_H4 = 0xE4 << 4 | 0xE5[3:0], dig_H5 = 0xE6 << 4 | 0xE5[7:4]
        assert e4 * 16 + (e5 & 0xF) == cal["H4"]
        assert e6 * 16 + (e5 >> 4) == cal["H5"]


def test_chip_id_and_reset_values() -> None:
    sim, bus = rig()
    assert bus.readfrom_mem(ADDR, 0xD0, 1) == b"\x60"
    assert bus.readfrom_mem(ADDR, 0xF7, 8) == bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])
    sim.chip_id = 0x58
    assert bus.readfrom_mem(ADDR, 0xD0, 1) == b"\x58"


def test_inversion_picks_the_best_raw_count() -> None:
    """For each channel the latched raw count is the one whose Bosch output is nearest the target."""
    rng = random.Random(11)
    for i in range(60):
        cal = dict(EXAMPLE_CAL) if i == 0 else _random_cal(rng)
        t_c, p_pa, h_pct = rng.uniform(-40, 85), rng.uniform(30000, 110000), rng.uniform(1, 99)
        sim, bus = rig(cal)
        sim.set_environment(t_c, p_pa, h_pct)
        adc_t, adc_p, adc_h = measure(bus)
        tf = compensate(adc_t, adc_p, adc_h, cal)[0]
        err_t = abs(tf - t_c * 5120)
        for n in (adc_t - 1, adc_t + 1):
            assert err_t <= abs(compensate(n, adc_p, adc_h, cal)[0] - t_c * 5120) + 1
        def p_err(a: int) -> float:
            return abs(compensate(adc_t, a, adc_h, cal)[2] - p_pa)
        def h_err(a: int) -> float:
            return abs(compensate(adc_t, adc_p, a, cal)[3] - h_pct * 1024)
        assert p_err(adc_p) <= min(p_err(adc_p - 1), p_err(adc_p + 1)) + 1
        assert h_err(adc_h) <= min(h_err(adc_h - 1), h_err(adc_h + 1)) + 1
        t, p, h = compensate(adc_t, adc_p, adc_h, cal)[1:]
        assert abs(t - t_c * 100) <= 1 and abs(p - p_pa) <= 1.5 and abs(h - h_pct * 1024) <= 8


def test_oversampling_x1_gives_16_bit_resolution_and_skip_values() -> None:
    sim, bus = rig()
    sim.set_raw(519891, 415149, 30001)
    assert measure(bus, (1 << 5) | (1 << 2) | 1, 1) == (519888, 415136, 30001)  # low 4 bits dropped
    assert measure(bus, (0 << 5) | (0 << 2) | 1, 0) == (0x80000, 0x80000, 0x8000)  # skipped


def test_ctrl_hum_takes_effect_only_after_ctrl_meas_write() -> None:
    clock = FakeClock()
    sim, bus = rig(clock=clock)
    bus.writeto_mem(ADDR, CTRL_MEAS, bytes([X16_FORCED & ~3 | 3]))  # normal mode, ctrl_hum = 0
    clock.ms += 200
    assert bus.readfrom_mem(ADDR, 0xFD, 2) == b"\x80\x00"  # humidity skipped
    bus.writeto_mem(ADDR, CTRL_HUM, b"\x01")
    clock.ms += 200
    assert bus.readfrom_mem(ADDR, 0xFD, 2) == b"\x80\x00"  # still skipped: not latched yet
    bus.writeto_mem(ADDR, CTRL_MEAS, bytes([X16_FORCED & ~3 | 3]))
    clock.ms += 200
    assert bus.readfrom_mem(ADDR, 0xFD, 2) != b"\x80\x00"


def test_forced_measurement_timing_with_clock() -> None:
    clock = FakeClock()
    sim, bus = rig(clock=clock)
    sim.set_raw(500000, 400000, 30000)
    bus.writeto_mem(ADDR, CTRL_HUM, b"\x05")
    bus.writeto_mem(ADDR, CTRL_MEAS, bytes([X16_FORCED]))
    assert bus.readfrom_mem(ADDR, STATUS, 1)[0] & 0x08
    assert bus.readfrom_mem(ADDR, 0xFA, 1)[0] == 0x80  # data not latched yet
    clock.ms += 10
    assert bus.readfrom_mem(ADDR, STATUS, 1)[0] & 0x08  # x16 x3 takes ~100 ms
    clock.ms += 120
    assert not bus.readfrom_mem(ADDR, STATUS, 1)[0] & 0x08
    assert bus.readfrom_mem(ADDR, CTRL_MEAS, 1)[0] & 3 == 0  # back to sleep
    assert sim.latched() == (500000, 400000, 30000)
    assert sim.data_reads_while_measuring == 1


def test_busy_polls() -> None:
    sim, bus = rig()
    sim.busy_polls = 3
    sim.set_raw(500000, 400000, 30000)
    bus.writeto_mem(ADDR, CTRL_MEAS, bytes([X16_FORCED]))
    flags = [bus.readfrom_mem(ADDR, STATUS, 1)[0] & 0x08 for _ in range(5)]
    assert flags == [8, 8, 8, 0, 0]


def test_fault_stuck_spike_offset_drift() -> None:
    clock = FakeClock()
    sim, bus = rig(clock=clock)

    def t_c() -> float:
        bus.writeto_mem(ADDR, CTRL_MEAS, bytes([X16_FORCED]))
        clock.ms += 200
        adc = sim.latched()
        return compensate(*adc, EXAMPLE_CAL)[0] / 5120

    # Bosch's formula only uses adc_T >> 3: t_fine moves in steps of ~13/5120 degC.
    STEP = 0.003
    sim.set_environment(20.0, 100000.0, 50.0)
    assert t_c() == pytest.approx(20.0, abs=STEP)
    sim.stuck = True
    sim.set_environment(30.0, 100000.0, 50.0)
    assert t_c() == pytest.approx(20.0, abs=STEP)
    sim.stuck = False
    assert t_c() == pytest.approx(30.0, abs=STEP)
    sim.spike(8.0)
    assert t_c() == pytest.approx(38.0, abs=STEP)
    assert t_c() == pytest.approx(30.0, abs=STEP)
    sim.offset_t_c = -1.5
    assert sim.offset_t_c == -1.5
    assert t_c() == pytest.approx(28.5, abs=STEP)
    sim.offset_t_c = 0.0
    sim.drift_t_c_per_s = 0.1
    clock.ms += 9800  # t_c() adds 200 ms: 10 s of drift at the next measurement
    assert t_c() == pytest.approx(31.0, abs=STEP)
    sim.drift_t_c_per_s = 0.0
    clock.ms += 10000
    assert t_c() == pytest.approx(31.0, abs=STEP)  # accumulated drift stays, no growth
    sim.reset_drift()
    assert t_c() == pytest.approx(30.0, abs=STEP)


def test_iir_filter_smooths_a_step() -> None:
    sim, bus = rig()
    bus.writeto_mem(ADDR, CONFIG, bytes([1 << 2]))  # coefficient 2
    sim.set_raw(400000, 400000, 30000)
    assert measure(bus)[0] == 400000
    sim.set_raw(500000, 300000, 30000)
    assert measure(bus)[:2] == (450000, 350000)  # halfway, T and P only
    assert measure(bus)[:2] == (475000, 325000)


def test_disappearing_device_raises_enodev() -> None:
    sim, bus = rig()
    assert bus.scan() == [ADDR]
    sim.present = False
    assert bus.scan() == []
    for call in (lambda: bus.readfrom_mem(ADDR, 0xD0, 1),
                 lambda: bus.readfrom_mem_into(ADDR, 0xF7, bytearray(8)),
                 lambda: bus.writeto_mem(ADDR, CTRL_MEAS, b"\x01"),
                 lambda: bus.readfrom_mem(0x77, 0xD0, 1)):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == 19
    sim.present = True
    assert bus.readfrom_mem(ADDR, 0xD0, 1) == b"\x60"


def test_bad_configuration_is_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="unknown calibration field"):
        SimBME280(calibration={"T4": 1})
    with pytest.raises(ValueError, match="H4 must be an int in -2048..2047"):
        SimBME280(calibration={"H4": 4000})
    with pytest.raises(ValueError, match="I2C address"):
        SimI2C().attach(0x80, SimBME280())
