"""Conditioner: median-of-5 spike rejection + EMA, and its 32-bit proof.

Behaviour is checked in the unix port against independent references (statistics.median,
a float EMA); overflow-freedom with tests/viper32.py over the documented domain; and the
shim's width-32 results must equal the real unix port's for the same cases.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import viper32
from canopy_host.paths import FIRMWARE_DIR
from canopy_host.unixport import call_batch
from mpy import kernels_drivers as drv

MPY_DIR = Path(__file__).resolve().parent / "mpy"
MODS = viper32.load_widths(FIRMWARE_DIR / "canopy" / "condition.py", extra_path=[FIRMWARE_DIR])

# Documented domain (docs/fixed-point.md): |x| < 2**21, EMA state = value << 8, shift 0..7.
XMAX = (1 << 21) - 1
values = st.integers(-XMAX, XMAX)


def port(func: str, cases: list) -> list:
    return call_batch("kernels_drivers", func, cases, extra_path=[MPY_DIR])


def test_no_static_issues() -> None:
    assert MODS[32].viper_functions == ["condition_kernel", "prime_kernel"]
    assert MODS[32].static_issues == []


@st.composite
def kernel_cases(draw: st.DrawFn) -> list:
    n = draw(st.integers(1, 4))
    raw = draw(st.lists(values, min_size=n, max_size=n))
    hist = draw(st.lists(values, min_size=5 * n, max_size=5 * n))
    ema = [draw(values) << 8 | draw(st.integers(0, 255)) if draw(st.booleans()) else draw(values) << 8 for _ in range(n)]
    ema = [max(min(e, XMAX << 8), -XMAX << 8) for e in ema]
    shift = draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
    pos = draw(st.integers(0, 4))
    return [raw, hist, ema, shift, pos]


CORNERS = [
    [[XMAX] * 3, [-XMAX] * 15, [-XMAX << 8] * 3, [0, 3, 7], 0],
    [[-XMAX] * 3, [XMAX] * 15, [XMAX << 8] * 3, [0, 3, 7], 4],
    [[XMAX, -XMAX, 0], [XMAX, -XMAX] * 7 + [0], [XMAX << 8, -XMAX << 8, 0], [7, 7, 7], 2],
]


def test_kernel_never_overflows_and_matches_unix_port() -> None:
    collected: list[tuple[list, list]] = []

    @settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(kernel_cases())
    def prove(case: list) -> None:
        res = viper32.run_widths(MODS, lambda m: drv.condition_kernel_case(m, *case))
        collected.append((case, res))

    prove()
    for case in CORNERS:
        collected.append((case, viper32.run_widths(MODS, lambda m: drv.condition_kernel_case(m, *case))))
    got = port("port_condition_kernel_case", [c for c, _ in collected])
    diffs = [(c, s, p) for (c, s), p in zip(collected, got) if s != p]
    assert not diffs, diffs[:3]


def _random_seq(rng: random.Random, steps: int) -> list[list[int]]:
    seq = []
    t, p, h = 2500, 101325, 60 * 1024
    for _ in range(steps):
        t += rng.randint(-30, 30)
        p += rng.randint(-20, 20)
        h += rng.randint(-200, 200)
        row = [t, p, h]
        if rng.random() < 0.1:  # occasional spike on one channel
            row[rng.randrange(3)] += rng.choice([-1, 1]) * rng.randint(1000, 50000)
        seq.append(row)
    return seq


def test_median_with_shift_zero_is_exact_median() -> None:
    rng = random.Random(1)
    seqs = [_random_seq(rng, 40) for _ in range(5)]
    results = port("port_condition_run", [[[0, 0, 0], s, []] for s in seqs])
    for seq, outs in zip(seqs, results):
        # The first update primes the whole window with the first row.
        window = [seq[0]] * 4
        for row, out in zip(seq, outs):
            window = (window + [row])[-5:]
            expect = [statistics.median(r[c] for r in window) for c in range(3)]
            assert out == expect


def test_ema_tracks_float_reference_within_one_lsb() -> None:
    rng = random.Random(2)
    shifts = [[1, 2, 3], [7, 5, 0], [4, 4, 4]]
    seqs = [_random_seq(rng, 200) for _ in shifts]
    results = port("port_condition_run", [[k, s, []] for k, s in zip(shifts, seqs)])
    for k, seq, outs in zip(shifts, seqs, results):
        window = [seq[0]] * 4
        ema = [float(v) for v in seq[0]]
        for row, out in zip(seq, outs):
            window = (window + [row])[-5:]
            for c in range(3):
                med = statistics.median(r[c] for r in window)
                ema[c] += (med - ema[c]) / (1 << k[c])
                assert abs(out[c] - ema[c]) <= 1.0, (k, c, out[c], ema[c])


def test_spikes_do_not_reach_the_output() -> None:
    steady = [2500, 101325, 61440]
    seq = [steady] * 10
    seq += [[9000, 101325, 61440], [9000, 50000, 61440], steady, [-4000, 101325, 0], steady] + [steady] * 5
    [outs] = port("port_condition_run", [[[2, 3, 2], seq, []]])
    assert all(o == steady for o in outs)


def test_step_settles_exactly_and_reset_forgets() -> None:
    seq = [[2000, 100000, 40960]] * 3 + [[3000, 90000, 81920]] * 1200
    seq += [[-1500, 95000, 1000]] * 2
    [outs] = port("port_condition_run", [[[7, 5, 4], seq, [len(seq) - 2]]])
    # Even the heaviest smoothing settles on the exact value (floor bias < 0.5 LSB).
    assert outs[1202] == [3000, 90000, 81920]
    # Monotone approach, no overshoot.
    t = [o[0] for o in outs[3:1203]]
    p = [o[1] for o in outs[3:1203]]
    assert t == sorted(t) and max(t) <= 3000
    assert p == sorted(p, reverse=True) and min(p) >= 90000
    assert outs[-2] == outs[-1] == [-1500, 95000, 1000]


def test_class_level_shim_equals_unix_port() -> None:
    rng = random.Random(3)
    cases = []
    for k in ([0, 0, 0], [2, 3, 2], [7, 1, 6]):
        seq = _random_seq(rng, 60)
        cases.append([k, seq, [0, 30]])
    got = port("port_condition_run", cases)
    for case, p in zip(cases, got):
        assert viper32.run_widths(MODS, lambda m: drv.condition_run(m, *case)) == p
