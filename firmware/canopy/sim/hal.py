"""Simulated peripherals for the unix port: PWM, Pin and a simulated clock.

``open(board, sim)`` builds a ``canopy.hal.Hardware`` around a ``World`` (microclimate,
simulated BME280 on a simulated I2C bus). The node code cannot tell the difference:
it drives the same ``Servo``/``PwmOut`` mapping as on the chip, and the world reads the
resulting pulse widths and duties back as physical actuator positions.

Time is simulated: ``sleep_ms(ms)`` advances the world by ``ms`` and sleeps ``ms/speed``
of wall time (``speed`` = simulated seconds per wall second; 0 = as fast as possible).

Usage::

    from canopy import board
    from canopy.sim import hal
    hw = hal.open(board.load("unix-sim"), {"seed": 1, "speed": 0})
    hw.sleep_ms(60000)            # one simulated minute, no wall-clock wait
"""

import json
import os
import time

# Imported with this module, not inside open(): all simulation code is loaded before the
# first simulated object exists, so long-lived code and start-up garbage do not
# interleave on a small heap.
from canopy import hal
from canopy.sim.world import World

TICKS_MASK = 0x3FFFFFFF  # time.ticks_* arithmetic wraps at 2**30
_open_file = open  # this module defines its own open(board, sim)


class SimPWM:
    """Records what the firmware asked for; the world turns it into actuator positions."""

    def __init__(self, pin, freq=0, duty_u16=None, duty_ns=None):
        self.pin = pin
        self._freq = freq
        self._u16 = 0
        self._ns = -1  # -1: the last write was duty_u16
        if duty_u16 is not None:
            self.duty_u16(duty_u16)
        if duty_ns is not None:
            self.duty_ns(duty_ns)

    def freq(self, f=None):
        if f is None:
            return self._freq
        self._freq = f

    def duty_u16(self, v=None):
        if v is None:
            return self._u16
        if v < 0 or v > 65535:
            raise ValueError("duty_u16 out of range")
        self._u16 = v
        self._ns = -1

    def duty_ns(self, v=None):
        if v is None:
            if self._ns >= 0:
                return self._ns
            return self._u16 * (1000000000 // self._freq) // 65535 if self._freq else 0
        if v < 0:
            raise ValueError("duty_ns out of range")
        self._ns = v

    def pulse_ns(self):
        """High time per period, whichever way it was set."""
        return self.duty_ns()

    def fraction(self):
        """Duty as a float 0..1, whichever way it was set."""
        if self._ns >= 0:
            if not self._freq:
                return 0.0
            return min(1.0, self._ns * self._freq / 1e9)
        return self._u16 / 65535


class SimPin:
    OUT = 1
    IN = 0

    def __init__(self, pin_id, mode=None):
        self.id = pin_id
        self._v = 0
        self.changes = 0

    def value(self, v=None):
        if v is None:
            return self._v
        v = 1 if v else 0
        if v != self._v:
            self.changes += 1
        self._v = v


class SimClock:
    """Simulated milliseconds; sleeping steps the world and paces it against the wall clock."""

    def __init__(self, world, speed):
        self.world = world
        self.speed = speed

    def ticks_ms(self):
        return self.world.now_ms & TICKS_MASK

    def sleep_ms(self, ms):
        if ms <= 0:
            return
        self.world.advance(ms)
        if self.speed > 0:
            wall = int(ms / self.speed)
            if wall > 0:
                time.sleep_ms(wall)

    def reboot(self):
        # A virtual node's reboot ends the process; the supervisor starts it again
        # (in the same folder, so boot_id and config persist like flash would).
        raise SystemExit(3)


def load_sim(path="sim.json"):
    """The virtual node's sim.json as a dict ({} when there is none)."""
    try:
        with _open_file(path) as f:
            return json.load(f)
    except OSError:
        return {}


def open(board, sim=None):
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
