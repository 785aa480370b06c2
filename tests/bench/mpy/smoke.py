"""Trajectories of the kernels for tests/test_bench_smoke.py (unix-port side).

`run(spec)` drives each kernel through a sequence of inputs with the buffers its class
builds from DEFAULT_CONFIG, and records for every call the input buffers (as flat int
lists) and the outputs. The same code runs against the viper firmware and against the
stripped bytecode copy; the host feeds the recorded inputs to the C reference.
"""

from array import array


def _l(buf):
    return [buf[i] for i in range(len(buf))]


def _condition(readings):
    from canopy.condition import SIGN, Conditioner, condition_kernel

    c = Conditioner(3, (2, 3, 0))
    out = array("i", (0, 0, 0))
    c.reset(array("i", readings[0]))
    recs = []
    pos = 0
    for r in readings:
        raw = array("i", r)
        inp = [3, pos] + _l(raw) + _l(c._hist) + _l(c._ema) + _l(c._shift)
        condition_kernel(raw, c._hist, c._ema, c._shift, out, 3, pos, SIGN)
        recs.append(["condition", inp, _l(out) + _l(c._hist) + _l(c._ema)])
        pos = pos + 1 if pos < 4 else 0
    return recs


def _control(readings):
    from canopy.config import DEFAULT_CONFIG
    from canopy.control import SIGN, Controller, control_kernel

    c = Controller(DEFAULT_CONFIG)
    out = array("i", (0, 0, 0))
    recs = []
    for r in readings:
        meas = array("i", r)
        inp = [3] + _l(meas) + _l(c._par) + _l(c._st)
        control_kernel(meas, c._par, c._st, out, 3, SIGN)
        recs.append(["control", inp, _l(out) + _l(c._st)])
    return recs


def _health(readings):
    from canopy.config import DEFAULT_CONFIG
    from canopy.health import SIGN, SensorHealth, health_kernel

    h = SensorHealth(DEFAULT_CONFIG)
    recs = []
    for r in readings:
        present = 0 if r is None else 1
        raw = array("i", r if r is not None else (0, 0, 0))
        inp = [3, present] + _l(raw) + _l(h._lim) + _l(h._st)
        f = health_kernel(raw, h._lim, h._st, 3, present, SIGN)
        recs.append(["health", inp, [f] + _l(h._st)])
    return recs


def _bme280(bursts):
    import cases

    recs = []
    for cal_a, cal_b, data in bursts:
        out = cases.bme280_compensate(bytes(cal_a), bytes(cal_b), bytes(data))
        recs.append(["bme280", list(cal_a) + list(cal_b) + list(data), out])
    return recs


_KINDS = {"condition": _condition, "control": _control, "health": _health, "bme280": _bme280}


def run(spec):
    """spec: {kind: [inputs...]} -> {kind: [[kind, input_ints, output_ints], ...]}."""
    return {kind: _KINDS[kind](spec[kind]) for kind in spec}
