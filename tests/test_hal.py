"""HAL: actuator command -> PWM mapping, the ESP32 branch, board files, simulated climate."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from canopy_host.paths import BOARDS_DIR, FIRMWARE_DIR
from canopy_host.unixport import call_batch
from conftest import MPY_TEST_DIR

CMDS = [-500, 0, 1, 2500, 5000, 7777, 9999, 10000, 12000]


def _batch(func: str, cases: list[list]) -> list:
    return call_batch("node_haltest", func, cases, extra_path=[MPY_TEST_DIR])


def _clamp(c: int) -> int:
    return max(0, min(10000, c))


def test_servo_and_pwm_mapping() -> None:
    (rows,) = _batch("mapping", [[CMDS]])
    for c, (pulse_ns, legacy_u16, duty_u16) in zip(CMDS, rows):
        frac = _clamp(c) / 10000
        # Hobby servo: 1.0 ms (retracted) .. 2.0 ms (full shade) at 50 Hz.
        assert pulse_ns == round(1_000_000 + frac * 1_000_000)
        # Same pulse through duty_u16 (20 ms period), within one LSB.
        assert abs(legacy_u16 - (1.0 + frac) / 20.0 * 65535) <= 1
        # Valve and fan: duty proportional to the command, within one LSB.
        assert abs(duty_u16 - frac * 65535) <= 0.5 + 1e-9
    assert rows[CMDS.index(0)][2] == 0 and rows[CMDS.index(10000)][2] == 65535


def test_mapping_allocates_nothing() -> None:
    assert _batch("mapping_locked", [[CMDS]]) == [True]


@pytest.mark.parametrize("board_file", sorted(p.name for p in BOARDS_DIR.glob("esp32*.json")))
def test_esp32_branch_uses_board_pins(board_file: str) -> None:
    b = json.loads((BOARDS_DIR / board_file).read_text())
    simulated, calls = _batch("esp32_open", [[str(BOARDS_DIR / board_file)]])[0]
    assert simulated is False
    i2c = b["i2c"]
    assert ["I2C", i2c["id"], i2c["scl"], i2c["sda"], i2c["freq"]] in calls
    pins = b["pins"]
    pwms = {c[1]: c[2:] for c in calls if c[0] == "PWM"}
    # Every output starts off (duty 0) at its frequency: servo 50 Hz, valve slow, fan 25 kHz.
    assert pwms[pins["shade"]] == [50, 0]
    assert pwms[pins["fan"]] == [25000, 0]
    assert pwms[pins["mist"]][1] == 0 and 1 <= pwms[pins["mist"]][0] <= 100
    split = calls.index(["--set--"])
    before, after = calls[:split], calls[split:]
    assert ["duty_ns", pins["shade"], 1_000_000] in before  # shade retracted at power-up
    assert ["duty_ns", pins["shade"], 2_000_000] in after
    assert ["duty_u16", pins["mist"], 32768] in after
    assert ["duty_u16", pins["fan"], 65535] in after
    if b["status_led_kind"] == "ws2812":
        assert ["NeoPixel", pins["status_led"], 1] in before
        assert after[-2][0] == "np_write" and any(after[-2][1])
    else:
        assert ["value", pins["status_led"], 1] in after
    assert after[-1] == ["reset"]


def test_every_board_file_loads() -> None:
    files = sorted(BOARDS_DIR.glob("*.json"))
    res = _batch("board_error", [[str(p)] for p in files])
    assert res == [["ok"]] * len(files)


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ('{"name": "x", "i2c": {"id": 0, "sda": 1, "scl": 2}}', "pins"),
        ('{"name": "x", "pins": {"shade": "25", "mist": 1, "fan": 2}, "i2c": {"id": 0, "sda": 1, "scl": 2}}',
         "pins.shade"),
        ('{"name": "x", "pins": {"shade": 1, "mist": 2, "fan": 3}}', "i2c"),
        (None, "not found"),
    ],
)
def test_bad_board_file_gives_clear_error(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "board.json"
    if content is not None:
        path.write_text(content)
    kind, msg = _batch("board_error", [[str(path)]])[0]
    assert kind == "BoardError" and words in msg


# --- the simulated microclimate -----------------------------------------------------------

def _climate():
    spec = importlib.util.spec_from_file_location("canopy_sim_climate", FIRMWARE_DIR / "canopy/sim/climate.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


class _FixedWeather:
    def __init__(self, t: float, rh: float, sun: float) -> None:
        self.v = (t, rh, 101325.0, sun)

    def at(self, t_s: float) -> tuple:
        return self.v


def _steady(cl, shade: float, mist: float, fan: float, sun: float = 1.0, hours: float = 3.0):
    c = cl.Canopy(_FixedWeather(30.0, 40.0, sun), seed=1)
    c.step(hours * 3600, shade, mist, fan)
    return c


def test_weather_is_shared_by_zone_seed_and_identical_in_micropython() -> None:
    cl = _climate()
    times = [0, 60, 1800, 7200]
    mp = _batch("weather", [[77, "mild", 1.0, times], [78, "mild", 1.0, times]])
    same = [list(cl.Weather(77, "mild", 13.0, 1.0).at(t)) for t in times]
    for a, b in zip(mp[0], same):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
    assert mp[0] != mp[1]  # another zone, other weather
    r = cl.Rng(1234)
    assert _batch("rng", [[1234, 50]])[0] == [r.next() for _ in range(50)]


def test_sun_load_and_shade() -> None:
    cl = _climate()
    open_ = _steady(cl, 0.0, 0.0, 0.0)
    rise = open_.t_c - 30.0
    # Full sun, shade open: the stated steady rise, scaled by this site's exposure (+-10 %).
    assert cl.SUN_RISE * 0.9 <= rise <= cl.SUN_RISE * 1.1
    shaded = _steady(cl, 1.0, 0.0, 0.0)
    assert shaded.t_c - 30.0 == pytest.approx(rise * (1 - cl.SHADE_BLOCK), rel=1e-3)
    night = _steady(cl, 0.0, 0.0, 0.0, sun=0.0)
    assert night.t_c == pytest.approx(30.0, abs=1e-3)


def test_fan_mixes_toward_ambient() -> None:
    cl = _climate()
    still = _steady(cl, 0.0, 0.0, 0.0)
    fanned = _steady(cl, 0.0, 0.0, 1.0)
    assert fanned.t_c - 30.0 == pytest.approx((still.t_c - 30.0) / (1 + cl.FAN_BOOST), rel=1e-3)


def test_mist_cools_and_humidifies_like_a_wet_bulb() -> None:
    cl = _climate()
    dry = _steady(cl, 0.0, 0.0, 0.0, sun=0.0)
    wet = _steady(cl, 0.0, 1.0, 0.0, sun=0.0)
    assert wet.t_c < dry.t_c - 1.0 and wet.rh_pct > dry.rh_pct + 10
    # Evaporation trades sensible for latent heat: without sun, T + e/GAMMA stays at its
    # ambient value (the psychrometric relation a wet-bulb thermometer uses).
    ea = cl.sat_vp(30.0) * 0.40
    assert wet.t_c + wet.e_hpa / cl.GAMMA == pytest.approx(30.0 + ea / cl.GAMMA, rel=1e-6)
    # Never cooler than the wet-bulb limit: the air does not oversaturate.
    assert wet.rh_pct <= 100.0


def test_unknown_weather_is_a_clear_error() -> None:
    cl = _climate()
    with pytest.raises(ValueError, match="unknown weather 'sunny'"):
        cl.Weather(1, "sunny")
