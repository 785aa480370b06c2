"""Cross-check against an independent driver: adafruit-circuitpython-bme280 (`basic`).

Adafruit's driver runs on CPython against the SAME register-level SimBME280 (served by a
busio-style fake bus); ours runs in the unix port on the raw counts that Adafruit's
measurement latched. Adafruit uses Bosch's floating-point formulas, ours the 32-bit
integer ones, so they agree only within the integer formulas' quantisation (see the
tolerances below). The same comparison checks that Adafruit parses the sim's calibration
registers (including the split signed dig_H4/dig_H5) to the values we configured.
"""

from __future__ import annotations

import math
import random
import sys

import pytest

from canopy_host.paths import FIRMWARE_DIR
from canopy_host.unixport import call_batch
from conftest import MPY_TEST_DIR
from reference.bosch_bme280 import CAL_NAMES, DOMAIN_CAL, EXAMPLE_CAL

if str(FIRMWARE_DIR) not in sys.path:
    sys.path.insert(0, str(FIRMWARE_DIR))

from canopy.sim.bme280 import SimBME280  # noqa: E402
from canopy.sim.i2c import SimI2C  # noqa: E402

adafruit_bme280 = pytest.importorskip("adafruit_bme280.basic")


class FakeBusioI2C:
    """The subset of `busio.I2C` that adafruit_bus_device uses, over a SimI2C.

    A BME280 I2C transaction is a register pointer write followed by a read, or
    (register, value) pairs for writes (datasheet 6.2.1).
    """

    def __init__(self, bus: SimI2C) -> None:
        self.bus = bus
        self._locked = False
        self._ptr: dict[int, int] = {}

    def try_lock(self) -> bool:
        if self._locked:
            return False
        self._locked = True
        return True

    def unlock(self) -> None:
        self._locked = False

    def writeto(self, address: int, buffer, *, start: int = 0, end: int | None = None) -> None:
        data = bytes(buffer[start:end])
        if address not in self.bus.scan():
            raise OSError(19, "no device")
        if len(data) == 1:
            self._ptr[address] = data[0]
            return
        for i in range(0, len(data) - 1, 2):
            self.bus.writeto_mem(address, data[i], bytes([data[i + 1]]))

    def readfrom_into(self, address: int, buffer, *, start: int = 0, end: int | None = None) -> None:
        end = len(buffer) if end is None else end
        tmp = bytearray(end - start)
        reg = self._ptr.get(address, 0)
        self.bus.readfrom_mem_into(address, reg, tmp)
        buffer[start:end] = tmp

    def writeto_then_readfrom(self, address, out_buffer, in_buffer, *, out_start=0, out_end=None,
                              in_start=0, in_end=None) -> None:
        self.writeto(address, out_buffer, start=out_start, end=out_end)
        self.readfrom_into(address, in_buffer, start=in_start, end=in_end)


def _adafruit_reading(cal: dict[str, int], t_c: float, p_pa: float, h_pct: float):
    sim = SimBME280(calibration=cal)
    bus = SimI2C()
    bus.attach(0x76, sim)
    sim.set_environment(t_c, p_pa, h_pct)
    ada = adafruit_bme280.Adafruit_BME280_I2C(FakeBusioI2C(bus), address=0x76)
    t, p_hpa, h = ada.temperature, ada.pressure, ada.humidity
    parsed = [int(v) for v in (*ada._temp_calib, *ada._pressure_calib, *ada._humidity_calib)]
    return (t, p_hpa * 100, h), sim.latched(), parsed


