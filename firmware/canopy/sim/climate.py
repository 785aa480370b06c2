"""Microclimate under one canopy, and the weather a zone of canopies shares.

Floats are fine here: this runs in the unix port between control ticks, never inside one.

``Weather(zone_seed, kind)`` is a pure function of simulated time: ambient temperature,
humidity, pressure and sun. Nodes built with the same ``zone_seed`` and ``kind`` see
exactly the same weather without talking to each other.

``Canopy(weather, seed)`` integrates the air under one umbrella (lumped, one box):

    dT/dt = k * (Ta - T)                      exchange with ambient air
          + SUN_RISE * k0 * sun * (1 - SHADE_BLOCK * shade)   sun load through the shade
          - E / GAMMA                         evaporative cooling of the mist
    de/dt = k * (ea - e) + E                  vapour pressure (hPa)
    k     = k0 * (1 + FAN_BOOST * fan)        the fan mixes toward ambient
    E     = MIST_RATE * mist * max(0, 1 - RH) evaporation slows as the air saturates

with GAMMA the psychrometric constant (hPa/K): evaporating water worth 1 hPa of vapour
cools the air by 1/GAMMA K, which is what a wet-bulb thermometer measures.

Usage::

    w = Weather(77, "hot")
    c = Canopy(w, seed=1234)
    c.step(60.0, shade=0.5, mist=0.0, fan=0.2)   # one simulated minute
    c.t_c, c.rh_pct, c.p_pa

Literals in float arithmetic are written as ints where the value is integral (``/ 100``,
not ``/ 100.0``): the same result, without one float object per literal in the loaded code
(floats are heap objects on the unix port; docs/firmware.md "Memory budget").
"""

import math
from array import array

# The per-tick model code is @micropython.native: the unix port keeps machine code
# outside the GC heap, so the simulation (absent on the chip) leaves more of the 64k
# heap the node is tested in to the firmware itself.
try:
    import micropython
except ImportError:  # CPython (tests import this model): @micropython.native is a no-op
    class micropython:
        native = staticmethod(lambda f: f)

GAMMA = 0.66  # hPa/K near sea level
SHADE_BLOCK = 0.9  # fraction of the sun load a fully closed shade removes
FAN_BOOST = 3.0  # full fan = 4x the natural air exchange
TAU_S = 300.0  # natural exchange time constant under the umbrella
SUN_RISE = 8.0  # K above ambient in full sun, no shade, no fan (steady state)
MIST_RATE = 0.03  # hPa/s of vapour added at full mist into dry air
MAX_DT = 2.0  # integration sub-step (s); the fastest time constant is TAU_S/4

# kind -> (mean temperature C, daily swing C, mean RH %, peak sun 0..1), all in tenths:
# small ints, so the table keeps no float objects alive on a virtual node's heap.
KINDS = {
    "hot": (330, 40, 350, 10),
    "mild": (210, 30, 550, 6),
    "humid": (290, 30, 750, 8),
    "cool": (150, 20, 650, 4),
}


@micropython.native


def sat_vp(t_c):
    """Saturation vapour pressure over water, hPa (Magnus, WMO coefficients)."""
    return 6.112 * math.exp(17.62 * t_c / (243.12 + t_c))


class Rng:
    """xorshift32: the same sequence under CPython and MicroPython for a seed."""

    def __init__(self, seed):
        self.s = (seed * 2654435761 + 0x9E3779B9) & 0xFFFFFFFF or 1

    @micropython.native

    def next(self):
        s = self.s
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        self.s = s
        return s

    @micropython.native

    def uniform(self, lo, hi):
        return lo + (hi - lo) * (self.next() / 4294967296.0)


def _waves(r, gusts, amp_lo, amp_hi, period_lo, period_hi):
    # Three (amplitude, period s, phase) triples, flat, as doubles: unboxed, where tuples
    # of floats would keep ~1 KB of float objects alive on a small-heap virtual node.
    w = array("d")
    for _ in range(3):
        w.append(gusts * r.uniform(amp_lo, amp_hi))
        w.append(r.uniform(period_lo, period_hi))
        w.append(r.uniform(0, 6.283))
    return w


