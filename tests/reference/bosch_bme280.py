"""CPython transcription of Bosch's BME280 integer compensation formulas.

Source: BME280 datasheet (BST-BME280-DS002), section 4.2.3 (`BME280_compensate_T_int32`,
`bme280_compensate_H_int32`) and the appendix "compensation formulas in 32 bit fixed point"
(`BME280_compensate_P_int32`, identical to the BMP280 datasheet's). Transcribed line by
line, one assignment per C statement, so a reader can hold it next to the PDF.

Every intermediate goes through an `Arith` object:

* `Arith(wrap=True)` (the default, `C32`) behaves like a 32-bit C compiler: each
  `BME280_S32_t` intermediate wraps to int32, each `BME280_U32_t` one to uint32. This is
  what the chip computes, and what the firmware kernel must reproduce.
* `Arith(wrap=False)` keeps unbounded Python ints.

Both record every intermediate in `trace`, so a test can check that over a given input
domain the two never diverge, i.e. no step overflows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CAL_NAMES = (
    "T1", "T2", "T3",
    "P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9",
    "H1", "H2", "H3", "H4", "H5", "H6",
)

# Datasheet worked example (BMP280 datasheet section 3.12 / BME280 table); humidity values are
# typical of real parts (the datasheet gives none).
EXAMPLE_CAL = {
    "T1": 27504, "T2": 26435, "T3": -1000,
    "P1": 36477, "P2": -10685, "P3": 3024, "P4": 2855, "P5": 140, "P6": -7,
    "P7": 15500, "P8": -14600, "P9": 6000,
    "H1": 75, "H2": 362, "H3": 0, "H4": 313, "H5": 50, "H6": 30,
}


def to_s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def to_u32(v: int) -> int:
    return v & 0xFFFFFFFF


@dataclass
class Arith:
    wrap: bool = True
    trace: list[tuple[str, int]] = field(default_factory=list)

    def s32(self, name: str, v: int) -> int:
        if self.wrap:
            v = to_s32(v)
        self.trace.append((name, v))
        return v

    def u32(self, name: str, v: int) -> int:
        if self.wrap:
            v = to_u32(v)
        self.trace.append((name, v))
        return v


def compensate_t(adc_t: int, cal: dict[str, int], a: Arith | None = None) -> tuple[int, int]:
    """`BME280_compensate_T_int32`: returns (t_fine, T in 0.01 degC)."""
    a = a or Arith()
    s = a.s32
    t1, t2, t3 = cal["T1"], cal["T2"], cal["T3"]
    # var1 = ((((adc_T>>3) - ((S32)dig_T1<<1))) * ((S32)dig_T2)) >> 11;
    d1 = s("t.d1", (adc_t >> 3) - (t1 << 1))
    var1 = s("t.var1", s("t.m1", d1 * t2) >> 11)
    # var2 = (((((adc_T>>4) - dig_T1) * ((adc_T>>4) - dig_T1)) >> 12) * dig_T3) >> 14;
    d2 = s("t.d2", (adc_t >> 4) - t1)
    sq = s("t.sq", d2 * d2)
    var2 = s("t.var2", s("t.m2", (sq >> 12) * t3) >> 14)
    t_fine = s("t.t_fine", var1 + var2)
    t = s("t.T", s("t.m3", t_fine * 5 + 128) >> 8)
    return t_fine, t


def compensate_p(adc_p: int, t_fine: int, cal: dict[str, int], a: Arith | None = None) -> int:
    """`BME280_compensate_P_int32` (32-bit fixed point): pressure in Pa."""
    a = a or Arith()
    s, u = a.s32, a.u32
    p1, p2, p3, p4, p5, p6, p7, p8, p9 = (cal["P%d" % i] for i in range(1, 10))
    # var1 = (((S32)t_fine)>>1) - (S32)64000;
    var1 = s("p.var1a", (t_fine >> 1) - 64000)
    # var2 = (((var1>>2) * (var1>>2)) >> 11 ) * ((S32)dig_P6);
    q = s("p.q", (var1 >> 2) * (var1 >> 2))
    var2 = s("p.var2a", (q >> 11) * p6)
    # var2 = var2 + ((var1*((S32)dig_P5))<<1);
    var2 = s("p.var2b", var2 + (s("p.m5", var1 * p5) << 1))
    # var2 = (var2>>2)+(((S32)dig_P4)<<16);
    var2 = s("p.var2c", (var2 >> 2) + s("p.p4", p4 << 16))
    # var1 = (((dig_P3 * (((var1>>2) * (var1>>2)) >> 13 )) >> 3) + ((((S32)dig_P2) * var1)>>1))>>18;
    m3 = s("p.m3", p3 * (q >> 13))
    m2 = s("p.m2", p2 * var1)
    var1 = s("p.var1b", s("p.sum1", (m3 >> 3) + (m2 >> 1)) >> 18)
    # var1 =((((32768+var1))*((S32)dig_P1))>>15);
    var1 = s("p.var1c", s("p.m1", (32768 + var1) * p1) >> 15)
    if var1 == 0:
        return 0  # the datasheet's guard against division by zero
    # p = (((U32)(((S32)1048576)-adc_P)-(var2>>12)))*3125;
    diff = u("p.diff", (1048576 - adc_p) - (var2 >> 12))
    p = u("p.p0", diff * 3125)
    dv = u("p.div", var1)  # (U32)var1
    if p < 0x80000000:
        p = u("p.p1", (p << 1) // dv)
    else:
        p = u("p.p1", (p // dv) * 2)
    # var1 = (((S32)dig_P9) * ((S32)(((p>>3) * (p>>3))>>13)))>>12;
    sq = u("p.sq", (p >> 3) * (p >> 3))
    var1 = s("p.var1d", s("p.m9", p9 * s("p.sqs", sq >> 13)) >> 12)
    # var2 = (((S32)(p>>2)) * ((S32)dig_P8))>>13;
    var2 = s("p.var2d", s("p.m8", s("p.p2", p >> 2) * p8) >> 13)
    # p = (U32)((S32)p + ((var1 + var2 + dig_P7) >> 4));
    corr = s("p.corr", var1 + var2 + p7) >> 4
    return u("p.P", s("p.ps", p) + corr)


def compensate_h(adc_h: int, t_fine: int, cal: dict[str, int], a: Arith | None = None) -> int:
    """`bme280_compensate_H_int32`: humidity in 1/1024 %RH (Q22.10)."""
    a = a or Arith()
    s = a.s32
    h1, h2, h3, h4, h5, h6 = (cal["H%d" % i] for i in range(1, 7))
    v = s("h.v0", t_fine - 76800)
    # ((((adc_H << 14) - (dig_H4 << 20) - (dig_H5 * v)) + 16384) >> 15)
    a1 = s("h.a1", (adc_h << 14) - s("h.h4", h4 << 20))
    a2 = s("h.a2", a1 - s("h.m5", h5 * v))
    left = s("h.left", a2 + 16384) >> 15
    # (((((((v * dig_H6) >> 10) * (((v * dig_H3) >> 11) + 32768)) >> 10) + 2097152) * dig_H2 + 8192) >> 14)
    b1 = s("h.b1", v * h6) >> 10
    b2 = s("h.b2", s("h.m3", v * h3) >> 11) + 32768
    b3 = s("h.b3", s("h.b12", b1 * b2) >> 10) + 2097152
    right = s("h.right", s("h.b4", b3 * h2) + 8192) >> 14
    v = s("h.v1", left * right)
    # v = (v - (((((v >> 15) * (v >> 15)) >> 7) * dig_H1) >> 4));
    sq = s("h.sq", (v >> 15) * (v >> 15))
    v = s("h.v2", v - (s("h.m1", (sq >> 7) * h1) >> 4))
    v = 0 if v < 0 else v
    v = 419430400 if v > 419430400 else v
    return v >> 12


def compensate(adc_t: int, adc_p: int, adc_h: int, cal: dict[str, int],
               a: Arith | None = None) -> tuple[int, int, int, int]:
    """(t_fine, T, P, H) for one raw reading, as the chip's 32-bit code computes them."""
    a = a or Arith()
    t_fine, t = compensate_t(adc_t, cal, a)
    return t_fine, t, compensate_p(adc_p, t_fine, cal, a), compensate_h(adc_h, t_fine, cal, a)


