"""Tiny viper functions that pin down the semantics tests/viper32.py must reproduce.

They run in the real unix port (through ``run``) and in the shim; the test compares
both at width 64 and checks the shim's width-32 results against hand-derived values.
"""

import micropython
from array import array
from micropython import const

_K = const(3)


@micropython.viper
def add(a: int, b: int) -> int:
    return a + b


@micropython.viper
def sub(a: int, b: int) -> int:
    return a - b


@micropython.viper
def mul(a: int, b: int) -> int:
    return a * b


@micropython.viper
def shl(a: int, b: int) -> int:
    return a << b


@micropython.viper
def shr(a: int, b: int) -> int:
    return a >> b


@micropython.viper
def fdiv(a: int, b: int) -> int:
    return a // b


@micropython.viper
def fmod(a: int, b: int) -> int:
    return a % b


@micropython.viper
def neg(a: int) -> int:
    return -a


@micropython.viper
def inv(a: int) -> int:
    return ~a


@micropython.viper
def aug(a: int, b: int) -> int:
    x = a
    x += b
    x *= _K
    x -= 1
    x <<= 1
    return x


@micropython.viper
def load32(buf, i: int) -> int:
    p = ptr32(buf)
    return p[i]


@micropython.viper
def load32_sx(buf, i: int, s: int) -> int:
    p = ptr32(buf)
    v = p[i]
    return (v ^ s) - s  # wrap-ok: sign-extension idiom


@micropython.viper
def load16(buf, i: int) -> int:
    p = ptr16(buf)
    return p[i]


@micropython.viper
def load8(buf, i: int) -> int:
    p = ptr8(buf)
    return p[i]


@micropython.viper
def store32(buf, i: int, v: int) -> int:
    p = ptr32(buf)
    p[i] = v
    p[i] += 1
    return 0


@micropython.viper
def store8(buf, i: int, v: int) -> int:
    p = ptr8(buf)
    p[i] = v
    return 0


def run(name, args):
    """Port entry: call `name`; list args become array('i') (or bytearray for 8-bit)."""
    f = globals()[name]
    conv = []
    for a in args:
        if isinstance(a, list):
            conv.append(bytearray(a) if name in ("load8", "store8") else array("i", a))
        else:
            conv.append(a)
    r = f(*conv)
    bufs = [list(c) for c in conv if not isinstance(c, int)]
    return [r, bufs]
