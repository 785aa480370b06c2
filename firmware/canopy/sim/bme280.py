"""Register-level model of a Bosch BME280 on a `SimI2C` bus (unix port and CPython).

Physical values go in with `set_environment(t_c, p_pa, h_pct)`; the model turns them into
raw ADC counts by inverting the chip's own integer compensation (bisection on the
monotonic formulas, with this sensor's calibration), so a correct driver reads back the
environment within one quantisation step. Measurements run like the chip's forced mode:
a ctrl_meas write starts one, the status measuring bit stays set until it is done, then
the data registers 0xF7..0xFE are latched and the mode bits fall back to sleep.

Fault injection: `stuck` (data registers freeze), `offset_t_c` and `drift_t_c_per_s`
(temperature error; drift accumulates on `clock_ms`), `spike(delta_t_c)` (next latched
measurement only), `present = False` (gone from the bus: every access raises ENODEV),
`chip_id = 0x58` (a BMP280 answers instead). `busy_polls = n` makes the next measurements
report "measuring" on n status reads, to check that drivers wait for the data.

Completing a measurement allocates nothing on the unix port (small ints only), so a node
tick that triggers one can run under `micropython.heap_lock()`; `set_environment`,
`spike` and the fault setters allocate and belong outside the tick.

Usage::

    from canopy.sim.i2c import SimI2C
    from canopy.sim.bme280 import SimBME280
    sensor = SimBME280(clock_ms=world.clock_ms)   # calibration={"H4": -12} overrides defaults
    bus = SimI2C(); bus.attach(0x76, sensor)
    sensor.set_environment(24.5, 100800.0, 61.0)
"""

try:
    from time import ticks_ms as _wall_ms
except ImportError:  # CPython
    import time as _time

    def _wall_ms():
        return int(_time.monotonic() * 1000)

try:
    import micropython
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x

    class micropython:  # @micropython.native is then a no-op
        native = staticmethod(lambda f: f)


CHIP_ID = const(0x60)
_REG_CHIP_ID = const(0xD0)
_REG_RESET = const(0xE0)
_REG_CTRL_HUM = const(0xF2)
_REG_STATUS = const(0xF3)
_REG_CTRL_MEAS = const(0xF4)
_REG_CONFIG = const(0xF5)
_REG_DATA = const(0xF7)
_REG_DATA_END = const(0xFE)
_MEASURING = const(0x08)
_SKIPPED_20 = const(0x80000)  # what the data registers hold for a skipped (osrs = 0) channel
_SKIPPED_16 = const(0x8000)
_TF_PER_C = const(5120)  # t_fine units per degC


def _oversampling(field):
    osrs = field & 7
    return 0 if osrs == 0 else 1 << ((osrs if osrs < 5 else 5) - 1)