# Tolerances. Adafruit evaluates Bosch's double-precision formulas; the 32-bit integer
# formulas truncate at every shift, and their outputs are quantised:
# * T: output step 0.01 degC (rounded), and t_fine differs by a few units of 1/5120 degC
#   between the truncating integer and float forms -> 0.005 + 0.002 < 0.01 degC.
# * P: the int32 formula truncates its divisor var1 = ((32768 + var1) * dig_P1) >> 15 to an
#   integer near dig_P1 (>= 34000 in the domain): up to 1/34000 of p, 3.2 Pa at 110 kPa;
#   its high branch, (p / var1) * 2, drops one bit: up to 2 Pa; the final >> 4 floors up
#   to 1 Pa; var2 >> 12 and t_fine truncation add ~0.3 Pa. Sum ~6.5 Pa at 110 kPa
#   (a 20000-sample scan against the datasheet's double formula peaks at 6.4) -> 8 Pa.
# * H: output step 1/1024 %RH (0.001); the integer formula truncates its terms at
#   >> 15, >> 10, >> 14 and >> 12; against the datasheet's double formula the error stays
#   below 0.01 %RH over the domain -> 0.02 %RH, after moving our value onto the double
#   formula Adafruit actually uses (see _as_bosch_double_form).
TOL_T_C = 0.01
TOL_P_PA = 8.0
TOL_H_PCT = 0.02


def _as_bosch_double_form(h_pct: float, cal: dict[str, int], t_fine: int) -> float:
    """Our integer humidity, moved onto the formula Adafruit evaluates.

    Bosch's double-precision humidity formula in bme280.c (which Adafruit transcribes)
    scales the linear part x by var5 = 1 + dig_H3 * v / 2**26 (v = t_fine - 76800) once
    more than the datasheet's integer formula does, before the dig_H1 square correction
    out = x * (1 - dig_H1 * x / 2**19). Real parts mostly have dig_H3 = 0, where the two
    agree. So: undo the square correction, apply var5, redo it, clamp like Adafruit.
    """
    k = cal["H1"] / 2**19
    x = h_pct if k == 0 else (1 - math.sqrt(1 - 4 * k * h_pct)) / (2 * k)
    y = x * (1 + cal["H3"] * (t_fine - 76800) / 2**26)
    return min(100.0, max(0.0, y * (1 - k * y)))


def _cases(n: int):
    rng = random.Random(1013)
    cases = [(dict(EXAMPLE_CAL), 25.0, 101325.0, 50.0)]
    for _ in range(n - 1):
        cal = {k: rng.randint(lo, hi) for k, (lo, hi) in DOMAIN_CAL.items()}
        cases.append((cal, rng.uniform(-40, 85), rng.uniform(30000, 110000), rng.uniform(0, 100)))
    return cases


def test_agrees_with_adafruit_within_quantisation() -> None:
    cases = _cases(80)
    ada = [_adafruit_reading(*c) for c in cases]
    batch = [[[c[0][k] for k in CAL_NAMES], [list(latched)]] for c, (_, latched, _) in zip(cases, ada)]
    ours = call_batch("bme280_adapter", "compensate_raw", batch, extra_path=[MPY_TEST_DIR])
    worst = [0.0, 0.0, 0.0]
    for (cal, t_c, p_pa, h_pct), (reading, latched, parsed), got in zip(cases, ada, ours):
        assert parsed == [cal[k] for k in CAL_NAMES], "Adafruit parsed other calibration than configured"
        _, t, p, h = got[0]
        at, ap, ah = reading
        diffs = (abs(t / 100 - at), abs(p - ap), abs(h / 1024 - ah))
        assert diffs[0] <= TOL_T_C, (cal, latched, t, at)
        assert diffs[1] <= TOL_P_PA, (cal, latched, p, ap)
        if 0 < h < 100 * 1024:
            diffs = (diffs[0], diffs[1], abs(_as_bosch_double_form(h / 1024, cal, got[0][0]) - ah))
        worst = [max(a, b) for a, b in zip(worst, diffs)]
        assert diffs[2] <= TOL_H_PCT, (cal, latched, h, ah)
    print("worst |ours - adafruit|: T %.4f degC, P %.2f Pa, H %.4f %%RH" % tuple(worst))


def test_adafruit_parses_negative_h4_h5_like_us() -> None:
    cal = dict(EXAMPLE_CAL, H4=-309, H5=-107, H6=-30, H2=-5)
    _, _, parsed = _adafruit_reading(cal, 20.0, 100000.0, 40.0)
    assert parsed[12:] == [cal[k] for k in CAL_NAMES[12:]]
