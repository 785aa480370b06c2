"""Three PI loops (shade, mist, fan) with anti-windup, clamping and slew limits.

One viper call steps all actuators; nothing is allocated per step.

Usage::

    from array import array
    from canopy.config import DEFAULT_CONFIG
    from canopy.control import Controller
    ctl = Controller(DEFAULT_CONFIG)
    meas = array('i', (2750, 101325, 60 * 1024))   # T, P, H
    out = array('i', [0, 0, 0])                           # shade, mist, fan
    ctl.step(meas, out)

Sign conventions: hotter than the setpoint -> more shade and more mist; more
humid than the target -> more fan. Mist is forced to 0 (integrator discharged)
while humidity is at/above the ceiling. Formats and the overflow argument are in
docs/fixed-point.md.
"""

import micropython
from array import array
from micropython import const

from canopy.config import get

SHADE = const(0)
MIST = const(1)
FAN = const(2)
OUT_MAX = const(10000)

# Parameter table layout, one row of _STRIDE words per actuator.
P_CH = const(0)  # measurement channel driving this loop (0..2)
P_SP = const(1)  # setpoint, channel units
P_KP = const(2)  # Q16.16, 0 <= kp < 2**29
P_KI = const(3)  # Q16.16, 0 <= ki < 2**29
P_ELIM = const(4)  # error clamp: 2**30 // max(kp, ki, 1), at most 2**22
P_LO = const(5)  # output limits, 0 <= lo <= hi <= 10000
P_HI = const(6)
P_SLEW = const(7)  # largest change per tick, 0..10000
P_BEN = const(8)  # 1 = block this loop when meas[P_BCH] >= P_BTHR
P_BCH = const(9)
P_BTHR = const(10)
_STRIDE = const(11)
# State: integrator (Q16.16 output units) and last output, per actuator.
_SSTRIDE = const(2)

_ELIM_MAX = const(1 << 22)
SIGN = 1 << 31
_GAIN_PRODUCT_MAX = 1 << 30


@micropython.viper
def control_kernel(meas, par, st, out, n: int, sgn: int):
    """Step n PI loops.

    meas array('i', 3)       conditioned T, P, H, |x| < 2**21
    par  array('i', 11n)     parameter rows (layout P_* above)
    st   array('i', 2n)      [integrator Q16.16, previous output] per actuator
    out  array('i', n)       new commands
    sgn  1 << 31 (sign-extension mask)
    """
    m = ptr32(meas)
    p = ptr32(par)
    s = ptr32(st)
    o = ptr32(out)
    for a in range(n):
        row = a * 11
        lo = p[row + 5]
        hi = p[row + 6]
        si = a * 2
        if p[row + 8]:
            bx = m[p[row + 9]]
            bx = (bx ^ sgn) - sgn  # wrap-ok: sign extension of a 32-bit load
            bthr = p[row + 10]
            bthr = (bthr ^ sgn) - sgn  # wrap-ok: sign extension
            if bx >= bthr:
                # Blocked: output off at once (no slew, it is a safety cut) and
                # the integrator discharged so it cannot kick when unblocked.
                s[si] = lo << 16
                s[si + 1] = lo
                o[a] = lo
                continue
        x = m[p[row]]
        x = (x ^ sgn) - sgn  # wrap-ok: sign extension
        sp = p[row + 1]
        sp = (sp ^ sgn) - sgn  # wrap-ok: sign extension
        err = x - sp
        elim = p[row + 4]
        if err > elim:
            err = elim
        elif err < 0 - elim:
            err = 0 - elim
        # |err| * gain <= 2**30 by construction of elim.
        up = (p[row + 2] * err) >> 16
        integ = s[si]
        prev = s[si + 1]
        # Reachable window this tick: range clamp intersected with the slew window.
        top = prev + p[row + 7]
        if top > hi:
            top = hi
        bot = prev - p[row + 7]
        if bot < lo:
            bot = lo
        u = up + (integ >> 16)
        # Conditional integration: do not integrate further in the direction the
        # output is already pinned (by range or slew) -- that is the windup.
        if not ((u >= top and err > 0) or (u <= bot and err < 0)):
            integ = integ + p[row + 3] * err
            if integ > (hi << 16):
                integ = hi << 16
            elif integ < (lo << 16):
                integ = lo << 16
            s[si] = integ
            u = up + (integ >> 16)
        if u > top:
            u = top
        elif u < bot:
            u = bot
        s[si + 1] = u
        o[a] = u


