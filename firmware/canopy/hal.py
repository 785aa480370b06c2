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
import time

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


class PixelLed:
    """WS2812 status LED (ESP32-S3/C3 DevKits); colours built once so value() allocates nothing."""

    def __init__(self, np):
        self.np = np
        self._on = (0, 0, 24)
        self._off = (0, 0, 0)

    def value(self, on):
        self.np[0] = self._on if on else self._off
        self.np.write()


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


class ChipClock:
    """Real time on the chip; `reboot` is a hard reset."""

    def __init__(self, machine):
        self._machine = machine

    def ticks_ms(self):
        return time.ticks_ms()

    def sleep_ms(self, ms):
        time.sleep_ms(ms)

    def reboot(self):
        self._machine.reset()


def open_machine(board, machine, neopixel=None):
    """Build the Hardware from a `machine` module (real on the chip; a fake in tests)."""
    pins = board["pins"]
    bus = board["i2c"]
    i2c = machine.I2C(
        bus["id"], scl=machine.Pin(bus["scl"]), sda=machine.Pin(bus["sda"]),
        freq=bus.get("freq", 400000),
    )
    # Start every output in its safe state: shade retracted, valve closed, fan off,
    # until the node's first tick decides otherwise.
    shade = Servo(machine.PWM(machine.Pin(pins["shade"]), freq=SERVO_FREQ, duty_u16=0))
    mist = PwmOut(machine.PWM(machine.Pin(pins["mist"]), freq=MIST_FREQ, duty_u16=0))
    fan = PwmOut(machine.PWM(machine.Pin(pins["fan"]), freq=FAN_FREQ, duty_u16=0))
    shade.set(0)
    led = None
    led_pin = pins.get("status_led")
    if led_pin is not None:
        if board.get("status_led_kind") == "ws2812" and neopixel is not None:
            led = PixelLed(neopixel.NeoPixel(machine.Pin(led_pin), 1))
        else:
            led = GpioLed(machine.Pin(led_pin, machine.Pin.OUT))
        led.value(False)
    return Hardware(board, i2c, shade, mist, fan, led, ChipClock(machine), False)


def open(board, sim=None):
    """Hardware for `board`: real peripherals on the ESP32, simulated ones in the unix port.

    `sim` (unix port only) is the virtual node's sim.json dict; None reads ./sim.json.
    """
    if sys.platform == "esp32" and board.get("chip") != "unix":
        import machine

        try:
            import neopixel
        except ImportError:
            neopixel = None
        return open_machine(board, machine, neopixel)
    from canopy.sim import hal as sim_hal

    return sim_hal.open(board, sim)
