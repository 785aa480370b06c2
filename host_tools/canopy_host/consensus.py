"""Fault-tolerant zone consensus: one interval per node, Marzullo fusion, NTP-style labelling.

Every node of a zone reports the same physical quantity (the zone's air), each with
its own sensor error and position. Per zone, quantity and time window each node gets
ONE interval

    [point - width, point + width],  point = median(readings in window) - learned offset
                                     width = sensor accuracy + zone allowance

which contains the zone's true value if the node is healthy. From these intervals:

* the fused interval (`low`, `high`) is Marzullo's: the smallest and the largest point
  covered by at least n - f intervals, where f is the fault budget (`max_faulty`,
  default the most a majority can outvote, (n-1)//2). As long as at most f nodes are
  faulty, the truth is inside it. If n > 3f it is also no wider than a correct node's
  interval (`tight`); for 2f < n <= 3f it only contains the truth.
* truechimers/falsetickers are labelled as NTP's clock-select does (RFC 5905
  §11.2.1): for f' = 0, 1, ... up to the budget, the first intersection of n - f'
  intervals that also holds at least n - f' of the points wins; truechimers are the
  nodes whose interval meets it. (If no f' passes the points test, the fused interval
  is used instead, so labelling never fails where fusion succeeds.)
* the zone value is the median of the truechimers' points, clamped into the fused
  interval: with fewer than half the truechimers faulty, it lies within the range of
  the correct readings.
* NO_QUORUM when no point is covered by n - f intervals (no majority agrees) or the
  zone has too few nodes for the budget. A NO_QUORUM verdict is never `actionable`:
  the repair engine must not change anything automatically on it.

    from canopy_host.consensus import fuse, make_interval
    iv = [make_interval("n01", 24.1, 1.0, 1.0), make_interval("n02", 24.3, 1.0, 1.0),
          make_interval("n03", 31.0, 1.0, 1.0)]
    v = fuse(iv, zone="A", quantity="t", window_start=1795636800)
    v.value, v.falsetickers, v.actionable   # 24.2, ['n03'], True
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

OK = "OK"
NO_QUORUM = "NO_QUORUM"

# JSON units of each quantity and their defaults. Accuracy: the BME280 datasheet's
# absolute accuracy (temperature ±1.0 °C over 0..65 °C, pressure ±1.0 hPa, humidity
# ±3 %RH); allowance: how far a healthy node's air may differ from the zone's air
# (position, sun, airflow). Resolution: the protocol's integer step.
QUANTITIES: dict[str, dict[str, Any]] = {
    "t": {"unit": "°C", "accuracy": 1.0, "allowance": 1.0, "resolution": 0.01, "range": (-40.0, 85.0),
          "max_slew": 0.1},  # °C per second
    "p": {"unit": "hPa", "accuracy": 1.0, "allowance": 0.5, "resolution": 0.01, "range": (300.0, 1100.0),
          "max_slew": 0.5},
    "h": {"unit": "%RH", "accuracy": 3.0, "allowance": 3.0, "resolution": 1.0 / 1024, "range": (0.0, 100.0),
          "max_slew": 1.0},
}
DEFAULT_WINDOW = 60.0  # seconds


class Interval(NamedTuple):
    # A NamedTuple, not a frozen dataclass: building 10,000 of them per window is a
    # third of the fusion's time with a dataclass' __init__.
    node: str
    low: float
    high: float
    point: float


def make_interval(node: str, value: float, accuracy: float, allowance: float, offset: float = 0.0) -> Interval:
    """The interval of one node: its reading minus its learned offset, ± (accuracy + allowance)."""
    point = value - offset
    width = abs(accuracy) + abs(allowance)
    return Interval(node, point - width, point + width, point)


def _sorted_edges(intervals: Sequence[Interval]) -> list[tuple[float, int]]:
    edges = [(iv.low, -1) for iv in intervals]
    edges += [(iv.high, 1) for iv in intervals]
    edges.sort()
    return edges


def marzullo(intervals: Sequence[Interval], need: int) -> tuple[float, float] | None:
    """(smallest, largest) point covered by at least `need` closed intervals, or None.

    One sort of the 2n edges, then one sweep from each end: O(n log n)."""
    if need <= 0 or need > len(intervals):
        return None
    return _sweep(_sorted_edges(intervals), need)


def _sweep(edges: list[tuple[float, int]], need: int) -> tuple[float, float] | None:
    # Sorted (x, -1 lower / +1 upper): at equal x lower edges come first, so intervals
    # that only touch still count as overlapping (the intervals are closed).
    count = 0
    low = None
    for x, kind in edges:
        if kind < 0:
            count += 1
            if count >= need:
                low = x
                break
        else:
            count -= 1
    if low is None:
        return None
    count = 0
    high = low
    for i in range(len(edges) - 1, -1, -1):
        x, kind = edges[i]
        # Walking down, an upper edge opens an interval. At equal x the sort put the
        # upper edges last, so they are met first here: touching intervals overlap.
        if kind > 0:
            count += 1
            if count >= need:
                high = x
                break
        else:
            count -= 1
    return low, high


@dataclass
class Verdict:
    zone: str
    quantity: str
    window_start: float
    status: str
    value: float | None
    low: float | None
    high: float | None
    tight: bool
    truechimers: list[str]
    falsetickers: list[str]
    n: int
    max_faulty: int  # the fault budget f the fused interval tolerates
    selected_f: int | None  # the f' at which clock-select found its intersection
    reason: str = ""
    points: dict[str, float] = field(default_factory=dict)  # node -> offset-corrected point
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled by faults.py

    @property
    def actionable(self) -> bool:
        """May the repair engine act on this verdict without a human? Never on NO_QUORUM,
        and not with fewer than three nodes (a disagreement of two cannot be attributed)."""
        return self.status == OK and self.n >= 3

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "zone": self.zone,
            "window_start": self.window_start,
            "quantity": self.quantity,
            "value": _round(self.value),
            "low": _round(self.low),
            "high": _round(self.high),
            "tight": self.tight,
            "status": self.status,
            "truechimers": self.truechimers,
            "falsetickers": self.falsetickers,
            "faults": self.faults,
            "n": self.n,
            "max_faulty": self.max_faulty,
            "actionable": self.actionable,
        }
        if self.reason:
            out["reason"] = self.reason
        return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def fuse(
    intervals: Sequence[Interval],
    *,
    zone: str = "",
    quantity: str = "",
    window_start: float = 0.0,
    max_faulty: int | None = None,
) -> Verdict:
    """The zone's verdict for one window from one interval per node (see the module doc)."""
    n = len(intervals)
    budget = max(0, (n - 1) // 2) if max_faulty is None else max_faulty
    if budget < 0:
        raise ValueError("max_faulty must be >= 0")
    names = sorted(iv.node for iv in intervals)
    if len(set(names)) != n:
        raise ValueError("one interval per node: duplicate node in a zone window")
    points = {iv.node: iv.point for iv in intervals}

    def no_quorum(reason: str) -> Verdict:
        return Verdict(zone, quantity, window_start, NO_QUORUM, None, None, None, False, [], [], n, budget, None,
                       reason, points)

    if n == 0:
        return no_quorum("no readings")
    if n <= 2 * budget:
        return no_quorum(f"{n} node(s) cannot outvote max_faulty={budget} (need at least {2 * budget + 1})")
    for iv in intervals:
        if not (math.isfinite(iv.low) and math.isfinite(iv.high)) or iv.low > iv.high:
            raise ValueError(f"bad interval for node {iv.node!r}: [{iv.low}, {iv.high}]")

    edges = _sorted_edges(intervals)
    fused = _sweep(edges, n - budget)
    if fused is None:
        return no_quorum(f"no value is inside the intervals of {n - budget} of the {n} nodes")
    low, high = fused

    # Clock-select (RFC 5905 §11.2.1): the smallest f' whose intersection holds n - f' points.
    pts = sorted(points.values())
    chosen: tuple[float, float] = fused
    selected: int | None = None
    for f in range(budget + 1):
        region = _sweep(edges, n - f)
        if region is None:
            continue
        inside = _count_between(pts, region[0], region[1])
        if inside >= n - f:
            chosen, selected = region, f
            break
    c_low, c_high = chosen
    true = [iv.node for iv in intervals if iv.high >= c_low and iv.low <= c_high]
    true.sort()
    tset = set(true)
    false = [x for x in names if x not in tset]
    value = _median([points[x] for x in true])
    value = min(max(value, low), high)
    return Verdict(zone, quantity, window_start, OK, value, low, high, n > 3 * budget, true, false, n, budget,
                   selected, "", points)


def _count_between(sorted_pts: list[float], lo: float, hi: float) -> int:
    return bisect.bisect_right(sorted_pts, hi) - bisect.bisect_left(sorted_pts, lo)


def _median(values: Iterable[float]) -> float:
    s = sorted(values)
    m = len(s)
    if m == 0:
        raise ValueError("median of nothing")
    return s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2.0


# -- readings -> windows ------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One input reading, in the JSON units of docs/consensus.md."""

    node: str
    zone: str
    time: float  # Unix seconds
    quantity: str
    value: float
    accuracy: float | None = None  # None: the quantity's default (QUANTITIES)
    setpoint: float | None = None  # actuator quantities only: the commanded output
    # Seconds on the NODE's own clock (its tick count times its tick period), or None.
    # Rates are physical only in the node's time: the receive time of a virtual node
    # running at 60x, or of a node whose frames arrive in bursts, is not.
    node_time: float | None = None
    # The node's own word on whether the repair agent held it in quarantine when it took
    # this reading (failsafe bit 2), or None when the source does not say.
    quarantined: bool | None = None


def window_of(time: float, window: float) -> float:
    """Windows are [k*window, (k+1)*window) in Unix seconds: aligned, so every tool agrees."""
    start = math.floor(time / window) * window
    return int(start) if float(start).is_integer() else start


@dataclass
class NodeWindow:
    """One node's readings of one quantity in one window, reduced."""

    value: float  # median of the readings (raw, before the learned offset)
    accuracy: float
    count: int
    spread: float  # standard deviation of the readings inside the window (0 for one)
    first_time: float
    last_time: float
    setpoint: float | None = None
    # Scatter of the readings around a straight line through them in time: the sensor's
    # noise without the window's trend (a reading drifting 1 °C per window has a spread
    # of 0.3 °C but no noise). None: not computed (then `spread` stands in).
    noise: float | None = None
    last_node_time: float | None = None  # the node's own clock at its last reading (Reading.node_time)


def reduce_window(readings: Sequence[Reading], default_accuracy: float) -> NodeWindow:
    vals = [r.value for r in readings]
    mean = sum(vals) / len(vals)
    spread = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    # The widest claim wins: a reading without its own accuracy has the quantity's default.
    acc = max(default_accuracy if r.accuracy is None else r.accuracy for r in readings)
    sps = [r.setpoint for r in readings if r.setpoint is not None]
    times = [r.time for r in readings]
    node_times = [r.node_time for r in readings]
    clock = times if None in node_times else node_times
    last_nt = None if None in node_times else max(node_times)  # type: ignore[type-var]
    return NodeWindow(_median(vals), acc, len(vals), spread,
                      min(times), max(times), _median(sps) if sps else None,
                      _detrended_std(clock, vals, mean, spread), last_nt)  # type: ignore[arg-type]


def _detrended_std(xs: Sequence[float], ys: Sequence[float], my: float, spread: float) -> float:
    """Standard deviation of ys around their least-squares line over xs (n - 2 degrees of
    freedom). Fewer than three readings cannot tell noise from a trend: 0."""
    n = len(ys)
    if n < 3:
        return 0.0
    mx = sum(xs) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return spread  # all at one instant: no trend to take out
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = spread * spread * n
    ssr = max(0.0, syy - sxy * sxy / sxx)
    return math.sqrt(ssr / (n - 2))


def zone_verdict(
    zone: str,
    quantity: str,
    window_start: float,
    nodes: dict[str, NodeWindow],
    *,
    allowance: float,
    offsets: dict[str, float] | None = None,
    max_faulty: int | None = None,
    exclude: Iterable[str] = (),
) -> Verdict:
    """fuse() over the reduced windows of a zone; `exclude` (quarantined nodes) takes no part."""
    offsets = offsets or {}
    skip = set(exclude)
    iv = [make_interval(node, nw.value, nw.accuracy, allowance, offsets.get(node, 0.0))
          for node, nw in sorted(nodes.items()) if node not in skip]
    return fuse(iv, zone=zone, quantity=quantity, window_start=window_start, max_faulty=max_faulty)
