"""What was tried on the viper kernels that miss the 2.5x-of-C target (unix-port side).

Variants of canopy.condition.condition_kernel, the kernel furthest from C, generated
from its source at run time so they track the shipped code:

  scalars-first  same body, the int arguments first: viper keeps only the first 3
                 locals of a function in registers (py/emitnative.c
                 MAX_REGS_FOR_LOCAL_VARS), and arguments are the first locals
  no-signext     the "(x ^ sgn) - sgn" sign extensions removed (only correct for
                 non-negative data on the unix port; measures their cost)
  no-sort        the median network replaced by the newest sample (measures its cost)
  casts-only     the 5 ptr32() casts and nothing else (the per-call set-up cost)

plus the shipped kernel on 48 channels instead of 3, to split fixed per-call cost from
per-channel cost. Run by `python tests/bench/bench_kernels.py --experiments`.
"""

import json
import re
from array import array

import micropython

import mpybench


@micropython.viper
def _empty_scalars_first(n: int, pos: int, sgn: int, raw, hist, ema, shift, out):
    pass


@micropython.viper
def _casts_only(raw, hist, ema, shift, out, n: int, pos: int, sgn: int):
    r = ptr32(raw)
    h = ptr32(hist)
    e = ptr32(ema)
    k = ptr32(shift)
    o = ptr32(out)


def _variants():
    # `micropython` must be in the namespace for the decorator.
    with open(_source_path()) as f:
        src = f.read()
    a = src.index("@micropython.viper\ndef condition_kernel")
    b = src.index("@micropython.viper", a + 10)
    kernel = src[a:b]
    sig = "def condition_kernel(raw, hist, ema, shift, out, n: int, pos: int, sgn: int):"
    if sig not in kernel:
        raise RuntimeError("condition_kernel's signature changed; update experiments.py")
    out = {}
    code = kernel.replace(sig, "def v(n: int, pos: int, sgn: int, raw, hist, ema, shift, out):")
    out["scalars-first"] = code
    out["no-signext"] = re.sub(r"\n\s+\w+ = \(\w+ \^ sgn\) - sgn[^\n]*", "", kernel).replace(
        "def condition_kernel", "def v")
    s = kernel.index("        # Optimal 9-comparator")
    e = kernel.index("        s = e[c]")
    out["no-sort"] = (kernel[:s] + "        d = x\n" + kernel[e:]).replace("def condition_kernel", "def v")
    funcs = {}
    for name, code in out.items():
        ns = {"micropython": micropython}
        exec(code, ns)
        funcs[name] = ns["v"]
    return funcs


def _source_path():
    import canopy.condition as m

    return m.__file__


def _buffers(n):
    raw = array("i", [2500 + i for i in range(n)])
    hist = array("i", [2500] * (5 * n))
    ema = array("i", [2500 << 8] * n)
    shift = array("i", [2] * n)
    out = array("i", [0] * n)
    return raw, hist, ema, shift, out


def main(min_ms, repeats, rounds):
    from canopy.condition import SIGN, condition_kernel

    import cases

    min_ns = int(min_ms * 1000000)
    v = _variants()
    b3 = _buffers(3)
    b48 = _buffers(48)
    std3 = b3 + (3, 2, SIGN)
    first3 = (3, 2, SIGN) + b3
    runs = [
        ("shipped, 3 channels", condition_kernel, cases._empty_condition, std3),
        ("scalars-first", v["scalars-first"], _empty_scalars_first, first3),
        ("no-signext", v["no-signext"], cases._empty_condition, std3),
        ("no-sort", v["no-sort"], cases._empty_condition, std3),
        ("casts-only", _casts_only, cases._empty_condition, std3),
        ("shipped, 48 channels", condition_kernel, cases._empty_condition, b48 + (48, 2, SIGN)),
    ]
    best = {}
    for _ in range(rounds):  # interleaved, so machine load hits every variant alike
        for name, f, empty, args in runs:
            raw, base, _n = mpybench.measure(f, empty, args, min_ns, repeats)
            old = best.get(name)
            best[name] = (min(raw, old[0]) if old else raw, min(base, old[1]) if old else base)
    for name, _f, _e, _a in runs:
        raw, base = best[name]
        print("@@EXP@@" + json.dumps({"variant": name, "raw_ns": raw, "base_ns": base, "ns": raw - base}))
