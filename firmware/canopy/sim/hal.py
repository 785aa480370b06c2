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

import time

TICKS_MASK = 0x3FFFFFFF  # time.ticks_* arithmetic wraps at 2**30


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


# Building the simulated hardware (open, load_sim) is start-up code: it lives in
# canopy.sim.build, which main.py forgets once the node runs.
def __getattr__(name):
    if name in ("open", "load_sim"):
        from canopy.sim import build

        return getattr(build, name)
    raise AttributeError(name)