# The kernel's documented input domain (docs/bme280.md): calibration ranges that cover
# real parts with margin, temperatures the part is specified for, and raw pressure and
# humidity counts well beyond 300..1100 hPa and 0..100 %RH. Inside it no intermediate of
# the formulas above leaves int32/uint32 (tests/test_bme280_reference.py checks this).
DOMAIN_CAL = {
    "T1": (26000, 30000), "T2": (24000, 28000), "T3": (-1200, 1200),
    "P1": (34000, 40000), "P2": (-12000, -9000), "P3": (2000, 4000), "P4": (0, 12000),
    "P5": (-600, 600), "P6": (-20, 20), "P7": (5000, 16000), "P8": (-16000, -8000),
    "P9": (2000, 8000),
    "H1": (0, 100), "H2": (300, 450), "H3": (0, 20), "H4": (250, 400), "H5": (0, 60),
    "H6": (20, 40),
}
DOMAIN_T_FINE = (-40 * 5120, 85 * 5120)  # -40..85 degC
DOMAIN_ADC_P = (150000, 800000)
DOMAIN_ADC_H = (0, 52000)


def t_fine_of(adc_t: int, cal: dict[str, int]) -> int:
    return compensate_t(adc_t, cal, Arith(wrap=False))[0]


def adc_t_for_t_fine(target: int, cal: dict[str, int]) -> int:
    """Smallest adc_T whose t_fine reaches `target` (t_fine rises with adc_T in the domain)."""
    lo, hi = 0, (1 << 20) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if t_fine_of(mid, cal) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def adc_t_range(cal: dict[str, int]) -> tuple[int, int]:
    """adc_T values whose t_fine lies in DOMAIN_T_FINE, for this calibration."""
    lo = adc_t_for_t_fine(DOMAIN_T_FINE[0], cal)
    hi = adc_t_for_t_fine(DOMAIN_T_FINE[1] + 1, cal) - 1
    return lo, hi
