"""Start-up code of the simulation: sim.json checks, the simulated sensor's calibration
and building a virtual node's hardware.

None of this runs once the node ticks, so it is kept out of the modules that stay loaded:
``canopy.hal.open`` loads it (with every other simulation module, before the first
simulated object exists) and ``main.py`` forgets it after start-up, which leaves ~3 KB
more of a small heap to the node. The public names stay where callers look for them:
``canopy.sim.hal.open``/``load_sim``, ``canopy.sim.world.parse_faults``/``SimError``/
``FAULT_KINDS`` and ``canopy.sim.bme280.DEFAULT_CALIBRATION`` forward here.

Usage::

    from canopy import board
    from canopy.sim import build
    hw = build.open(board.load("unix-sim"), {"seed": 1, "speed": 0})
"""

import json
import os

from canopy.sim.hal import SimClock, SimPin, SimPWM
from canopy.sim.world import World

_open_file = open  # this module defines its own open(board, sim)

FAULT_KINDS = ("stuck", "drift", "spike", "sensor_off")
_DEFAULT_VALUE = {"drift": 0.01, "spike": 15.0}

class SimError(ValueError):
    """sim.json asks for something the world cannot do; the message says what."""


def parse_faults(faults):
    """Validate the sim.json fault list; return (kind, start_ms, end_ms, value) tuples."""
    out = []
    if not faults:
        return out
    if not isinstance(faults, list):
        raise SimError("sim.json 'faults' must be a list")
    for i, f in enumerate(faults):
        if not isinstance(f, dict):
            raise SimError("sim.json faults[%d] must be an object" % i)
        kind = f.get("kind")
        if kind not in FAULT_KINDS:
            raise SimError("sim.json faults[%d].kind %r: use one of %s" % (i, kind, ", ".join(FAULT_KINDS)))
        at = f.get("at_s", 0)
        dur = f.get("duration_s", 0)
        if not isinstance(at, (int, float)) or at < 0 or not isinstance(dur, (int, float)) or dur < 0:
            raise SimError("sim.json faults[%d]: at_s and duration_s must be numbers >= 0" % i)
        value = f.get("value")
        if value is None:
            value = _DEFAULT_VALUE.get(kind, 0.0)
        start = int(at * 1000)
        out.append((kind, start, start + int(dur * 1000), float(value)))
    return out


# Datasheet example temperature/pressure calibration (BMP280/BME280 worked example) and
# humidity constants typical of real parts, in register order T1..T3, P1..P9, H1..H6.
# The names are split from one string at run time rather than written as 18 literals:
# literal names are interned for the life of the process, and this module is forgotten
# after start-up.
_NAMES = "T1 T2 T3 P1 P2 P3 P4 P5 P6 P7 P8 P9 H1 H2 H3 H4 H5 H6".split()
DEFAULT_CALIBRATION = dict(zip(_NAMES, (27504, 26435, -1000,
                                        36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000,
                                        75, 362, 0, 313, 50, 30)))


def _field_range(i):
    # (min, max) of calibration register field i (index into _NAMES)
    if i in (0, 3):  # T1, P1: unsigned 16-bit
        return (0, 65535)
    if i in (12, 14):  # H1, H3: unsigned 8-bit
        return (0, 255)
    if i in (15, 16):  # H4, H5: signed 12-bit
        return (-2048, 2047)
    if i == 17:  # H6: signed 8-bit
        return (-128, 127)
    return (-32768, 32767)


def calibration(overrides=None):
    """T1..T3, P1..P9, H1..H6 as a list: the defaults with checked `overrides` applied."""
    cal = [DEFAULT_CALIBRATION[k] for k in _NAMES]
    if overrides:
        for k, v in overrides.items():
            if k not in DEFAULT_CALIBRATION:
                raise ValueError("unknown calibration field %r (expected T1..T3, P1..P9, H1..H6)" % (k,))
            i = _NAMES.index(k)
            lo, hi = _field_range(i)
            if not isinstance(v, int) or v < lo or v > hi:
                raise ValueError("calibration %s must be an int in %d..%d, got %r" % (k, lo, hi, v))
            cal[i] = v
    return cal


def pack_calibration(r, c):
    """Write calibration list `c` into register file `r` as the chip's NVM holds it."""
    for i in range(12):  # T1..T3, P1..P9: little-endian 16-bit
        v = c[i] & 0xFFFF
        r[0x88 + 2 * i] = v & 0xFF
        r[0x89 + 2 * i] = v >> 8
    r[0xA1] = c[12]
    h2 = c[13] & 0xFFFF
    r[0xE1] = h2 & 0xFF
    r[0xE2] = h2 >> 8
    r[0xE3] = c[14]
    h4 = c[15] & 0xFFF
    h5 = c[16] & 0xFFF
    r[0xE4] = h4 >> 4
    r[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
    r[0xE6] = h5 >> 4
    r[0xE7] = c[17] & 0xFF


def load_sim(path="sim.json"):
    """The virtual node's sim.json as a dict ({} when there is none)."""
    try:
        with _open_file(path) as f:
            return json.load(f)
    except OSError:
        return {}


def open(board, sim=None):
    """canopy.sim.hal.open: the Hardware of a virtual node (its World, PWMs, LED, clock)."""
    from canopy import hal  # firmware side (MicroPython only; the checks above run on CPython too)

    if sim is None:
        sim = load_sim()
    world = World(sim)
    pins = board["pins"]
    shade = hal.Servo(SimPWM(pins["shade"], freq=hal.SERVO_FREQ, duty_u16=0))
    mist = hal.PwmOut(SimPWM(pins["mist"], freq=hal.MIST_FREQ, duty_u16=0))
    fan = hal.PwmOut(SimPWM(pins["fan"], freq=hal.FAN_FREQ, duty_u16=0))
    shade.set(0)
    led = hal.GpioLed(SimPin(pins.get("status_led", 0), SimPin.OUT))
    world.connect(shade.pwm, mist.pwm, fan.pwm, led.pin)
    speed = os.getenv("CANOPY_SPEED") or sim.get("speed", 1.0)
    try:
        speed = float(speed)
    except ValueError:
        raise ValueError("speed must be a number (simulated seconds per wall second), got %r" % speed)
    clock = SimClock(world, speed)
    return hal.Hardware(board, world.i2c, shade, mist, fan, led, clock, True, world)
