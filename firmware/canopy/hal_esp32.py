"""The ESP32 side of canopy.hal: ``machine`` I2C/PWM/Pin, WS2812 status LED, real clock.

Only ``hal.open`` on the chip imports this (virtual nodes never load it). Tests build a
Hardware from a fake ``machine`` module with ``open_machine``.

Usage::

    import machine
    from canopy import board
    from canopy.hal_esp32 import open_machine
    hw = open_machine(board.load(), machine)
    hw.fan.set(2000)              # 20 % duty at 25 kHz
"""

import time

from canopy.hal import FAN_FREQ, MIST_FREQ, SERVO_FREQ, GpioLed, Hardware, PwmOut, Servo


class PixelLed:
    """WS2812 status LED (ESP32-S3/C3 DevKits); colours built once so value() allocates nothing."""

    def __init__(self, np):
        self.np = np
        self._on = (0, 0, 24)
        self._off = (0, 0, 0)

    def value(self, on):
        self.np[0] = self._on if on else self._off
        self.np.write()


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