class Weather:
    """Ambient conditions of a zone as a pure function of simulated seconds."""

    def __init__(self, zone_seed=0, kind="mild", start_hour=13.0, gusts=1.0):
        if kind not in KINDS:
            raise ValueError("unknown weather %r (one of %s)" % (kind, ", ".join(sorted(KINDS))))
        self.kind = kind
        t, swing, rh, sun = KINDS[kind]
        self.t_mean, self.t_swing, self.rh_mean, self.sun_peak = t / 10, swing / 10, rh / 10, sun / 10
        self.start_s = start_hour * 3600.0
        r = Rng(zone_seed)
        # Slow gusts of warm/cool air and passing clouds: a few seeded sinusoids with
        # periods of minutes to an hour, so minutes-long runs see weather change.
        # `gusts` scales them (0 = a steady day, for step-response tests).
        self.t_waves = _waves(r, gusts, 0.2, 0.6, 600, 3600)
        self.cloud_waves = _waves(r, gusts, 0.1, 0.3, 300, 2400)
        self.p_base = 101325.0 + r.uniform(-800, 800)
        self.p_phase = r.uniform(0, 6.283)

    @micropython.native

    def at(self, t_s):
        """(temperature C, RH %, pressure Pa, sun 0..1) at simulated second t_s."""
        hour = ((self.start_s + t_s) / 3600) % 24
        day = 0.5 - 0.5 * math.cos((hour - 3) / 24 * 2 * math.pi)  # 0 at 03:00, 1 at 15:00
        t = self.t_mean + self.t_swing * (day - 0.5) * 2
        w = self.t_waves
        for i in range(0, 9, 3):
            t += w[i] * math.sin(2 * math.pi * t_s / w[i + 1] + w[i + 2])
        sun = max(0.0, math.sin((hour - 6) / 12 * math.pi)) * self.sun_peak
        clouds = 0.0
        w = self.cloud_waves
        for i in range(0, 9, 3):
            clouds += w[i] * math.sin(2 * math.pi * t_s / w[i + 1] + w[i + 2])
        sun *= min(1.0, max(0.0, 1.0 - max(0.0, clouds)))
        # Absolute humidity holds roughly steady over a day, so RH falls as it warms.
        e = sat_vp(self.t_mean) * self.rh_mean / 100
        rh = min(100.0, 100 * e / sat_vp(t))
        p = self.p_base + 150 * math.sin(2 * math.pi * t_s / 21600 + self.p_phase)
        return t, rh, p, sun


class Canopy:
    """State of the air under one umbrella; `step` integrates it over simulated seconds."""

    def __init__(self, weather, seed=0):
        self.weather = weather
        r = Rng(seed ^ 0x5A5A)
        # Each site differs a little: sun exposure and how sheltered it is.
        self.sun_gain = r.uniform(0.9, 1.1)
        self.k0 = 1.0 / (TAU_S * r.uniform(0.9, 1.1))
        self.t_s = 0.0
        ta, rh, p, sun = weather.at(0.0)
        # Start where an unattended canopy sits: in equilibrium with shade open, no mist, no fan.
        self.t_c = ta + SUN_RISE * self.sun_gain * sun
        self.e_hpa = sat_vp(ta) * rh / 100
        self.p_pa = p
        self.ambient_t_c = ta
        self.sun = sun

    @property
    @micropython.native
    def rh_pct(self):
        return min(100.0, 100 * self.e_hpa / sat_vp(self.t_c))

    @micropython.native

    def step(self, dt_s, shade, mist, fan):
        """Advance dt_s simulated seconds with actuator positions 0..1."""
        while dt_s > 0:
            h = MAX_DT if dt_s > MAX_DT else dt_s
            dt_s -= h
            ta, rh_a, p, sun = self.weather.at(self.t_s)
            ea = sat_vp(ta) * rh_a / 100
            k = self.k0 * (1 + FAN_BOOST * fan)
            es = sat_vp(self.t_c)
            evap = MIST_RATE * mist * max(0.0, 1 - self.e_hpa / es)
            load = SUN_RISE * self.k0 * self.sun_gain * sun * (1 - SHADE_BLOCK * shade)
            self.t_c += h * (k * (ta - self.t_c) + load - evap / GAMMA)
            self.e_hpa += h * (k * (ea - self.e_hpa) + evap)
            self.t_s += h
            self.p_pa = p
            self.ambient_t_c = ta
            self.sun = sun
