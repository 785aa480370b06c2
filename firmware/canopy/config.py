"""Node configuration: defaults, validation and a canonical digest.

Everything is an int in the firmware units (docs/fixed-point.md):
temperature 0.01 degC, pressure Pa, humidity 1/1024 %RH, actuator commands
0..10000 (0.01 % of travel/duty), gains Q16.16 (65536 = 1 output unit per
input unit, per tick for integral gains).

Usage::

    from canopy import config
    cfg = config.merged({"t_setpoint": 2400})   # defaults + overrides, validated
    print(config.digest(cfg))
"""

Q16 = 65536

DEFAULT_CONFIG = {
    "version": 1,
    "tick_ms": 1000,
    # Setpoints. Shade and mist act on temperature, the fan on humidity.
    "t_setpoint": 2600,  # shade starts closing above 26.00 degC
    "mist_t_setpoint": 2900,  # mist starts above 29.00 degC
    "h_setpoint": 70 * 1024,  # fan runs above 70 %RH
    "h_ceiling": 85 * 1024,  # mist is blocked at/above 85 %RH
    # PI gains, Q16.16. Proportional: output units per input unit.
    # Integral: output units per input unit per tick.
    "shade_kp": 25 * Q16,  # full shade at +4 degC from P alone
    "shade_ki": Q16 // 20,
    "mist_kp": 33 * Q16,  # full mist at +3 degC from P alone
    "mist_ki": Q16 // 10,
    "fan_kp": Q16,  # full fan at +~10 %RH from P alone
    "fan_ki": Q16 // 500,
    # Slew limits: largest output change per tick (0.01 % units).
    "shade_slew": 500,  # servo: 5 % per tick, gentle on the mechanism
    "mist_slew": 10000,  # valve duty may jump
    "fan_slew": 1000,
    # Failsafe outputs (sensor fault): shade position and fan duty; mist is always 0.
    "safe_shade": 5000,
    "safe_fan": 3000,
    # Conditioning: EMA alpha = 2**-shift per channel T, P, H (0 = no smoothing).
    "ema_shift": [2, 3, 2],
    # Health: plausible ranges (BME280 operating range), stuck and recovery counts.
    "t_min": -4000,
    "t_max": 8500,
    "p_min": 30000,
    "p_max": 110000,
    "h_min": 0,
    "h_max": 100 * 1024,
    "stuck_n": 20,  # this many identical readings in a row = stuck
    "recover_m": 5,  # this many good readings in a row clear a fault
}


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
    # (docs/fixed-point.md). Written as calls, not as a table of tuples: the calls are a
    # few hundred bytes of bytecode, a table would be ~1.8 KB of objects alive for good.
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


def merged(overrides=None):
    """DEFAULT_CONFIG updated with `overrides` (unknown keys rejected), validated."""
    cfg = dict(DEFAULT_CONFIG)
    cfg["ema_shift"] = list(DEFAULT_CONFIG["ema_shift"])
    if overrides:
        for key in overrides:
            if key not in DEFAULT_CONFIG:
                raise ValueError("config: unknown setting %r" % (key,))
            cfg[key] = overrides[key]
    return validate(cfg)


def get(cfg, key):
    """cfg[key], falling back to the default so partial dicts work."""
    if key in cfg:
        return cfg[key]
    return DEFAULT_CONFIG[key]


# The canonical form and digest live in canopy.configdigest, loaded on first use: only
# the framed link and the config store need them, and a text-link node on a small heap
# should not hold their code (docs/firmware.md "Memory budget").
def __getattr__(name):
    if name in ("canonical_json", "digest"):
        from canopy import configdigest

        return getattr(configdigest, name)
    raise AttributeError(name)


def load(path):
    """Read a JSON config file, merge it over the defaults and validate it."""
    import json

    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("config: %s must hold a JSON object" % path)
    return merged(data)
