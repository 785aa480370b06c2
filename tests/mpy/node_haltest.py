"""MicroPython-side helpers for tests/test_hal.py: actuator mapping, the ESP32 branch of
the HAL driven through a recording fake `machine` module, board loading, weather."""

import micropython

from canopy import board, hal
from canopy.sim.hal import SimPWM


class _NoNsPWM:
    """A PWM without duty_ns (older ports): the servo must fall back to duty_u16."""

    def __init__(self):
        self.u16 = None

    def duty_u16(self, v):
        self.u16 = v


def mapping(cmds):
    """For each command: servo pulse ns, servo duty_u16 fallback, valve/fan duty_u16."""
    servo = hal.Servo(SimPWM(1, freq=hal.SERVO_FREQ))
    legacy = hal.Servo(_NoNsPWM())
    out = hal.PwmOut(SimPWM(2, freq=hal.FAN_FREQ))
    res = []
    for c in cmds:
        servo.set(c)
        legacy.set(c)
        out.set(c)
        res.append([servo.pwm.duty_ns(), legacy.pwm.u16, out.pwm.duty_u16()])
    return res


def mapping_locked(cmds):
    """The same writes under heap_lock: True if none of them allocated."""
    servo = hal.Servo(SimPWM(1, freq=hal.SERVO_FREQ))
    legacy = hal.Servo(_NoNsPWM())
    out = hal.PwmOut(SimPWM(2, freq=hal.FAN_FREQ))
    ok = True
    micropython.heap_lock()
    try:
        for c in cmds:
            servo.set(c)
            legacy.set(c)
            out.set(c)
    except MemoryError:
        ok = False
    micropython.heap_unlock()
    return ok


class _Log:
    def __init__(self):
        self.calls = []


LOG = _Log()


class _Pin:
    OUT = 1

    def __init__(self, n, mode=None):
        self.n = n
        LOG.calls.append(["Pin", n, mode])

    def value(self, v):
        LOG.calls.append(["value", self.n, v])


class _I2C:
    def __init__(self, bus_id, scl, sda, freq):
        LOG.calls.append(["I2C", bus_id, scl.n, sda.n, freq])


class _PWM:
    def __init__(self, pin, freq, duty_u16):
        self.n = pin.n
        LOG.calls.append(["PWM", pin.n, freq, duty_u16])

    def duty_ns(self, v):
        LOG.calls.append(["duty_ns", self.n, v])

    def duty_u16(self, v):
        LOG.calls.append(["duty_u16", self.n, v])


class _FakeMachine:
    Pin = _Pin
    I2C = _I2C
    PWM = _PWM

    def reset(self):
        LOG.calls.append(["reset"])


class _NeoPixel:
    def __init__(self, pin, n):
        LOG.calls.append(["NeoPixel", pin.n, n])
        self.px = [None] * n

    def __setitem__(self, i, v):
        self.px[i] = v

    def write(self):
        LOG.calls.append(["np_write", list(self.px[0])])


class _FakeNeopixelModule:
    NeoPixel = _NeoPixel


def esp32_open(board_path):
    """Open the chip HAL for a board file against the fake machine; return the call log."""
    LOG.calls = []
    b = board.load(board_path)
    hw = hal.open_machine(b, _FakeMachine(), _FakeNeopixelModule())
    LOG.calls.append(["--set--"])
    hw.shade.set(10000)
    hw.mist.set(5000)
    hw.fan.set(10000)
    hw.led.value(True)
    hw.reboot()
    return [hw.simulated, LOG.calls]


def board_error(path):
    try:
        board.load(path)
    except board.BoardError as e:
        return ["BoardError", str(e)]
    return ["ok"]


def weather(zone_seed, kind, gusts, times):
    from canopy.sim.climate import Weather

    w = Weather(zone_seed, kind, 13.0, gusts)
    return [list(w.at(t)) for t in times]


def rng(seed, n):
    from canopy.sim.climate import Rng

    r = Rng(seed)
    return [r.next() for _ in range(n)]
