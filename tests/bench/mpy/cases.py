"""What the kernel benchmark calls: each case is (callable, args, empty, note).

`empty` is an empty viper function with the callable's signature; timing it from the
same loop gives the loop + call overhead to subtract. The kernels are called directly
(the module-level viper functions), with the buffers their classes would pass, so the
figure is the kernel's own cost; `tick` is the whole `Node.tick()`.

The inputs are the defaults of canopy/config.py and a reading of about 27 degC,
101 kPa, 46 %RH, the same as the C reference's (tests/bench/c/).
"""

from array import array

import micropython

NAMES = ("bme280", "health", "condition", "control", "tick")

# The calibration bytes and data burst of tests/bench/c/harness.c.
BME_CAL_A = bytes((
    0x70, 0x6B, 0x43, 0x67, 0x18, 0xFC, 0x7D, 0x8E, 0x43, 0xD6, 0xD0, 0x0B, 0x27, 0x0B,
    0x8C, 0x00, 0xF9, 0xFF, 0x8C, 0x3C, 0xF8, 0xC6, 0x70, 0x17, 0x00, 0x4B))
BME_CAL_B = bytes((0x6E, 0x01, 0x00, 0x13, 0x2D, 0x03, 0x1E))
BME_DATA = bytes((0x65, 0x80, 0x00, 0x80, 0x79, 0x00, 0x6F, 0x9A))


def _ints(values):
    return array("i", values)


@micropython.viper
def _empty_condition(raw, hist, ema, shift, out, n: int, pos: int, sgn: int):
    pass


@micropython.viper
def _empty_control(meas, par, st, out, n: int, sgn: int):
    pass


@micropython.viper
def _empty_health(raw, lim, st, n: int, present: int, sgn: int) -> int:
    return 0


class _EmptyNode:
    @micropython.viper
    def tick(self):
        pass


def _condition():
    from canopy.condition import SIGN, Conditioner, condition_kernel

    c = Conditioner(3, (2, 3, 2))
    raw = _ints((2512, 101325, 51200))
    out = _ints((0, 0, 0))
    c.update(raw, out)
    args = (raw, c._hist, c._ema, c._shift, out, 3, 2, SIGN)
    return condition_kernel, args, _empty_condition, ""


def _control():
    from canopy.config import DEFAULT_CONFIG
    from canopy.control import SIGN, Controller, control_kernel

    c = Controller(DEFAULT_CONFIG)
    meas = _ints((2750, 101325, 60 * 1024))
    out = _ints((0, 0, 0))
    return control_kernel, (meas, c._par, c._st, out, 3, SIGN), _empty_control, ""


def _health():
    from canopy.config import DEFAULT_CONFIG
    from canopy.health import SIGN, SensorHealth, health_kernel

    h = SensorHealth(DEFAULT_CONFIG)
    raw = _ints((2512, 101325, 51200))
    return health_kernel, (raw, h._lim, h._st, 3, 1, SIGN), _empty_health, ""


def _tick():
    from canopy import board, hal
    from canopy.node import Node

    hw = hal.open(board.load("unix-sim"), {"seed": 1, "speed": 0})
    node = Node(hw, None, boot_id=1)
    for _ in range(10):
        node.tick()
    note = "includes the simulated I2C bus and BME280 model; C column = the four kernels only"
    return node.tick, (), _EmptyNode().tick, note


def _bme280():
    raise ImportError("canopy.bme280 kernel case not written yet")


_MAKERS = {
    "bme280": _bme280,
    "health": _health,
    "condition": _condition,
    "control": _control,
    "tick": _tick,
}


def make(name):
    return _MAKERS[name]()
