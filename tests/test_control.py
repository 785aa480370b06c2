"""Controller: three PI loops with anti-windup, clamping, slew limit, mist block, failsafe.

Behaviour runs in the unix port; the 32-bit proof runs the viper source through
tests/viper32.py over the documented domain and compares with the real port.
"""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import viper32
from canopy_host.paths import FIRMWARE_DIR
from canopy_host.unixport import call_batch
from mpy import kernels_drivers as drv

MPY_DIR = Path(__file__).resolve().parent / "mpy"
MODS = viper32.load_widths(FIRMWARE_DIR / "canopy" / "control.py", extra_path=[FIRMWARE_DIR])
CFG = dict(MODS[32].namespace["get"].__globals__["DEFAULT_CONFIG"])

XMAX = (1 << 21) - 1
STRIDE = 11
HUMID_OK = 60 * 1024
HUMID_BLOCK = 90 * 1024


def port(func: str, cases: list, **kw: object) -> list:
    return call_batch("kernels_drivers", func, cases, extra_path=[MPY_DIR], **kw)


def cfg(**over: int) -> dict:
    c = dict(CFG)
    c.update(over)
    return c


def test_no_static_issues() -> None:
    assert MODS[32].viper_functions == ["control_kernel"]
    assert MODS[32].static_issues == []


