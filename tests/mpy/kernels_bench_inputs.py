"""Representative inputs for timing the conditioning, control and health kernels.

Each ``*_args()`` returns the positional argument tuple of one kernel call in the
state a running node would have (history primed, loops unsaturated, sensor healthy),
so a benchmark measures the common path rather than an early exit:

* condition_kernel: T 25.12 degC, P 101325 Pa, H 50 %RH (51200), shifts (2, 3, 2), ring
  slot 2, history with one spike per channel so the sorting network swaps.
* control_kernel: T 29.50 degC, H 75 %RH -- shade and mist in their linear range, fan
  on, mist not blocked (below the 85 %RH ceiling), default gains.
* health_kernel: a jittering healthy reading, defaults (no fault, good run counting).

Usage (unix port or board)::

    from kernels_bench_inputs import condition_args
    from canopy.condition import condition_kernel
    args = condition_args()
    condition_kernel(*args)
"""

from array import array

SIGN = 1 << 31


def condition_args():
    from canopy.condition import Conditioner

    c = Conditioner(3, (2, 3, 2))
    raw = array("i", [2512, 101325, 51200])
    c.reset(raw)
    hist = c._hist
    for ch, spike in ((0, 9000), (1, 50000), (2, 1000)):
        hist[5 * ch + 4] = spike
    out = array("i", [0, 0, 0])
    return (raw, hist, c._ema, c._shift, out, 3, 2, SIGN)


def control_args():
    from canopy.config import DEFAULT_CONFIG
    from canopy.control import Controller

    ctl = Controller(DEFAULT_CONFIG)
    meas = array("i", [2950, 101325, 75 * 1024])
    out = array("i", [0, 0, 0])
    for _ in range(5):  # leave the start-up values: integrators charged, slews settled
        ctl.step(meas, out)
    return (meas, ctl._par, ctl._st, out, 3, SIGN)


def health_args():
    from canopy.config import DEFAULT_CONFIG
    from canopy.health import SensorHealth

    h = SensorHealth(DEFAULT_CONFIG)
    raw = array("i", [2512, 101325, 51200])
    h.check(raw, True)
    raw[0] = 2513  # differs from the previous reading: the no-fault path
    return (raw, h._lim, h._st, 3, 1, SIGN)
