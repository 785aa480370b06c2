"""Hardware abstraction: the only module that knows whether it runs on a chip.

``open(board)`` returns a ``Hardware`` whose ``i2c`` bus, ``shade``/``mist``/``fan``
actuators, ``led`` and clock look the same on an ESP32 (``machine`` I2C/PWM/Pin) and in
the unix port (``canopy.sim``: simulated bus, BME280, actuators and microclimate).

Actuator commands are ints 0..10000 (0.01 % of travel/duty). ``set()`` clamps and writes
to the PWM without allocating, so the control tick can call it:

- shade: hobby servo, 50 Hz, 1.0 ms (0 = retracted) .. 2.0 ms (10000 = full shade);
- mist: valve driver (MOSFET + flyback diode), slow PWM so the solenoid can follow;
- fan: 25 kHz PWM (above hearing, the usual 4-wire fan PWM frequency).

Usage::

    from canopy import board, hal
    hw = hal.open(board.load())
    hw.shade.set(5000)            # half shade: 1.5 ms pulses
    hw.sleep_ms(1000)             # real time on the chip, simulated in the unix port
"""

import sys

from micropython import const

FULL = const(10000)
SERVO_FREQ = const(50)
SERVO_MIN_NS = const(1000000)
# ns of pulse per command step: 1.0 ms span / 10000 steps
SERVO_NS_PER_STEP = const(100)
MIST_FREQ = const(10)
FAN_FREQ = const(25000)


class Servo:
    """Hobby servo on a 50 Hz PWM: command 0..10000 -> 1.0..2.0 ms pulse."""

    def __init__(self, pwm):
        self.pwm = pwm
        self.cmd = -1
        # Some ports lack duty_ns; duty_u16 at 50 Hz gives ~3.3 counts per 0.1 % (enough).
        self._ns = hasattr(pwm, "duty_ns")

    def set(self, cmd):
        if cmd < 0:
            cmd = 0
        elif cmd > FULL:
            cmd = FULL
        if cmd == self.cmd:
            return
        self.cmd = cmd
        if self._ns:
            self.pwm.duty_ns(SERVO_MIN_NS + cmd * SERVO_NS_PER_STEP)
        else:
            # (1 ms + cmd * 100 ns) / 20 ms * 65535 == (10000 + cmd) * 13107 / 40000,
            # kept below 2**30 so it stays a small int on the ESP32.
            self.pwm.duty_u16(((FULL + cmd) * 13107 + 20000) // 40000)


class PwmOut:
    """Duty-cycle output (valve driver, fan): command 0..10000 -> duty_u16 0..65535."""

    def __init__(self, pwm):
        self.pwm = pwm
        self.cmd = -1

    def set(self, cmd):
        if cmd < 0:
            cmd = 0
        elif cmd > FULL:
            cmd = FULL
        if cmd == self.cmd:
            return
        self.cmd = cmd
        # cmd * 65535 <= 655350000 < 2**30: no big int on the chip; rounded to nearest.
        self.pwm.duty_u16((cmd * 65535 + 5000) // FULL)


class GpioLed:
    def __init__(self, pin):
        self.pin = pin

    def value(self, on):
        self.pin.value(1 if on else 0)


class Hardware:
    """What the node sees: bus, actuators, LED, clock. Built by `open`."""

    def __init__(self, board, i2c, shade, mist, fan, led, clock, simulated, world=None):
        self.board = board
        self.i2c = i2c
        self.shade = shade
        self.mist = mist
        self.fan = fan
        self.led = led
        self.clock = clock
        self.simulated = simulated
        self.world = world

    def ticks_ms(self):
        return self.clock.ticks_ms()

    def sleep_ms(self, ms):
        self.clock.sleep_ms(ms)

    def reboot(self):
        self.clock.reboot()


# The chip-only parts (real machine peripherals, WS2812 LED) are in canopy.hal_esp32, which
# the unix port never loads; these names stay reachable here for callers and tests.
_CHIP_ONLY = ("open_machine", "PixelLed", "ChipClock")


def __getattr__(name):
    if name in _CHIP_ONLY:
        from canopy import hal_esp32

        return getattr(hal_esp32, name)
    raise AttributeError(name)


def open(board, sim=None):
    """Hardware for `board`: real peripherals on the ESP32, simulated ones in the unix port.

    `sim` (unix port only) is the virtual node's sim.json dict; None reads ./sim.json.
    """
    if sys.platform == "esp32" and board.get("chip") != "unix":
        import machine

        from canopy.hal_esp32 import open_machine

        try:
            import neopixel
        except ImportError:
            neopixel = None
        return open_machine(board, machine, neopixel)
    # Start-up code, loaded with all the simulation modules before the first simulated
    # object exists; main.py forgets it once the node is built.
    from canopy.sim import build

    return build.open(board, sim)
