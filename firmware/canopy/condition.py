"""Signal conditioning: median-of-5 spike rejection, then EMA smoothing, fixed point.

One viper call conditions every channel, and nothing is allocated per update, so
it can run inside the control tick under ``micropython.heap_lock()``.

Usage::

    from array import array
    from canopy.condition import Conditioner
    cond = Conditioner(3, (2, 3, 2))        # EMA alpha = 1/4, 1/8, 1/4
    raw = array('i', (2512, 101325, 51200))
    out = array('i', [0, 0, 0])
    cond.update(raw, out)                   # first call primes the history

Formats (docs/fixed-point.md): inputs and outputs are plain ints in the channel
units; the EMA state is Q.8 (value << 8). Input domain: |raw| < 2**21.
"""

import micropython
from array import array
from micropython import const

WINDOW = const(5)
FRAC_BITS = const(8)
# Sign-extension mask for ptr32 loads; a viper literal this big would not compile
# for the ESP32, so it is built here and passed in as an argument.
SIGN = 1 << 31


@micropython.viper
def condition_kernel(raw, hist, ema, shift, out, n: int, pos: int, sgn: int):
    """Condition n channels in place.

    raw   array('i', n)   new readings, |x| < 2**21
    hist  array('i', 5n)  ring buffers, channel c at [5c .. 5c+4]
    ema   array('i', n)   EMA state, Q.8
    shift array('i', n)   per-channel EMA shift k, 0..7 (alpha = 2**-k)
    out   array('i', n)   conditioned values (rounded EMA)
    n     channel count; pos: ring slot 0..4 to overwrite; sgn: 1 << 31
    """
    r = ptr32(raw)
    h = ptr32(hist)
    e = ptr32(ema)
    k = ptr32(shift)
    o = ptr32(out)
    for c in range(n):
        x = r[c]
        x = (x ^ sgn) - sgn  # wrap-ok: sign extension of a 32-bit load
        base = c * 5
        h[base + pos] = x
        a = h[base]
        a = (a ^ sgn) - sgn  # wrap-ok: sign extension
        b = h[base + 1]
        b = (b ^ sgn) - sgn  # wrap-ok: sign extension
        d = h[base + 2]
        d = (d ^ sgn) - sgn  # wrap-ok: sign extension
        f = h[base + 3]
        f = (f ^ sgn) - sgn  # wrap-ok: sign extension
        g = h[base + 4]
        g = (g ^ sgn) - sgn  # wrap-ok: sign extension
        # Optimal 9-comparator sorting network for 5; the median lands in d.
        if a > f:
            t = a
            a = f
            f = t
        if b > g:
            t = b
            b = g
            g = t
        if a > d:
            t = a
            a = d
            d = t
        if b > f:
            t = b
            b = f
            f = t
        if a > b:
            t = a
            a = b
            b = t
        if d > g:
            t = d
            d = g
            g = t
        if b > d:
            t = b
            b = d
            d = t
        if f > g:
            t = f
            f = g
            g = t
        if d > f:
            t = d
            d = f
            f = t
        s = e[c]
        s = (s ^ sgn) - sgn  # wrap-ok: sign extension
        # Arithmetic shift floors, so s stays between its old value and the target:
        # |s| < 2**29 and the difference < 2**30 for every input in the domain.
        s = s + (((d << 8) - s) >> k[c])
        e[c] = s
        o[c] = (s + 128) >> 8


@micropython.viper
def prime_kernel(raw, hist, ema, out, n: int, sgn: int):
    """Fill every history slot and the EMA state with raw (start-up / after a gap)."""
    r = ptr32(raw)
    h = ptr32(hist)
    e = ptr32(ema)
    o = ptr32(out)
    for c in range(n):
        x = r[c]
        x = (x ^ sgn) - sgn  # wrap-ok: sign extension of a 32-bit load
        base = c * 5
        for i in range(5):
            h[base + i] = x
        e[c] = x << 8
        o[c] = x


class Conditioner:
    """Median-of-5 + EMA for `n` channels; `shifts` gives each channel's EMA shift."""

    def __init__(self, n=3, shifts=None):
        if n < 1:
            raise ValueError("Conditioner needs at least one channel")
        self.n = n
        self._hist = array("i", [0] * (WINDOW * n))
        self._ema = array("i", [0] * (n))
        self._shift = array("i", [0] * (n))
        self._scratch = array("i", [0] * (n))
        self._pos = 0
        self._primed = False
        self._raw = self._out = None  # update()'s arguments, for _run
        self.set_shifts(shifts if shifts is not None else (2,) * n)

    def set_shifts(self, shifts):
        if len(shifts) != self.n:
            raise ValueError("need one EMA shift per channel")
        for i in range(self.n):
            s = shifts[i]
            if s < 0 or s > 7:
                raise ValueError("EMA shift must be 0..7")
            self._shift[i] = s

    def reset(self, raw):
        """Forget the past: history and EMA state all equal `raw`."""
        prime_kernel(raw, self._hist, self._ema, self._scratch, self.n, SIGN)
        self._pos = 0
        self._primed = True

    def update(self, raw, out):
        """Condition `raw` into `out` (both array('i', n)); allocates nothing."""
        if not self._primed:
            self.reset(raw)
        # The 8-argument kernel call needs 9 stack words; with raw and out as locals too
        # this frame would exceed the VM's 11-word C-stack budget and be heap-allocated on
        # every call, so the call happens in _run, whose only local is self.
        self._raw = raw
        self._out = out
        self._run()
        pos = self._pos
        self._pos = pos + 1 if pos < 4 else 0

    def _run(self):
        condition_kernel(self._raw, self._hist, self._ema, self._shift, self._out, self.n, self._pos, SIGN)
