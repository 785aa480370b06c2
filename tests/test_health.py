"""SensorHealth: missing / stuck / out-of-range detection with automatic recovery."""

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
MODS = viper32.load_widths(FIRMWARE_DIR / "canopy" / "health.py", extra_path=[FIRMWARE_DIR])
CFG = dict(MODS[32].namespace["get"].__globals__["DEFAULT_CONFIG"])
MISSING = MODS[32].FAULT_MISSING
STUCK = MODS[32].FAULT_STUCK
RANGE = MODS[32].FAULT_RANGE

I32 = st.integers(-(2**31), 2**31 - 1)


def port(func: str, cases: list) -> list:
    return call_batch("kernels_drivers", func, cases, extra_path=[MPY_DIR])


def cfg(**over: int) -> dict:
    c = dict(CFG)
    c.update(over)
    return c


def test_fault_bits_are_distinct() -> None:
    assert {MISSING, STUCK, RANGE} == {1, 2, 4}
    assert MODS[32].static_issues == []


@st.composite
def kernel_cases(draw: st.DrawFn) -> list:
    n = draw(st.integers(1, 4))
    raw = draw(st.lists(I32, min_size=n, max_size=n))
    lim: list[int] = []
    for _ in range(n):
        a, b = sorted(draw(st.lists(I32, min_size=2, max_size=2, unique=True)))
        lim += [a, b]
    stuck_n = draw(st.one_of(st.integers(2, 50), st.just((1 << 30) - 1)))
    recover_m = draw(st.one_of(st.integers(1, 50), st.just((1 << 30) - 1)))
    lim += [stuck_n, recover_m]
    # State inside its invariant: runs never exceed their limits, latched is 0..7.
    prev = draw(st.one_of(st.just(raw), st.lists(I32, min_size=n, max_size=n)))
    state = list(prev) + [
        draw(st.integers(0, 1)),
        draw(st.integers(0, stuck_n)),
        draw(st.integers(0, recover_m)),
        draw(st.integers(0, 7)),
    ]
    return [raw, lim, state, draw(st.integers(0, 1))]


def test_kernel_never_overflows_and_matches_unix_port() -> None:
    collected: list[tuple[list, list]] = []

    @settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(kernel_cases())
    def prove(case: list) -> None:
        collected.append((case, viper32.run_widths(MODS, lambda m: drv.health_kernel_case(m, *case))))

    prove()
    got = port("port_health_kernel_case", [c for c, _ in collected])
    diffs = [(c, s, p) for (c, s), p in zip(collected, got) if s != p]
    assert not diffs, diffs[:3]


def _jitter(rng: random.Random, k: int) -> list[list[int]]:
    return [[1, 2500 + rng.randint(-3, 3), 101325 + rng.randint(-5, 5), 61440 + rng.randint(-20, 20)] for _ in range(k)]


def test_missing_then_recovery_after_m_good_readings() -> None:
    rng = random.Random(6)
    c = cfg(recover_m=4)
    seq = _jitter(rng, 5) + [[0, 0, 0, 0]] * 3 + _jitter(rng, 6)
    [faults] = port("port_health_run", [[c, seq]])
    assert faults[:5] == [0] * 5
    assert faults[5:8] == [MISSING] * 3
    assert faults[8:11] == [MISSING] * 3  # three good readings are not yet enough
    assert faults[11:] == [0] * 3


def test_stuck_after_n_identical_readings_and_jitter_is_healthy() -> None:
    rng = random.Random(7)
    c = cfg(stuck_n=10, recover_m=3)
    frozen = [[1, 2512, 101300, 60000]] * 15
    seq = _jitter(rng, 300) + frozen + _jitter(rng, 5)
    [faults] = port("port_health_run", [[c, seq]])
    assert faults[:300] == [0] * 300
    assert faults[300:309] == [0] * 9
    assert faults[309:315] == [STUCK] * 6
    # Changing values again: 3 good readings clear the fault.
    assert faults[315:317] == [STUCK] * 2 and faults[317:] == [0] * 3


def test_one_changing_channel_is_enough_to_be_alive() -> None:
    c = cfg(stuck_n=5)
    seq = [[1, 2500, 101325, 61440 + (i & 1)] for i in range(50)]
    [faults] = port("port_health_run", [[c, seq]])
    assert faults == [0] * 50


def test_out_of_range_per_channel_and_combined_with_missing() -> None:
    rng = random.Random(8)
    c = cfg(recover_m=2)
    base = _jitter(rng, 3)
    seq = base + [[1, 9000, 101325, 61440], [1, 2500, 20000, 61440], [1, 2500, 101325, 103000]]
    seq += [[1, -4001, 101325, 61440], [1, 2501, 101325, 61440], [0, 0, 0, 0]]
    seq += _jitter(rng, 3)
    [faults] = port("port_health_run", [[c, seq]])
    assert faults[:3] == [0] * 3
    assert faults[3:7] == [RANGE] * 4
    assert faults[7] == RANGE  # latched until recover_m good readings
    assert faults[8] == RANGE | MISSING
    assert faults[9] == RANGE | MISSING and faults[10:] == [0, 0]


def test_limits_are_inclusive() -> None:
    c = cfg(recover_m=1)
    seq = [
        [1, c["t_min"], c["p_min"], c["h_min"]],
        [1, c["t_max"], c["p_max"], c["h_max"]],
        [1, c["t_max"] + 1, c["p_max"], c["h_max"]],
    ]
    [faults] = port("port_health_run", [[c, seq]])
    assert faults == [0, 0, RANGE]


def test_class_level_shim_equals_unix_port() -> None:
    rng = random.Random(9)
    seq = []
    for _ in range(400):
        r = rng.random()
        if r < 0.05:
            seq.append([0, 0, 0, 0])
        elif r < 0.1:
            seq.append([1, rng.randint(-10000, 10000), rng.randint(0, 200000), rng.randint(-5000, 110000)])
        elif r < 0.4 and seq:
            seq.append(list(seq[-1]))
        else:
            seq += _jitter(rng, 1)
    cases = [[cfg(stuck_n=3, recover_m=2), seq], [cfg(stuck_n=2, recover_m=1), seq]]
    got = port("port_health_run", cases)
    for case, p in zip(cases, got):
        assert viper32.run_widths(MODS, lambda m: drv.health_run(m, *case)) == p
    seen = 0
    for f in got[0]:
        seen |= f
    assert seen == MISSING | STUCK | RANGE  # the sequence exercised every fault
