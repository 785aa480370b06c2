"""Checking a node config against the bounds the firmware supports (see canopy.config).

Kept apart from canopy.config so a running node does not hold it: ``config.merged`` and
``config.load`` load it to check a config, and main.py forgets it once the node is built
(a later check, e.g. a config pushed over the framed link, loads it again).
``config.validate`` and ``config.load`` forward here.

Usage::

    from canopy import config
    config.validate(dict(config.merged(), tick_ms=5))
    # ValueError: config: 'tick_ms'=5 outside 10..3600000
"""


def _check_int(cfg, key, lo, hi):
    if key not in cfg:
        raise ValueError("config: missing setting %r" % key)
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError("config: %r must be an int, got %r" % (key, v))
    if v < lo or v > hi:
        raise ValueError("config: %r=%d outside %d..%d" % (key, v, lo, hi))


def validate(cfg):
    """Raise ValueError naming the first bad setting; return cfg when it is usable."""
    # Bounds keep the kernels inside their documented overflow-free domains
    # (docs/fixed-point.md). Written as calls, not as a table of tuples: a table would be
    # ~1.8 KB of objects alive for as long as this module is.
    _check_int(cfg, "version", 1, 1000)
    _check_int(cfg, "tick_ms", 10, 3600000)
    _check_int(cfg, "t_setpoint", -4000, 8500)
    _check_int(cfg, "mist_t_setpoint", -4000, 8500)
    _check_int(cfg, "h_setpoint", 0, 102400)
    _check_int(cfg, "h_ceiling", 0, 102400)
    _check_int(cfg, "shade_kp", 0, 1 << 28)
    _check_int(cfg, "shade_ki", 0, 1 << 28)
    _check_int(cfg, "mist_kp", 0, 1 << 28)
    _check_int(cfg, "mist_ki", 0, 1 << 28)
    _check_int(cfg, "fan_kp", 0, 1 << 28)
    _check_int(cfg, "fan_ki", 0, 1 << 28)
    _check_int(cfg, "shade_slew", 1, 10000)
    _check_int(cfg, "mist_slew", 1, 10000)
    _check_int(cfg, "fan_slew", 1, 10000)
    _check_int(cfg, "safe_shade", 0, 10000)
    _check_int(cfg, "safe_fan", 0, 10000)
    _check_int(cfg, "t_min", -1 << 20, 1 << 20)
    _check_int(cfg, "t_max", -1 << 20, 1 << 20)
    _check_int(cfg, "p_min", -1 << 20, 1 << 20)
    _check_int(cfg, "p_max", -1 << 20, 1 << 20)
    _check_int(cfg, "h_min", -1 << 20, 1 << 20)
    _check_int(cfg, "h_max", -1 << 20, 1 << 20)
    _check_int(cfg, "stuck_n", 2, 100000)
    _check_int(cfg, "recover_m", 1, 100000)
    shifts = cfg.get("ema_shift")
    if not isinstance(shifts, (list, tuple)) or len(shifts) != 3:
        raise ValueError("config: 'ema_shift' must be a list of 3 ints (T, P, H)")
    for s in shifts:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0 or s > 7:
            raise ValueError("config: 'ema_shift' entries must be ints 0..7, got %r" % (s,))
    for ch in ("t", "p", "h"):
        if cfg[ch + "_min"] >= cfg[ch + "_max"]:
            raise ValueError("config: %s_min must be below %s_max" % (ch, ch))
    return cfg


def load(path):
    """Read a JSON config file, merge it over the defaults and validate it."""
    import json

    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("config: %s must hold a JSON object" % path)
    from canopy.config import merged

    return merged(data)
