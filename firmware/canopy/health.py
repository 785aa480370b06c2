"""Sensor health: missing device, stuck readings and out-of-range values.

`check()` returns a latched fault bitmask (0 = healthy) that clears by itself
after `recover_m` good readings in a row. One viper call per check, no allocation.

Usage::

    from array import array
    from canopy.config import DEFAULT_CONFIG
    from canopy.health import SensorHealth, FAULT_STUCK
    health = SensorHealth(DEFAULT_CONFIG)
    raw = array('i', (2512, 101325, 51200))
    faults = health.check(raw, True)        # present=False when the read failed
    if faults & FAULT_STUCK: ...

Stuck means `stuck_n` readings in a row identical on ALL channels: a live BME280
always jitters in the last digits of at least one channel, while a frozen or
disconnected-but-acking part repeats the same registers.
"""

import micropython
from array import array
from micropython import const

from canopy.config import get

FAULT_MISSING = const(1)
FAULT_STUCK = const(2)
FAULT_RANGE = const(4)

SIGN = 1 << 31


@micropython.viper
def health_kernel(raw, lim, st, n: int, present: int, sgn: int) -> int:
    """Update the health state with one reading; return the latched fault mask.

    raw  array('i', n)       reading, any int32 (|x| < 2**31)
    lim  array('i', 2n + 2)  [min0, max0, ..., min(n-1), max(n-1), stuck_n, recover_m]
                             with |min|, |max| < 2**31, 2 <= stuck_n, 1 <= recover_m < 2**30
    st   array('i', n + 4)   [prev0 .. prev(n-1), have_prev, same_run, good_run, latched]
    present 0 = the read failed (device missing); sgn: 1 << 31
    """
    r = ptr32(raw)
    L = ptr32(lim)
    s = ptr32(st)
    stuck_n = L[n + n]
    recover_m = L[n + n + 1]
    cur = 0
    if not present:
        cur = 1
        s[n] = 0
        s[n + 1] = 0
    else:
        same = s[n]
        for c in range(n):
            x = r[c]
            x = (x ^ sgn) - sgn  # wrap-ok: sign extension of a 32-bit load
            lo = L[c + c]
            lo = (lo ^ sgn) - sgn  # wrap-ok: sign extension
            hi = L[c + c + 1]
            hi = (hi ^ sgn) - sgn  # wrap-ok: sign extension
            if x < lo or x > hi:
                cur = cur | 4
            prev = s[c]
            prev = (prev ^ sgn) - sgn  # wrap-ok: sign extension
            if x != prev:
                same = 0
            s[c] = x
        run = 1
        if same:
            run = s[n + 1] + 1
            if run > stuck_n:
                run = stuck_n
        s[n] = 1
        s[n + 1] = run
        if run >= stuck_n:
            cur = cur | 2
    latched = s[n + 3]
    if cur:
        latched = latched | cur
        s[n + 2] = 0
    else:
        good = s[n + 2] + 1
        if good >= recover_m:
            good = recover_m
            latched = 0
        s[n + 2] = good
    s[n + 3] = latched
    return latched


class SensorHealth:
    """Fault detector for the T, P, H reading; `faults` holds the last mask."""

    def __init__(self, cfg, n=3):
        self.n = n
        self._lim = array("i", [0] * ((2 * n + 2)))
        self._st = array("i", [0] * ((n + 4)))
        self.faults = 0
        self.configure(cfg)

    def configure(self, cfg):
        lim = self._lim
        names = ("t", "p", "h")
        for c in range(self.n):
            lo = get(cfg, names[c] + "_min")
            hi = get(cfg, names[c] + "_max")
            if lo >= hi:
                raise ValueError("health: %s_min must be below %s_max" % (names[c], names[c]))
            lim[2 * c] = lo
            lim[2 * c + 1] = hi
        stuck_n = get(cfg, "stuck_n")
        recover_m = get(cfg, "recover_m")
        if stuck_n < 2 or recover_m < 1:
            raise ValueError("health: need stuck_n >= 2 and recover_m >= 1")
        lim[2 * self.n] = stuck_n
        lim[2 * self.n + 1] = recover_m

    def check(self, raw, present):
        """Fault bitmask for this reading (FAULT_*); allocates nothing."""
        f = health_kernel(raw, self._lim, self._st, self.n, 1 if present else 0, SIGN)
        self.faults = f
        return f
