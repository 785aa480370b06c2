"""Bosch BME280 temperature/pressure/humidity driver with allocation-free integer readout.

Results are ints: temperature in 0.01 degC, pressure in Pa, humidity in 1/1024 %RH,
computed exactly as Bosch's 32-bit integer formulas (datasheet BST-BME280-DS002:
`BME280_compensate_T_int32`, the appendix's `BME280_compensate_P_int32`,
`bme280_compensate_H_int32`) by one viper kernel.

Usage::

    from machine import I2C, Pin
    from array import array
    from canopy.bme280 import BME280

    sensor = BME280(I2C(0, sda=Pin(21), scl=Pin(22)), address=0x76)
    t, p, h = sensor.read()          # 2508 -> 25.08 degC, 100656 Pa, 56317 -> 55.0 %RH

    # Pipelined and allocation-free, for a control loop:
    out = array("i", [0, 0, 0])
    sensor.start()                   # trigger a forced measurement
    ...                              # do other work for >= ~10 ms
    if sensor.ready():
        sensor.read_into(out)        # out = [t, p, h]; sensor.t_fine updated

Kernel input domain (inside it, every intermediate fits in int32, so the kernel is exact
on a 32-bit ESP32 and on the 64-bit unix port alike; see docs/bme280.md):
calibration dig_T1 26000..30000, T2 24000..28000, T3 -1200..1200, P1 34000..40000,
P2 -12000..-9000, P3 2000..4000, P4 0..12000, P5 -600..600, P6 -20..20, P7 5000..16000,
P8 -16000..-8000, P9 2000..8000, H1 0..100, H2 300..450, H3 0..20, H4 250..400, H5 0..60,
H6 20..40; adc_T giving t_fine within -40..85 degC; adc_P 150000..800000; adc_H 0..52000.
"""

from array import array

import micropython
from micropython import const

from time import sleep_ms, ticks_add, ticks_diff, ticks_ms

_REG_CALIB_TP = const(0x88)  # 0x88..0xA1: dig_T1..dig_P9, (0xA0 unused), dig_H1
_CALIB_TP_LEN = const(26)
_REG_CALIB_H = const(0xE1)  # 0xE1..0xE7: dig_H2..dig_H6
_CALIB_H_LEN = const(7)
_REG_CHIP_ID = const(0xD0)
_REG_RESET = const(0xE0)
_REG_CTRL_HUM = const(0xF2)
_REG_STATUS = const(0xF3)
_REG_CTRL_MEAS = const(0xF4)
_REG_CONFIG = const(0xF5)
_REG_DATA = const(0xF7)  # 0xF7..0xFE: press[3], temp[3], hum[2]
_DATA_LEN = const(8)

_CHIP_ID_BME280 = const(0x60)
_RESET_WORD = const(0xB6)
_STATUS_MEASURING = const(0x08)
_STATUS_IM_UPDATE = const(0x01)
_MODE_MASK = const(0x03)
_MODE_SLEEP = const(0x00)
_MODE_FORCED = const(0x01)

# A BMP280 answers at the same addresses, with ids 0x56/0x57 (samples) and 0x58.
_BMP280_IDS = (0x56, 0x57, 0x58)


class BME280Error(OSError):
    """The sensor is missing, not a BME280, or did not finish a measurement in time."""