def _elim(kp, ki):
    k = kp if kp > ki else ki
    if k < 1:
        k = 1
    e = _GAIN_PRODUCT_MAX // k
    return e if e < _ELIM_MAX else _ELIM_MAX


class Controller:
    """Shade (on T), mist (on T, blocked by H), fan (on H) PI loops."""

    def __init__(self, cfg):
        self._par = array("i", [0] * (_STRIDE * 3))
        self._st = array("i", [0] * (_SSTRIDE * 3))
        self.set_setpoints(cfg)
        self._reset_state()

    def set_setpoints(self, cfg):
        """(Re)load setpoints, gains, slews and failsafe values; keeps loop state."""
        rows = (
            (SHADE, 0, "t_setpoint", "shade_kp", "shade_ki", "shade_slew"),
            (MIST, 0, "mist_t_setpoint", "mist_kp", "mist_ki", "mist_slew"),
            (FAN, 2, "h_setpoint", "fan_kp", "fan_ki", "fan_slew"),
        )
        for a, ch, sp, kp, ki, slew in rows:
            kpv = get(cfg, kp)
            kiv = get(cfg, ki)
            slv = get(cfg, slew)
            if kpv < 0 or kiv < 0 or kpv >= 1 << 29 or kiv >= 1 << 29:
                raise ValueError("controller gains must be 0 <= k < 2**29 (Q16.16)")
            if slv < 0 or slv > OUT_MAX:
                raise ValueError("slew must be 0..10000 per tick")
            r = a * _STRIDE
            p = self._par
            p[r + P_CH] = ch
            p[r + P_SP] = get(cfg, sp)
            p[r + P_KP] = kpv
            p[r + P_KI] = kiv
            p[r + P_ELIM] = _elim(kpv, kiv)
            p[r + P_LO] = 0
            p[r + P_HI] = OUT_MAX
            p[r + P_SLEW] = slv
            p[r + P_BEN] = 0
            p[r + P_BCH] = 0
            p[r + P_BTHR] = 0
        r = MIST * _STRIDE
        self._par[r + P_BEN] = 1
        self._par[r + P_BCH] = 2
        self._par[r + P_BTHR] = get(cfg, "h_ceiling")
        safe_shade = get(cfg, "safe_shade")
        safe_fan = get(cfg, "safe_fan")
        if not (0 <= safe_shade <= OUT_MAX and 0 <= safe_fan <= OUT_MAX):
            raise ValueError("safe_shade/safe_fan must be 0..10000")
        self.safe_shade = safe_shade
        self.safe_fan = safe_fan

    def _reset_state(self):
        st = self._st
        st[0] = 0
        st[1] = self.safe_shade
        st[2] = 0
        st[3] = 0
        st[4] = 0
        st[5] = self.safe_fan

    def step(self, meas, out):
        """One control step: meas (T, P, H) -> out (shade, mist, fan); allocates nothing."""
        control_kernel(meas, self._par, self._st, out, 3, SIGN)

    def failsafe(self, out):
        """Safe outputs (shade safe position, mist off, safe fan), integrators reset.

        The slew limiter restarts from these outputs, so leaving failsafe ramps
        smoothly instead of jumping.
        """
        st = self._st
        st[0] = 0
        st[1] = self.safe_shade
        st[2] = 0
        st[3] = 0
        st[4] = 0
        st[5] = self.safe_fan
        out[0] = self.safe_shade
        out[1] = 0
        out[2] = self.safe_fan
