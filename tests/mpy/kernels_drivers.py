"""Drivers for the fixed-point kernels, shared by the unix port and the CPython shim.

Every ``*_case``/``*_run`` function takes the module under test as its first
argument, so the *same* driver code runs against the real firmware module in the
unix port (``port_*`` entry points, called through ``canopy_host.unixport.call_batch``)
and against ``tests/viper32.py``'s shimmed copy under CPython. Inputs and results are
plain lists/ints so they cross the JSON boundary of ``call_batch``.
"""

from array import array

SIGN = 1 << 31


def _arr(values):
    return array("i", list(values))


# -- condition -----------------------------------------------------------------
def condition_kernel_case(mod, raw, hist, ema, shift, pos):
    r = _arr(raw)
    h = _arr(hist)
    e = _arr(ema)
    k = _arr(shift)
    o = _arr([0] * len(raw))
    mod.condition_kernel(r, h, e, k, o, len(raw), pos, SIGN)
    return [list(o), list(h), list(e)]


def condition_run(mod, shifts, seq, resets):
    """Feed rows of `seq` through a Conditioner; call reset(row) at indexes in `resets`."""
    n = len(shifts)
    c = mod.Conditioner(n, shifts)
    raw = _arr([0] * n)
    out = _arr([0] * n)
    res = []
    for i in range(len(seq)):
        row = seq[i]
        for j in range(n):
            raw[j] = row[j]
        if i in resets:
            c.reset(raw)
        c.update(raw, out)
        res.append(list(out))
    return res


# -- control -------------------------------------------------------------------
def control_kernel_case(mod, meas, par, st):
    m = _arr(meas)
    p = _arr(par)
    s = _arr(st)
    n = len(st) // 2
    o = _arr([0] * n)
    mod.control_kernel(m, p, s, o, n, SIGN)
    return [list(o), list(s)]


def control_run(mod, cfg, seq, failsafe_at):
    """Step a Controller over measurement rows; failsafe() at indexes in failsafe_at."""
    ctl = mod.Controller(cfg)
    meas = _arr([0, 0, 0])
    out = _arr([0, 0, 0])
    res = []
    for i in range(len(seq)):
        row = seq[i]
        for j in range(3):
            meas[j] = row[j]
        if i in failsafe_at:
            ctl.failsafe(out)
        else:
            ctl.step(meas, out)
        res.append(list(out))
    return res


# -- health --------------------------------------------------------------------
def health_kernel_case(mod, raw, lim, st, present):
    r = _arr(raw)
    L = _arr(lim)
    s = _arr(st)
    f = mod.health_kernel(r, L, s, len(raw), present, SIGN)
    return [f, list(s)]


def health_run(mod, cfg, seq):
    """Rows are [present, t, p, h]; returns the fault mask after each check."""
    h = mod.SensorHealth(cfg)
    raw = _arr([0, 0, 0])
    res = []
    for row in seq:
        for j in range(3):
            raw[j] = row[j + 1]
        res.append(h.check(raw, bool(row[0])))
    return res


# -- unix-port entry points ----------------------------------------------------
def _mod(name):
    if name == "condition":
        import canopy.condition as m
    elif name == "control":
        import canopy.control as m
    else:
        import canopy.health as m
    return m


def port_condition_kernel_case(*args):
    return condition_kernel_case(_mod("condition"), *args)


def port_condition_run(*args):
    return condition_run(_mod("condition"), *args)


def port_control_kernel_case(*args):
    return control_kernel_case(_mod("control"), *args)


def port_control_run(*args):
    return control_run(_mod("control"), *args)


def port_health_kernel_case(*args):
    return health_kernel_case(_mod("health"), *args)


def port_health_run(*args):
    return health_run(_mod("health"), *args)


def port_alloc_free(iterations):
    """Run every tick-path method under heap_lock; return 'ok' or the error text."""
    import micropython
    from canopy.config import DEFAULT_CONFIG
    from canopy.condition import Conditioner
    from canopy.control import Controller
    from canopy.health import SensorHealth

    cfg = DEFAULT_CONFIG
    cond = Conditioner(3, cfg["ema_shift"])
    ctl = Controller(cfg)
    health = SensorHealth(cfg)
    raw = array("i", [2500, 101325, 60 * 1024])
    meas = array("i", [0, 0, 0])
    out = array("i", [0, 0, 0])
    cond.reset(raw)
    faults = 0
    micropython.heap_lock()
    try:
        for i in range(iterations):
            # Walk through hot, humid (mist blocked), cold, stuck and missing phases.
            phase = (i >> 4) & 3
            raw[0] = 2000 + 40 * (i & 63) + (i & 1)
            raw[1] = 101325 + (i & 3)
            raw[2] = (90 if phase == 1 else 55) * 1024 + (i & 7)
            present = phase != 3
            if phase == 2:
                raw[0] = 2500
                raw[1] = 101325
                raw[2] = 50000
            faults = health.check(raw, present)
            if faults:
                ctl.failsafe(out)
            else:
                cond.update(raw, meas)
                ctl.step(meas, out)
    except Exception as exc:  # noqa: BLE001 - reported back to the test
        micropython.heap_unlock()
        return "error: %r" % (exc,)
    micropython.heap_unlock()
    return ["ok", faults, list(out)]