@micropython.viper
def compensate(cal: ptr32, data: ptr8, out: ptr32, sign: int) -> int:
    """Raw burst `data` (0xF7..0xFE) -> out[0..2] = (T, P, H); returns t_fine.

    `cal` holds dig_T1..T3, P1..P9, H1..H6 in an array('i', 18). `sign` must be 1 << 31:
    it sign-extends the ptr32 loads, which the x64 unix port zero-extends (on the ESP32
    the xor/subtract is a no-op). Exact for the domain in the module docstring.
    """
    adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
    adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
    adc_h = (data[6] << 8) | data[7]
    t1 = cal[0]
    t2 = (cal[1] ^ sign) - sign  # wrap-ok: sign extension
    t3 = (cal[2] ^ sign) - sign  # wrap-ok: sign extension
    p1 = cal[3]
    p2 = (cal[4] ^ sign) - sign  # wrap-ok: sign extension
    p3 = (cal[5] ^ sign) - sign  # wrap-ok: sign extension
    p4 = (cal[6] ^ sign) - sign  # wrap-ok: sign extension
    p5 = (cal[7] ^ sign) - sign  # wrap-ok: sign extension
    p6 = (cal[8] ^ sign) - sign  # wrap-ok: sign extension
    p7 = (cal[9] ^ sign) - sign  # wrap-ok: sign extension
    p8 = (cal[10] ^ sign) - sign  # wrap-ok: sign extension
    p9 = (cal[11] ^ sign) - sign  # wrap-ok: sign extension
    h1 = cal[12]
    h2 = (cal[13] ^ sign) - sign  # wrap-ok: sign extension
    h3 = cal[14]
    h4 = (cal[15] ^ sign) - sign  # wrap-ok: sign extension
    h5 = (cal[16] ^ sign) - sign  # wrap-ok: sign extension
    h6 = (cal[17] ^ sign) - sign  # wrap-ok: sign extension

    # Temperature: BME280_compensate_T_int32.
    var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    d = (adc_t >> 4) - t1
    var2 = (((d * d) >> 12) * t3) >> 14
    t_fine = var1 + var2
    out[0] = (t_fine * 5 + 128) >> 8

    # Pressure: BME280_compensate_P_int32.
    var1 = (t_fine >> 1) - 64000
    q = (var1 >> 2) * (var1 >> 2)
    var2 = (q >> 11) * p6
    var2 = var2 + ((var1 * p5) << 1)
    var2 = (var2 >> 2) + (p4 << 16)
    var1 = (((p3 * (q >> 13)) >> 3) + ((p2 * var1) >> 1)) >> 18
    var1 = ((32768 + var1) * p1) >> 15
    p = 0
    if var1 > 0:  # Bosch guards == 0; <= 0 only happens with a corrupt calibration
        diff = (1048576 - adc_p) - (var2 >> 12)
        # Bosch forms diff * 3125 as uint32 (up to ~3.3e9) and divides it by var1.
        # Splitting diff = hi * var1 + lo keeps every product below 2**31 with the same
        # floor result: lo < var1 < 2**17, so lo * 6250 < 2**30.
        hi = diff // var1
        lo = diff - hi * var1
        if diff <= 687194:  # diff * 3125 < 0x80000000: Bosch's (p << 1) / var1 branch
            p = hi * 6250 + (lo * 6250) // var1
        else:  # Bosch's (p / var1) * 2 branch, which drops one bit of precision
            p = (hi * 3125 + (lo * 3125) // var1) * 2
        var1 = (p9 * (((p >> 3) * (p >> 3)) >> 13)) >> 12
        var2 = ((p >> 2) * p8) >> 13
        p = p + ((var1 + var2 + p7) >> 4)
    out[1] = p

    # Humidity: bme280_compensate_H_int32.
    v = t_fine - 76800
    left = ((adc_h << 14) - (h4 << 20) - (h5 * v) + 16384) >> 15
    right = ((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192) >> 14
    v = left * right
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
    if v < 0:
        v = 0
    if v > 419430400:  # 100 %RH in Q22.10 << 12
        v = 419430400
    out[2] = v >> 12
    return t_fine


def _osrs(name, value):
    if not isinstance(value, int) or value < 1 or value > 5:
        raise ValueError("%s must be 1..5 (oversampling x1, x2, x4, x8, x16), got %r" % (name, value))
    return value


def parse_calibration(tp, h, cal):
    """Fill `cal` (array('i', 18)) from the 26 bytes at 0x88 and the 7 bytes at 0xE1."""

    def u16(b, i):
        return b[i] | (b[i + 1] << 8)

    def s16(b, i):
        v = b[i] | (b[i + 1] << 8)
        return v - 65536 if v & 0x8000 else v

    cal[0] = u16(tp, 0)
    cal[1] = s16(tp, 2)
    cal[2] = s16(tp, 4)
    cal[3] = u16(tp, 6)
    for i in range(8):  # dig_P2..dig_P9
        cal[4 + i] = s16(tp, 8 + 2 * i)
    cal[12] = tp[25]  # dig_H1 at 0xA1
    cal[13] = s16(h, 0)  # dig_H2 at 0xE1/0xE2
    cal[14] = h[2]  # dig_H3 at 0xE3
    # dig_H4 = 0xE4[7:0] << 4 | 0xE5[3:0]; dig_H5 = 0xE6[7:0] << 4 | 0xE5[7:4]: both signed
    # 12-bit, the sign being bit 7 of 0xE4 / 0xE6.
    h4 = (h[3] << 4) | (h[4] & 0x0F)
    h5 = (h[5] << 4) | (h[4] >> 4)
    cal[15] = h4 - 4096 if h4 & 0x800 else h4
    cal[16] = h5 - 4096 if h5 & 0x800 else h5
    cal[17] = h[6] - 256 if h[6] & 0x80 else h[6]  # dig_H6 signed 8-bit


class BME280:
    """A BME280 on `i2c` (machine.I2C or anything with readfrom_mem(_into)/writeto_mem)."""

    def __init__(self, i2c, address=0x76, osrs_t=1, osrs_p=1, osrs_h=1, iir=0):
        if not isinstance(address, int) or address < 0 or address > 0x7F:
            raise ValueError("address must be a 7-bit I2C address (BME280: 0x76 or 0x77), got %r" % (address,))
        _osrs("osrs_t", osrs_t)
        _osrs("osrs_p", osrs_p)
        _osrs("osrs_h", osrs_h)
        if not isinstance(iir, int) or iir < 0 or iir > 4:
            raise ValueError("iir must be 0..4 (filter off, coefficient 2, 4, 8, 16), got %r" % (iir,))
        self._i2c = i2c
        self.address = address
        self.t_fine = 0
        self.calibration = array("i", [0] * 18)
        self._data = bytearray(_DATA_LEN)
        self._status = bytearray(2)  # status (0xF3) and ctrl_meas (0xF4), read in one burst
        self._one = bytearray(1)
        self._out = array("i", [0, 0, 0])
        self._sign = 1 << 31  # a Python-level int: only viper literals must stay < 2**30
        # Worst-case conversion time, datasheet section 9.1, in microseconds.
        n = (1 << (osrs_t - 1)) + (1 << (osrs_p - 1)) + (1 << (osrs_h - 1))
        self.max_measure_ms = (1250 + 2300 * n + 575 * 2 + 999) // 1000

        chip = self._chip_id()
        if chip in _BMP280_IDS:
            raise BME280Error(
                "the device at I2C address 0x%02x is a BMP280 (chip id 0x%02x): it has no "
                "humidity sensor; fit a BME280 (chip id 0x60)" % (address, chip)
            )
        if chip != _CHIP_ID_BME280:
            raise BME280Error(
                "the device at I2C address 0x%02x is not a BME280: chip id 0x%02x, expected 0x60"
                % (address, chip)
            )
        # Soft reset puts a sensor left in normal mode (e.g. by a previous firmware) to sleep,
        # so config writes are not ignored; the NVM calibration copy takes ~2 ms.
        self._write(_REG_RESET, _RESET_WORD)
        sleep_ms(3)
        for _ in range(20):
            i2c.readfrom_mem_into(address, _REG_STATUS, self._one)
            if not self._one[0] & _STATUS_IM_UPDATE:
                break
            sleep_ms(1)
        tp = bytearray(_CALIB_TP_LEN)
        h = bytearray(_CALIB_H_LEN)
        i2c.readfrom_mem_into(address, _REG_CALIB_TP, tp)
        i2c.readfrom_mem_into(address, _REG_CALIB_H, h)
        parse_calibration(tp, h, self.calibration)
        self._write(_REG_CTRL_HUM, osrs_h)
        self._write(_REG_CONFIG, iir << 2)
        meas = (osrs_t << 5) | (osrs_p << 2)
        # ctrl_hum only takes effect after a ctrl_meas write; this one also leaves sleep mode.
        self._write(_REG_CTRL_MEAS, meas | _MODE_SLEEP)
        self._forced = bytearray((meas | _MODE_FORCED,))

    def _chip_id(self):
        try:
            self._i2c.readfrom_mem_into(self.address, _REG_CHIP_ID, self._one)
        except OSError as e:
            raise BME280Error(
                "no BME280 answers at I2C address 0x%02x (%r): check wiring, power, pull-ups "
                "and the address (SDO low = 0x76, high = 0x77)" % (self.address, e)
            )
        return self._one[0]

    def _write(self, reg, value):
        self._one[0] = value
        self._i2c.writeto_mem(self.address, reg, self._one)

    def start(self):
        """Trigger one forced measurement (ctrl_meas mode = forced). Allocation-free."""
        self._i2c.writeto_mem(self.address, _REG_CTRL_MEAS, self._forced)

    def ready(self):
        """True once the triggered measurement is done. Allocation-free.

        Checks both the status measuring bit and that ctrl_meas fell back to sleep mode, so
        a poll right after `start()`, before the chip raises the measuring bit, is not
        mistaken for a finished conversion.
        """
        self._i2c.readfrom_mem_into(self.address, _REG_STATUS, self._status)
        return not (self._status[0] & _STATUS_MEASURING) and (self._status[1] & _MODE_MASK) == _MODE_SLEEP

    def read_into(self, out):
        """Read the data registers and compensate into out[0..2] (array('i', 3)).

        Allocation-free; I2C OSErrors propagate. Call after `ready()`.
        """
        self._i2c.readfrom_mem_into(self.address, _REG_DATA, self._data)
        self.t_fine = compensate(self.calibration, self._data, out, self._sign)

    def read(self):
        """Blocking forced measurement -> (t 0.01 degC, p Pa, h 1/1024 %RH)."""
        self.start()
        limit = 2 * self.max_measure_ms + 10
        deadline = ticks_add(ticks_ms(), limit)
        while not self.ready():
            if ticks_diff(deadline, ticks_ms()) < 0:
                raise BME280Error(
                    "the BME280 at 0x%02x was still measuring after %d ms" % (self.address, limit)
                )
            sleep_ms(1)
        out = self._out
        self.read_into(out)
        return (out[0], out[1], out[2])
