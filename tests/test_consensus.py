"""Zone consensus: Marzullo fusion and NTP-style labelling against brute-force references,
and the Byzantine guarantees the repair engine relies on.

References here are written independently of canopy_host.consensus: coverage is counted
point by point over a grid that holds every edge and every gap between edges, and the
clock-select loop follows RFC 5905 §11.2.1 literally on those brute-force regions.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canopy_host.consensus import NO_QUORUM, OK, Interval, fuse, make_interval, marzullo

# -- brute-force references ------------------------------------------------------------


def coverage(intervals, x):
    return sum(1 for iv in intervals if iv.low <= x <= iv.high)


def brute_region(intervals, need):
    """Smallest and largest point covered by >= need closed intervals, by enumerating
    every point of a half-unit grid over the whole span (the tests' edges are integers,
    so the grid holds every edge and a point between any two)."""
    lo = min(iv.low for iv in intervals)
    hi = max(iv.high for iv in intervals)
    grid = [lo + k / 2 for k in range(int((hi - lo) * 2) + 1)]
    good = [x for x in grid if coverage(intervals, x) >= need]
    return (good[0], good[-1]) if good else None


def brute_select(intervals, budget):
    n = len(intervals)
    for f in range(budget + 1):
        region = brute_region(intervals, n - f)
        if region is None:
            continue
        inside = sum(1 for iv in intervals if region[0] <= iv.point <= region[1])
        if inside >= n - f:
            return f, region
    return None


def ivs(points, width):
    return [Interval(f"n{i:02d}", p - width, p + width, p) for i, p in enumerate(points)]


# Integer-valued edges make ties (touching intervals) common, where sweeps go wrong.
interval_lists = st.lists(
    st.tuples(st.integers(-20, 20), st.integers(0, 8)), min_size=1, max_size=12
).map(lambda xs: [Interval(f"n{i:02d}", p - w, p + w, float(p)) for i, (p, w) in enumerate(xs)])


@settings(max_examples=400, deadline=None)
@given(interval_lists, st.integers(1, 12))
def test_marzullo_matches_brute_force(intervals, need):
    want = brute_region(intervals, need) if need <= len(intervals) else None
    assert marzullo(intervals, need) == want


@settings(max_examples=400, deadline=None)
@given(interval_lists)
def test_labelling_matches_rfc5905_loop(intervals):
    n = len(intervals)
    budget = (n - 1) // 2
    v = fuse(intervals)
    fused = brute_region(intervals, n - budget)
    if fused is None:
        assert v.status == NO_QUORUM and not v.actionable
        assert v.value is None and v.truechimers == []
        return
    assert v.status == OK
    assert (v.low, v.high) == fused
    sel = brute_select(intervals, budget)
    chosen = sel[1] if sel else fused
    assert v.selected_f == (sel[0] if sel else None)
    expect_true = sorted(iv.node for iv in intervals if iv.high >= chosen[0] and iv.low <= chosen[1])
    assert v.truechimers == expect_true
    assert sorted(v.truechimers + v.falsetickers) == sorted(iv.node for iv in intervals)
    assert v.low <= v.value <= v.high


# -- Byzantine guarantees ----------------------------------------------------------------

ACC, ALLOW = 1.0, 1.0
W = ACC + ALLOW


@st.composite
def byzantine_zone(draw, n_of_f):
    f = draw(st.integers(1, 3))
    n = n_of_f(f)
    truth = draw(st.floats(-10, 40))
    # A correct node's interval contains the truth: its error is within the half-width.
    honest = [truth + draw(st.floats(-W, W)) for _ in range(n - f)]
    strategy = draw(st.sampled_from(["collude_high", "collude_low", "extremes", "anywhere"]))
    if strategy == "collude_high":  # all together, just outside the truth's reach
        byz = [truth + W + draw(st.floats(1e-6, W))] * f
    elif strategy == "collude_low":
        byz = [truth - W - draw(st.floats(1e-6, W))] * f
    elif strategy == "extremes":
        byz = [truth + draw(st.sampled_from([-1e4, 1e4])) for _ in range(f)]
    else:
        byz = [truth + draw(st.floats(-6 * W, 6 * W)) for _ in range(f)]
    order = draw(st.permutations(range(n)))
    return f, truth, honest, byz, order


def zone_intervals(honest, byz, order):
    named = [(f"h{i}", v) for i, v in enumerate(honest)] + [(f"b{i}", v) for i, v in enumerate(byz)]
    return [make_interval(named[k][0], named[k][1], ACC, ALLOW) for k in order]


@settings(max_examples=300, deadline=None)
@given(byzantine_zone(lambda f: 3 * f + 1))
def test_3f_plus_1_value_stays_within_correct_readings(case):
    f, truth, honest, byz, order = case
    v = fuse(zone_intervals(honest, byz, order), max_faulty=f)
    assert v.status == OK and v.actionable
    assert v.tight
    assert min(honest) - 1e-9 <= v.value <= max(honest) + 1e-9
    assert v.low - 1e-9 <= truth <= v.high + 1e-9
    # Tight (Marzullo, n > 3f): no wider than a correct node's interval.
    assert v.high - v.low <= 2 * W + 1e-9
    # The default budget, (n-1)//2 >= f, keeps the value and containment guarantees.
    d = fuse(zone_intervals(honest, byz, order))
    assert d.status == OK and min(honest) - 1e-9 <= d.value <= max(honest) + 1e-9
    assert d.low - 1e-9 <= truth <= d.high + 1e-9


@settings(max_examples=300, deadline=None)
@given(byzantine_zone(lambda f: 2 * f + 1))
def test_2f_plus_1_contains_truth_but_not_tight(case):
    f, truth, honest, byz, order = case
    v = fuse(zone_intervals(honest, byz, order), max_faulty=f)
    assert v.status == OK
    assert v.low - 1e-9 <= truth <= v.high + 1e-9
    assert not v.tight
    # Default budget (n-1)//2 is f here too.
    d = fuse(zone_intervals(honest, byz, order))
    assert d.max_faulty == f and not d.tight and d.low - 1e-9 <= truth <= d.high + 1e-9


def test_majority_faulty_is_no_quorum_and_not_actionable():
    honest = [22.1, 21.8]
    faulty = [31.0, 40.0, 5.0]  # three faulty nodes that do not even agree with each other
    v = fuse([make_interval(f"n{i}", x, ACC, ALLOW) for i, x in enumerate(honest + faulty)])
    assert v.status == NO_QUORUM
    assert not v.actionable
    assert v.value is None and v.low is None and v.high is None
    assert v.truechimers == [] and v.falsetickers == []
    assert "3 of the 5" in v.reason  # the truth is unknowable here: nothing is reported


def test_budget_larger_than_the_zone_can_outvote():
    v = fuse([make_interval(f"n{i}", 20.0, ACC, ALLOW) for i in range(4)], max_faulty=2)
    assert v.status == NO_QUORUM and "max_faulty=2" in v.reason and not v.actionable


def test_two_nodes_agreeing_are_ok_but_not_actionable():
    v = fuse([make_interval("a", 20.0, ACC, ALLOW), make_interval("b", 20.4, ACC, ALLOW)])
    assert v.status == OK and v.value == pytest.approx(20.2)
    assert not v.actionable  # two nodes cannot tell which one is wrong


def test_learned_offset_is_subtracted():
    iv = make_interval("n", 25.5, 1.0, 1.0, offset=1.5)
    assert (iv.point, iv.low, iv.high) == (24.0, 22.0, 26.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="duplicate"):
        fuse([make_interval("a", 1, 1, 1), make_interval("a", 2, 1, 1)])
    with pytest.raises(ValueError, match="bad interval"):
        fuse([Interval("a", 2.0, 1.0, 1.5)])
    with pytest.raises(ValueError):
        fuse([make_interval("a", 1, 1, 1)], max_faulty=-1)
    assert fuse([]).status == NO_QUORUM


def test_json_fields_are_the_documented_interface():
    v = fuse([make_interval(f"n{i}", 20 + i / 10, 1, 1) for i in range(4)], zone="A", quantity="t",
             window_start=120)
    d = v.to_json()
    for key in ("zone", "window_start", "quantity", "value", "low", "high", "tight", "status", "truechimers",
                "falsetickers", "faults"):
        assert key in d
    assert d["zone"] == "A" and d["window_start"] == 120 and d["status"] == "OK"
