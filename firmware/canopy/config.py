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


def merged(overrides=None):
    """DEFAULT_CONFIG updated with `overrides` (unknown keys rejected), validated."""
    cfg = dict(DEFAULT_CONFIG)
    cfg["ema_shift"] = list(DEFAULT_CONFIG["ema_shift"])
    if not overrides:
        # The defaults are valid (tests/test_node.py checks), so a node without a
        # config.json never loads the checks.
        return cfg
    for key in overrides:
        if key not in DEFAULT_CONFIG:
            raise ValueError("config: unknown setting %r" % (key,))
        cfg[key] = overrides[key]
    from canopy.configcheck import validate

    return validate(cfg)


def get(cfg, key):
    """cfg[key], falling back to the default so partial dicts work."""
    if key in cfg:
        return cfg[key]
    return DEFAULT_CONFIG[key]


# Reading and checking a config (validate, load: canopy.configcheck) and its canonical
# form and digest (canopy.configdigest) are loaded on first use: a node checks its config
# at start-up, main.py then forgets the checks, and only the framed link and the config
# store need digests; a text-link node on a small heap holds neither (docs/firmware.md
# "Memory budget").
def __getattr__(name):
    if name in ("validate", "load"):
        from canopy import configcheck

        return getattr(configcheck, name)
    if name in ("canonical_json", "digest"):
        from canopy import configdigest

        return getattr(configdigest, name)
    raise AttributeError(name)