class SimBME280:
    def __init__(self, calibration=None, clock_ms=None):
        from canopy.sim import build  # start-up code; already loaded on a virtual node

        # T1..T3, P1..P9, H1..H6 as a list: a dict would cost ~0.7 KB more on a small heap
        self._c = build.calibration(calibration)
        self._clock = clock_ms
        self.present = True
        self.chip_id = CHIP_ID
        self.stuck = False
        self.busy_polls = 0
        self.measurements = 0
        self.status_reads = 0
        self.data_reads_while_measuring = 0
        self._regs = bytearray(256)
        build.pack_calibration(self._regs, self._c)
        self._offset_c = 0.0
        self._offset_tf = 0
        self._drift_c = 0.0
        self._drift_mtf = 0  # t_fine units per 1000 s
        self._drift_acc_tf = 0
        self._drift_t0 = 0
        self._spike_tf = 0
        self._env_tf = 0
        self._adc_t = self._adc_t_eff = self._adc_p = self._adc_h = 0
        self._reset()
        self.set_environment(25.0, 101325.0, 50.0)

    # -- calibration and compensation (plain ints: exact in the kernel's domain) ----------
    # Native (like _latch below): the unix port keeps machine code outside the GC heap,
    # so the model's arithmetic costs a virtual node's small heap almost nothing.

    @micropython.native
    def _tf(self, adc_t):
        c = self._c
        var1 = (((adc_t >> 3) - (c[0] << 1)) * c[1]) >> 11
        d = (adc_t >> 4) - c[0]
        return var1 + ((((d * d) >> 12) * c[2]) >> 14)

    @micropython.native
    def _pres(self, adc_p, tf):
        c = self._c
        var1 = (tf >> 1) - 64000
        q = (var1 >> 2) * (var1 >> 2)
        var2 = (q >> 11) * c[8] + ((var1 * c[7]) << 1)
        var2 = (var2 >> 2) + (c[6] << 16)
        var1 = (((c[5] * (q >> 13)) >> 3) + ((c[4] * var1) >> 1)) >> 18
        var1 = ((32768 + var1) * c[3]) >> 15
        if var1 <= 0:
            return 0
        diff = (1048576 - adc_p) - (var2 >> 12)
        if diff <= 687194:
            p = (diff * 6250) // var1
        else:
            p = ((diff * 3125) // var1) * 2
        var1 = (c[11] * (((p >> 3) * (p >> 3)) >> 13)) >> 12
        var2 = ((p >> 2) * c[10]) >> 13
        return p + ((var1 + var2 + c[9]) >> 4)

    @micropython.native
    def _hum(self, adc_h, tf):
        c = self._c
        v = tf - 76800
        left = ((adc_h << 14) - (c[15] << 20) - (c[16] * v) + 16384) >> 15
        right = ((((((v * c[17]) >> 10) * (((v * c[14]) >> 11) + 32768)) >> 10) + 2097152) * c[13] + 8192) >> 14
        v = left * right
        v = v - (((((v >> 15) * (v >> 15)) >> 7) * c[12]) >> 4)
        v = 0 if v < 0 else (419430400 if v > 419430400 else v)
        return v >> 12

    @micropython.native
    def _invert_t(self, target_tf):
        # t_fine rises with adc_T: smallest adc reaching the target, or its neighbour below.
        lo = 0
        hi = 0xFFFFF
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._tf(mid) < target_tf:
                lo = mid + 1
            else:
                hi = mid
        if lo > 0 and target_tf - self._tf(lo - 1) < self._tf(lo) - target_tf:
            lo -= 1
        return lo

    @micropython.native
    def _invert_ph(self, fn, s, target, hi, tf):
        # adc_P or adc_H for a target pressure/humidity: the nearest raw value, by bisection
        # on fn. s = 1 when fn rises with the raw value (humidity), -1 when it falls
        # (pressure): the sign flips the comparisons so one search serves both.
        lo = 0
        while lo < hi:
            mid = (lo + hi) >> 1
            if s * fn(mid, tf) < s * target:
                lo = mid + 1
            else:
                hi = mid
        if lo > 0 and s * (target - fn(lo - 1, tf)) < s * (fn(lo, tf) - target):
            lo -= 1
        return lo

    # -- environment and faults (call outside the control tick: these allocate) ------------

    def set_environment(self, t_c, p_pa, h_pct):
        """Physical truth for the next measurements: degC, Pa, %RH (floats)."""
        self.t_c = t_c
        self.p_pa = p_pa
        self.h_pct = h_pct
        self._env_tf = int(round(t_c * _TF_PER_C))
        adc_t = self._invert_t(self._env_tf)
        tf = self._tf(adc_t)  # P and H raw values follow the true temperature
        self._adc_t = adc_t
        self._adc_p = self._invert_ph(self._pres, -1, p_pa, 0xFFFFF, tf)
        self._adc_h = self._invert_ph(self._hum, 1, h_pct * 1024, 0xFFFF, tf)
        self._refresh_t()

    def set_raw(self, adc_t, adc_p, adc_h):
        """Bypass the physics: the next measurements latch these raw ADC counts."""
        self._adc_t = adc_t
        self._adc_p = adc_p
        self._adc_h = adc_h
        self._env_tf = self._tf(adc_t)
        self._refresh_t()

    def _refresh_t(self):
        self._adc_t_eff = self._invert_t(self._env_tf + self._offset_tf) if self._offset_tf else self._adc_t

    @property
    def offset_t_c(self):
        return self._offset_c

    @offset_t_c.setter
    def offset_t_c(self, value):
        self._offset_c = value
        tf = int(round(value * _TF_PER_C))
        if tf != self._offset_tf:
            self._offset_tf = tf
            self._refresh_t()

    @property
    def drift_t_c_per_s(self):
        return self._drift_c

    @drift_t_c_per_s.setter
    def drift_t_c_per_s(self, value):
        now = self._now()
        self._drift_acc_tf = self._drift_tf(now)  # keep what has drifted so far
        self._drift_t0 = now
        self._drift_c = value
        self._drift_mtf = int(round(value * _TF_PER_C * 1000))

    def reset_drift(self):
        """Forget accumulated drift (a recalibrated sensor)."""
        self._drift_acc_tf = 0
        self._drift_t0 = self._now()

    def spike(self, delta_t_c):
        """The next latched measurement reads `delta_t_c` too hot (or cold); then normal."""
        self._spike_tf = int(round(delta_t_c * _TF_PER_C))

    def _now(self):
        return self._clock() if self._clock is not None else _wall_ms()

    def _drift_tf(self, now):
        return self._drift_acc_tf + self._drift_mtf * (now - self._drift_t0) // 1000000

    # -- register interface (SimI2C) ----------------------------------------------------

    def _reset(self):
        r = self._regs
        for reg in (_REG_CTRL_HUM, _REG_STATUS, _REG_CTRL_MEAS, _REG_CONFIG):
            r[reg] = 0
        for reg in range(_REG_DATA, _REG_DATA_END + 1):
            r[reg] = 0
        r[0xF7] = r[0xFA] = r[0xFD] = 0x80  # datasheet reset values of the data registers
        self._osrs_h = 0
        self._measuring = False
        self._polls_left = 0
        self._t0 = 0
        self._dur = 0
        self._iir_t = self._iir_p = -1

    def read_reg(self, reg):
        if self._measuring:
            self._update()
        if reg == _REG_CHIP_ID:
            return self.chip_id
        if reg == _REG_STATUS:
            self.status_reads += 1
            if self._measuring:
                if self._polls_left > 0:
                    self._polls_left -= 1
                return _MEASURING
            return 0
        if _REG_DATA <= reg <= _REG_DATA_END:
            if self._measuring:
                self.data_reads_while_measuring += 1
            elif reg == _REG_DATA and self._regs[_REG_CTRL_MEAS] & 3 == 3 and self._clock is None:
                self._latch()  # normal mode without a clock: every burst sees a new sample
        return self._regs[reg]

    def write_reg(self, reg, value):
        r = self._regs
        if reg == _REG_RESET:
            if value == 0xB6:
                self._reset()
        elif reg == _REG_CTRL_HUM:
            r[reg] = value & 0x07  # latched into the measurement only by a ctrl_meas write
        elif reg == _REG_CONFIG:
            if (value ^ r[reg]) & 0x1C:
                self._iir_t = self._iir_p = -1
            r[reg] = value
        elif reg == _REG_CTRL_MEAS:
            r[reg] = value
            self._osrs_h = r[_REG_CTRL_HUM]
            if value & 3:
                self._start()
            else:
                self._measuring = False

    def _start(self):
        r = self._regs
        n = _oversampling(r[_REG_CTRL_MEAS] >> 5) + _oversampling(r[_REG_CTRL_MEAS] >> 2)
        n += _oversampling(self._osrs_h)
        # datasheet 9.1 typical conversion time: 1 + 2 * sum(oversampling) (+0.5 per P/H) ms
        self._dur = 1 + 2 * n + 1
        self._t0 = self._now() if self._clock is not None else 0
        self._polls_left = self.busy_polls
        self._measuring = True
        if self._polls_left == 0 and self._clock is None:
            self._complete()

    def _update(self):
        if self._polls_left > 0:
            return
        if self._clock is not None and self._clock() - self._t0 < self._dur:
            return
        self._complete()

    def _complete(self):
        r = self._regs
        self._measuring = False
        if r[_REG_CTRL_MEAS] & 3 != 3:
            r[_REG_CTRL_MEAS] &= 0xFC  # forced mode falls back to sleep
        elif self._clock is not None:
            self._t0 += self._dur  # normal mode: the next conversion follows
            self._polls_left = self.busy_polls
            self._measuring = True
        self.measurements += 1
        self._latch()

    # Native for the same reason as SimI2C's transfers: it runs inside the node's tick
    # and its bytecode frame would exceed the VM's C-stack budget (heap-allocated per call).
    @micropython.native
    def _latch(self):
        if self.stuck:
            return
        r = self._regs
        adc_t = self._adc_t_eff
        extra = self._spike_tf
        if self._drift_mtf or self._drift_acc_tf:
            extra += self._drift_tf(self._now())
        if extra:
            adc_t = self._invert_t(self._env_tf + self._offset_tf + extra)
        self._spike_tf = 0
        adc_p = self._adc_p
        coef = (r[_REG_CONFIG] >> 2) & 7
        if coef:
            # IIR filter (datasheet 3.4.4) on T and P: out = (old * (c - 1) + new) / c
            c = 1 << (coef if coef < 4 else 4)
            self._iir_t = adc_t if self._iir_t < 0 else (self._iir_t * (c - 1) + adc_t) // c
            self._iir_p = adc_p if self._iir_p < 0 else (self._iir_p * (c - 1) + adc_p) // c
            adc_t = self._iir_t
            adc_p = self._iir_p
        osrs_t = (r[_REG_CTRL_MEAS] >> 5) & 7
        osrs_p = (r[_REG_CTRL_MEAS] >> 2) & 7
        adc_t = self._resolution(adc_t, osrs_t, coef)
        adc_p = self._resolution(adc_p, osrs_p, coef)
        adc_h = self._adc_h if self._osrs_h else _SKIPPED_16
        r[0xF7] = adc_p >> 12
        r[0xF8] = (adc_p >> 4) & 0xFF
        r[0xF9] = (adc_p & 0x0F) << 4
        r[0xFA] = adc_t >> 12
        r[0xFB] = (adc_t >> 4) & 0xFF
        r[0xFC] = (adc_t & 0x0F) << 4
        r[0xFD] = adc_h >> 8
        r[0xFE] = adc_h & 0xFF

    @staticmethod
    def _resolution(adc, osrs, coef):
        if not osrs:
            return _SKIPPED_20
        if coef:
            return adc  # with the filter on, all 20 bits are significant
        # without the filter, resolution is 16 + (osrs - 1) bits (datasheet 3.4.2/3.4.3)
        drop = 5 - (osrs if osrs < 5 else 5)
        return (adc >> drop) << drop

    def latched(self):
        """(adc_T, adc_P, adc_H) currently in the data registers."""
        if self._measuring:
            self._update()
        r = self._regs
        return (
            (r[0xFA] << 12) | (r[0xFB] << 4) | (r[0xFC] >> 4),
            (r[0xF7] << 12) | (r[0xF8] << 4) | (r[0xF9] >> 4),
            (r[0xFD] << 8) | r[0xFE],
        )