# -- 32-bit proof ----------------------------------------------------------------
def elim(kp: int, ki: int) -> int:
    """Documented error clamp: |err * gain| <= 2**30, and |err| <= 2**22."""
    return min(1 << 22, (1 << 30) // max(kp, ki, 1))


@st.composite
def rows(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    kp = draw(st.one_of(st.integers(0, (1 << 29) - 1), st.sampled_from([0, 1, 65536, (1 << 29) - 1])))
    ki = draw(st.one_of(st.integers(0, (1 << 29) - 1), st.sampled_from([0, 1, 3277, (1 << 29) - 1])))
    lo = draw(st.integers(0, 10000))
    hi = draw(st.integers(lo, 10000))
    prev = draw(st.integers(lo, hi))
    integ = draw(st.integers(lo << 16, hi << 16))
    par = [
        draw(st.integers(0, 2)),
        draw(st.integers(-XMAX, XMAX)),
        kp,
        ki,
        elim(kp, ki),
        lo,
        hi,
        draw(st.integers(0, 10000)),
        draw(st.integers(0, 1)),
        draw(st.integers(0, 2)),
        draw(st.integers(-XMAX, XMAX)),
    ]
    return par, [integ, prev]


@st.composite
def kernel_cases(draw: st.DrawFn) -> list:
    meas = draw(st.lists(st.integers(-XMAX, XMAX), min_size=3, max_size=3))
    n = draw(st.integers(1, 3))
    par: list[int] = []
    state: list[int] = []
    for _ in range(n):
        p, s = draw(rows())
        par += p
        state += s
    return [meas, par, state]


def _corner(meas: list[int], sp: int, kp: int, ki: int, integ: int, prev: int, slew: int) -> list:
    return [meas, [0, sp, kp, ki, elim(kp, ki), 0, 10000, slew, 0, 2, 0], [integ, prev]]


BIG = (1 << 29) - 1
CORNERS = [
    _corner([XMAX, 0, 0], -XMAX, BIG, BIG, 10000 << 16, 10000, 10000),
    _corner([-XMAX, 0, 0], XMAX, BIG, BIG, 0, 0, 10000),
    _corner([XMAX, 0, 0], -XMAX, BIG, 0, 10000 << 16, 0, 1),
    _corner([-XMAX, 0, 0], XMAX, 0, BIG, 10000 << 16, 10000, 0),
    _corner([XMAX, 0, 0], -XMAX, 1, 1, 10000 << 16, 10000, 10000),
]


def test_kernel_never_overflows_and_matches_unix_port() -> None:
    collected: list[tuple[list, list]] = []

    @settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(kernel_cases())
    def prove(case: list) -> None:
        collected.append((case, viper32.run_widths(MODS, lambda m: drv.control_kernel_case(m, *case))))

    prove()
    for case in CORNERS:
        collected.append((case, viper32.run_widths(MODS, lambda m: drv.control_kernel_case(m, *case))))
    got = port("port_control_kernel_case", [c for c, _ in collected])
    diffs = [(c, s, p) for (c, s), p in zip(collected, got) if s != p]
    assert not diffs, diffs[:3]


def test_shim_catches_a_gain_outside_the_domain() -> None:
    # Without the error clamp, a big gain times a big error overflows at 32 bits:
    # the proof harness must notice (this is what keeps the test above honest).
    case = [[XMAX, 0, 0], [0, -XMAX, BIG, 0, 1 << 22, 0, 10000, 10000, 0, 2, 0], [0, 0]]
    MODS[32].clear()
    drv.control_kernel_case(MODS[32], *case)
    assert MODS[32].overflows()


# -- behaviour (unix port) ---------------------------------------------------------
def test_sign_conventions_and_clamping() -> None:
    sp, hsp = CFG["t_setpoint"], CFG["h_setpoint"]
    hot_dry = [[sp + 400, 101325, hsp - 5000]] * 200
    cold_humid = [[sp - 400, 101325, hsp + 10240]] * 200
    hot, cold = port("port_control_run", [[CFG, hot_dry, []], [CFG, cold_humid, []]])
    for outs in (hot, cold):
        assert all(0 <= v <= 10000 for o in outs for v in o)
    # Hotter than the setpoint: shade closes fully, mist runs, dry air: fan off.
    shade = [o[0] for o in hot]
    assert shade == sorted(shade) and shade[-1] == 10000
    assert hot[-1][1] > 0 and hot[-1][2] == 0
    # Colder: shade retracts, no mist; too humid: fan runs.
    assert cold[-1][0] == 0 and cold[-1][1] == 0 and cold[-1][2] == 10000


def test_slew_limit() -> None:
    c = cfg(shade_slew=123, fan_slew=77)
    rng = random.Random(4)
    seq = [[rng.randint(1000, 4000), 101325, rng.randint(40000, 90000)] for _ in range(300)]
    [outs] = port("port_control_run", [[c, seq, []]])
    prev = [c["safe_shade"], 0, c["safe_fan"]]
    for o in outs:
        assert abs(o[0] - prev[0]) <= 123 and abs(o[2] - prev[2]) <= 77
        prev = o
    assert max(o[0] for o in outs) - min(o[0] for o in outs) > 1000  # it did move


def test_proportional_only_matches_float_reference() -> None:
    kp = 25 * 65536 + 12345
    c = cfg(shade_kp=kp, shade_ki=0, shade_slew=10000)
    sp = c["t_setpoint"]
    temps = list(range(sp - 600, sp + 600, 7))
    [outs] = port("port_control_run", [[c, [[t, 101325, HUMID_OK] for t in temps], []]])
    for t, o in zip(temps, outs):
        ref = min(max(kp / 65536 * (t - sp), 0), 10000)
        assert abs(o[0] - ref) <= 1, (t, o[0], ref)


def test_integral_removes_offset_and_anti_windup_releases_immediately() -> None:
    c = cfg(shade_kp=0, shade_ki=65536 // 4, shade_slew=10000)
    sp = c["t_setpoint"]
    # +1.00 degC error with I only: 25 output units per tick, ramp is linear.
    seq = [[sp + 100, 101325, HUMID_OK]] * 2000 + [[sp - 100, 101325, HUMID_OK]] * 3
    [outs] = port("port_control_run", [[c, seq, []]])
    ramp = [o[0] for o in outs[:100]]
    assert ramp[:5] == [25 * (i + 1) for i in range(5)]
    assert outs[1999][0] == 10000
    # Without anti-windup 2000 ticks would have stored 40 s of excess integral;
    # here the output starts falling on the first tick of negative error.
    assert outs[2000][0] == 10000 - 25 and outs[2002][0] == 10000 - 75


def test_no_windup_while_proportional_term_saturates() -> None:
    # P alone saturates at +1 degC; a clamp-only integrator would still charge to
    # full scale during the hot spell and hold the shade at ~9000 afterwards.
    c = cfg(shade_kp=100 * 65536, shade_ki=65536 // 4, shade_slew=10000)
    sp = c["t_setpoint"]
    seq = [[sp + 100, 101325, HUMID_OK]] * 2000 + [[sp - 10, 101325, HUMID_OK]]
    [outs] = port("port_control_run", [[c, seq, []]])
    assert outs[1999][0] == 10000
    assert outs[2000][0] == 0


def test_mist_blocked_at_humidity_ceiling() -> None:
    sp, ceil = CFG["mist_t_setpoint"], CFG["h_ceiling"]
    hot = sp + 300
    seq = [[hot, 101325, HUMID_OK]] * 50 + [[hot, 101325, ceil]] * 50 + [[hot, 101325, ceil - 1]] * 2
    [outs] = port("port_control_run", [[CFG, seq, []]])
    assert outs[49][1] > 0
    assert all(o[1] == 0 for o in outs[50:100])
    # Integrator was discharged: the first unblocked output is P plus one I step.
    p_term = (CFG["mist_kp"] * 300) >> 16
    i_step = (CFG["mist_ki"] * 300) >> 16
    assert p_term <= outs[100][1] <= min(p_term + i_step + 1, 10000)
    # The blocked loop does not disturb the others (shade saturated throughout).
    assert all(o[0] == 10000 for o in outs[49:])


def test_failsafe_outputs_and_smooth_return() -> None:
    c = cfg(safe_shade=4321, safe_fan=1234, shade_slew=100, fan_slew=100)
    sp = c["t_setpoint"]
    seq = [[sp + 1000, 101325, 95 * 1024]] * 40
    [outs] = port("port_control_run", [[c, seq, [30, 31]]])
    assert outs[30] == outs[31] == [4321, 0, 1234]
    assert outs[32][0] == 4321 + 100 and outs[32][2] == 1234 + 100
    assert outs[32][1] == 0  # humid: mist still blocked


def test_class_level_shim_equals_unix_port() -> None:
    rng = random.Random(5)
    cases = []
    for _ in range(4):
        seq = [[rng.randint(-4000, 8500), 101325, rng.randint(0, 102400)] for _ in range(80)]
        cases.append([cfg(shade_slew=rng.randint(1, 10000), fan_ki=rng.randint(0, 1 << 20)), seq, [10, 50]])
    got = port("port_control_run", cases)
    for case, p in zip(cases, got):
        assert viper32.run_widths(MODS, lambda m: drv.control_run(m, *case)) == p


def test_tick_path_allocates_nothing_on_small_heap() -> None:
    # Conditioner, SensorHealth, Controller and failsafe, under heap_lock with 64 KiB.
    [res] = port("port_alloc_free", [[512]], heapsize="64k")
    assert res[0] == "ok", res


def test_bench_inputs_exercise_the_common_path() -> None:
    from canopy_host.unixport import run_code

    proc = run_code(
        "from kernels_bench_inputs import condition_args, control_args, health_args\n"
        "from canopy.condition import condition_kernel\n"
        "from canopy.control import control_kernel\n"
        "from canopy.health import health_kernel\n"
        "a = condition_args(); condition_kernel(*a); print(list(a[4]))\n"
        "a = control_args(); control_kernel(*a); print(list(a[3]))\n"
        "print(health_kernel(*health_args()))\n",
        extra_path=[MPY_DIR],
    )
    assert proc.returncode == 0, proc.stderr
    cond, ctl, health = proc.stdout.splitlines()
    assert cond == "[2512, 101325, 51200]"  # spikes rejected, state settled
    assert all(0 < v < 10000 for v in eval(ctl))  # every loop in its linear range
    assert health == "0"
