"""Per-node fault classification over a history of consensus windows, with a recommended action.

`FaultTracker.observe(verdict, windows)` is called once per zone, quantity and window,
in time order. It keeps a bounded history per zone and quantity and returns one
`Finding` per node: its class, the numbers that led there (`evidence`) and an `Action`
for the repair engine. Classes (docs/consensus.md has the full rules):

    ok            agrees with the zone                               -> none
    suspect       CUSUM alarm, too few windows to tell drift from a microclimate, or an
                  offset shrinking back or within the sensor's rated accuracy -> none
    microclimate  stable offset, tracks the zone, pressure agrees    -> none (offset learned)
    spike         a single outlier window                            -> none (suppressed)
    drift         offset beyond the sensor's accuracy: growing (CUSUM + trend) or a
                  stable unexplained step                            -> recalibrate
    stuck         one value repeated while the neighbours vary       -> quarantine
    noise         scatter (around its trend) well above the neighbours' -> quarantine
    spoofing      MAC/counter failure, impossible value, impossible sustained slew
                  (on the node's own clock when the readings carry it) -> quarantine
    offline       no reading this window (an omission, not a vote)   -> none
    actuator_mismatch  output != setpoint (push_config) or no physical effect (quarantine)
    no_quorum     the zone had no quorum: nothing is judged, nothing is actionable

A node in `quarantined` that is `ok` (or a learned microclimate) for `release_after`
windows in a row gets `release`.

    tracker = FaultTracker()
    for verdict, windows in per_window_verdicts:     # windows: node -> NodeWindow
        for finding in tracker.observe(verdict, windows):
            if finding.actionable and finding.action.kind != "none":
                plan(finding.action)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .consensus import NO_QUORUM, QUANTITIES, NodeWindow, Verdict

ACTIONS = ("none", "recalibrate", "push_config", "quarantine", "release")
ALARM_CLASSES = frozenset({"drift", "stuck", "noise", "spoofing", "actuator_mismatch", "spike"})
ACTUATORS = ("shade", "mist", "fan")
NOISE_MIN_READINGS = 3  # a window's own noise estimate needs a line through at least three readings
STILL_SPREAD = 0.01  # in resolution steps: an in-window spread this small is float rounding, not noise
# Security-layer rejects that count as spoofing evidence: the generic names of the JSON
# input and the monitor's verdict names (canopy_host.security.VERDICTS, stored as
# `security` link events).
SECURITY_EVENTS = ("mac_failure", "replay", "counter_rollback", "cross_node", "unauthenticated",
                   "forged", "rollback", "unauth", "malformed", "unknown_node")


@dataclass(frozen=True)
class Action:
    """What the repair engine should do. `offset` (recalibrate only), in the quantity's
    JSON units, is how much the node reads too high compared with what consensus expects
    of it (the zone value plus its learned microclimate offset, which stays host-side):
    the node's calibration should subtract it ON TOP of whatever it already applies."""

    kind: str  # one of ACTIONS
    node: str
    quantity: str | None = None
    offset: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ACTIONS:
            raise ValueError(f"unknown action {self.kind!r}")


@dataclass(frozen=True)
class Finding:
    node: str
    zone: str
    quantity: str
    window_start: float
    fault: str  # the class
    alarm: bool  # a fault class (spike included: it is reported, though never repaired)
    actionable: bool  # False on NO_QUORUM verdicts: never repair automatically then
    action: Action
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        a = asdict(self.action)
        a.pop("node")
        return {"class": self.fault, "alarm": self.alarm, "actionable": self.actionable,
                "action": {k: v for k, v in a.items() if v not in (None, "")},
                "evidence": {k: _r(v) for k, v in self.evidence.items()}}


def _r(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else v


@dataclass
class FaultConfig:
    history: int = 60  # windows kept per zone and quantity (also the CUSUM's longest memory)
    min_windows: int = 6  # windows needed to call drift vs microclimate, noise, stuck
    cusum_k: float = 0.25  # CUSUM slack, in units of the node's interval half-width
    cusum_h: float = 2.0  # CUSUM alarm threshold, same units
    trend_fraction: float = 0.1  # a significant trend larger than this * width over the fit = drift
    trend_sigmas: float = 3.0  # slope significance (slope / its standard error)
    stable_fraction: float = 0.25  # residual std below this * width = a stable offset
    min_correlation: float = 0.5  # first differences node vs zone, for a microclimate
    noise_ratio: float = 3.0  # residual-difference std / neighbours' median std
    noise_floor: float = 0.1  # ...and at least this * width
    noise_windows: int = 24  # look-back of the noise estimate (a median needs many samples)
    stuck_windows: int = 5
    actuator_tolerance: float = 5.0  # percentage points
    mismatch_windows: int = 2
    effect_windows: int = 3
    mist_on: float = 50.0  # %: misting this hard must raise humidity...
    mist_min_rise: float = 0.5  # ...by at least this many %RH over effect_windows
    release_after: int = 5


@dataclass
class _Win:
    start: float
    zone_value: float | None
    values: dict[str, float]  # raw node values
    spreads: dict[str, float]
    widths: dict[str, float]
    truechimers: frozenset[str]
    last_time: dict[str, float]
    loo: dict[str, float] = field(default_factory=dict)  # value - median of the OTHER nodes
    noises: dict[str, float] = field(default_factory=dict)  # in-window scatter without the trend
    counts: dict[str, int] = field(default_factory=dict)  # readings in the window
    node_time: dict[str, float] = field(default_factory=dict)  # the node's own clock, last reading


class FaultTracker:
    def __init__(self, config: FaultConfig | None = None, *, allowance: Mapping[str, float] | None = None,
                 quarantined: Iterable[str] = (), offsets: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.cfg = config or FaultConfig()
        self.allowance = {q: QUANTITIES[q]["allowance"] for q in QUANTITIES}
        self.allowance.update(allowance or {})
        self.offsets: dict[tuple[str, str, str], float] = {}  # (zone, node, quantity) -> learned offset
        self.base_offsets = {n: dict(m) for n, m in (offsets or {}).items()}  # node -> quantity -> offset
        self.quarantined: set[str] = set(quarantined)
        self._hist: dict[tuple[str, str], deque[_Win]] = {}
        self._cusum_from: dict[tuple[str, str, str], float] = {}  # windows before this start are ignored
        self._good_run: dict[tuple[str, str], int] = {}
        self._scatter: dict[str, tuple[float, int]] = {}
        self._cusum: dict[tuple[str, str, str], list[float]] = {}  # (zone, node, q) -> [S+, S-, last window]
        self._lookback = 2 * self.cfg.min_windows + 2
        self._ranges: dict[str, tuple[float, float]] = {}
        self._act: dict[tuple[str, str, str], deque[tuple[float, NodeWindow]]] = {}

    def offset(self, zone: str, node: str, quantity: str) -> float:
        """The node's current offset: learned here, else given at start, else 0."""
        got = self.offsets.get((zone, node, quantity))
        return got if got is not None else self.base_offsets.get(node, {}).get(quantity, 0.0)

    def offsets_for(self, zone: str, quantity: str, nodes: Iterable[str]) -> dict[str, float]:
        return {n: self.offset(zone, n, quantity) for n in nodes}

    def release_held(self, node: str) -> None:
        """The node was released elsewhere (the repair engine; the node says so): it votes
        from now on, and a later quarantine counts its agreeing windows afresh."""
        self.quarantined.discard(node)
        for k in [k for k in self._good_run if k[0] == node]:
            del self._good_run[k]

    # -- sensor quantities ------------------------------------------------------------

    def observe(self, verdict: Verdict, windows: Mapping[str, NodeWindow],
                security: Mapping[str, Mapping[str, int]] | None = None) -> list[Finding]:
        """Findings for every node of the zone (present now or seen in the history).
        `security`: node -> {event kind: count} reported by the security layer this window."""
        cfg = self.cfg
        zone, q, ws = verdict.zone, verdict.quantity, verdict.window_start
        key = (zone, q)
        hist = self._hist.setdefault(key, deque(maxlen=cfg.history))
        qinfo = QUANTITIES.get(q, {})
        acc_default = qinfo.get("accuracy", 1.0)
        allow = self.allowance.get(q, 0.0)
        win = _Win(ws, verdict.value if verdict.status != NO_QUORUM else None,
                   {n: w.value for n, w in windows.items()}, {n: w.spread for n, w in windows.items()},
                   {n: (w.accuracy if w.accuracy is not None else acc_default) + allow for n, w in windows.items()},
                   frozenset(verdict.truechimers), {n: w.last_time for n, w in windows.items()})
        win.loo = _leave_one_out(win.values)
        win.noises = {n: (w.spread if w.noise is None else w.noise) for n, w in windows.items()}
        win.counts = {n: w.count for n, w in windows.items()}
        win.node_time = {n: w.last_node_time for n, w in windows.items() if w.last_node_time is not None}
        hist.append(win)
        seen: set[str] = set()
        for w in hist:
            seen.update(w.values)
        security = security or {}
        # Neighbour statistics once per zone and window, not once per node.
        self._scatter = self._scatters(hist)
        self._ranges = self._stuck_ranges(hist)
        out = []
        for node in sorted(seen):
            f = self._classify(zone, q, node, hist, verdict, security.get(node, {}))
            out.append(self._track_release(f))
        return out

    def _finding(self, verdict: Verdict, node: str, fault: str, kind: str, evidence: dict[str, Any],
                 offset: float | None = None, reason: str = "") -> Finding:
        actionable = verdict.actionable
        return Finding(node, verdict.zone, verdict.quantity, verdict.window_start, fault, fault in ALARM_CLASSES,
                       actionable, Action(kind, node, verdict.quantity, offset, reason), evidence)

    def _track_release(self, f: Finding) -> Finding:
        """Release a quarantined node once every quantity it reports has agreed with its
        zone for `release_after` windows in a row (then it votes again)."""
        if f.node not in self.quarantined:
            return f
        key = (f.node, f.quantity)
        if f.fault in ("ok", "microclimate"):
            self._good_run[key] = self._good_run.get(key, 0) + 1
        elif f.fault != "offline":
            self._good_run[key] = 0
        runs = [r for (n, _q), r in self._good_run.items() if n == f.node]
        run = min(runs)
        if run >= self.cfg.release_after and f.actionable and f.fault in ("ok", "microclimate"):
            self.quarantined.discard(f.node)
            for k in [k for k in self._good_run if k[0] == f.node]:
                del self._good_run[k]
            ev = dict(f.evidence, agreeing_windows=run)
            return Finding(f.node, f.zone, f.quantity, f.window_start, f.fault, False, f.actionable,
                           Action("release", f.node, f.quantity, None, "agrees with the zone again"), ev)
        return f

    def _classify(self, zone: str, q: str, node: str, hist: deque[_Win], verdict: Verdict,
                  sec: Mapping[str, int]) -> Finding:
        cfg = self.cfg
        now = hist[-1]
        if node not in now.values:
            last = max((w.start for w in hist if node in w.values), default=None)
            return self._finding(verdict, node, "offline", "none", {"last_window": last},
                                 reason="omission: excluded from the vote, not a fault")
        bad = {k: int(v) for k, v in sec.items() if v}
        if bad:
            return self._finding(verdict, node, "spoofing", "quarantine", {"security_events": bad},
                                 reason="security layer reported MAC/counter failures")
        v = now.values[node]
        lo, hi = QUANTITIES[q]["range"] if q in QUANTITIES else (-math.inf, math.inf)
        if not lo <= v <= hi:
            return self._finding(verdict, node, "spoofing", "quarantine",
                                 {"value": v, "range_low": lo, "range_high": hi},
                                 reason="physically impossible value for the sensor")
        if verdict.status == NO_QUORUM or now.zone_value is None:
            return self._finding(verdict, node, "no_quorum", "none", {"reason": verdict.reason})

        off = self.offset(zone, node, q)
        width = now.widths[node]
        # The node's series over the windows where the zone had a value.
        series = []
        back_from = -math.inf  # the first window after the node's last omission
        for w in reversed(hist):  # only the recent windows: the CUSUM itself is kept incrementally
            if node in w.values and w.zone_value is not None:
                series.append((w.start, w.values[node] - off - w.zone_value, w.values[node], w.zone_value,
                               w.spreads[node], w.last_time[node]))
                if len(series) >= self._lookback:
                    break
            elif w.zone_value is not None and back_from == -math.inf:
                back_from = series[-1][0]
        series.reverse()
        e_now = series[-1][1]
        # A quarantined node takes no part in the vote: judge it by its residual alone.
        outlier = abs(e_now) > width or node in verdict.falsetickers
        prev_outlier = len(series) >= 2 and (abs(series[-2][1]) > width)

        if outlier and prev_outlier and len(series) >= 2:
            # A jump that stays: physically impossible if it happened faster than the air can.
            jump_at = len(series) - 2
            while jump_at > 0 and abs(series[jump_at - 1][1]) > width:
                jump_at -= 1
            if jump_at > 0:
                a, b = series[jump_at - 1], series[jump_at]
                dt = max(self._elapsed(node, hist, a[0], b[0]), 1e-9)
                slew = abs(b[2] - a[2]) / dt
                max_slew = QUANTITIES.get(q, {}).get("max_slew", math.inf)
                if slew > max_slew:
                    return self._finding(verdict, node, "spoofing", "quarantine",
                                         {"slew_per_s": slew, "max_slew_per_s": max_slew, "jump": b[2] - a[2],
                                          "windows_since": len(series) - jump_at},
                                         reason="physically impossible sustained slew")
        # Neighbours come before the spike test: a noisy node has many lone outliers.
        stuck = self._stuck(node, hist, q)
        if stuck is not None:
            return self._finding(verdict, node, "stuck", "quarantine", stuck,
                                 reason="no variance while the neighbours vary")
        noise = self._noise(node, hist, width)
        if noise is not None:
            return self._finding(verdict, node, "noise", "quarantine", noise,
                                 reason="variance well above the neighbours'")

        # Two-sided CUSUM on the residual since the last learned offset. Residuals are
        # clipped at the interval half-width so one spike cannot raise a drift alarm.
        start = self._cusum_from.get((zone, node, q), -math.inf)
        res = [s for s in series if s[0] >= start]
        k, h = cfg.cusum_k * width, cfg.cusum_h * width
        state = self._cusum.setdefault((zone, node, q), [0.0, 0.0, -math.inf])
        sp, sn = state[0], state[1]
        alarm_before = sp > h or sn > h  # the statistic before this window
        if state[2] < now.start:
            e = min(max(e_now, -width), width)
            sp = max(0.0, sp + e - k)
            sn = max(0.0, sn - e - k)
            state[:] = [sp, sn, now.start]
        # CUSUM decays slowly once the shift is gone: a node agreeing again (recent
        # residuals within the slack) is ok while the statistic runs down.
        back = len(res) >= 3 and abs(_median_of([s[1] for s in res[-3:]])) <= k
        alarm = (sp > h or sn > h) and not back
        if outlier and not prev_outlier and not alarm_before:
            return self._finding(verdict, node, "spike", "none",
                                 {"residual": e_now, "width": width, "falseticker": node in verdict.falsetickers},
                                 reason="single outlier: suppressed, never repaired")
        ev: dict[str, Any] = {"residual": e_now, "cusum_pos": sp, "cusum_neg": sn, "threshold": h, "offset": off}
        if not alarm and not outlier:
            return self._finding(verdict, node, "ok", "none", ev)
        # Lone outliers (spikes) would tilt the fit: leave them out.
        # Only the windows since the node's last omission (offline, or in its own failsafe):
        # while it was away its air may have changed (failsafe actuators), and a line
        # through both sides of the gap is no trend of its sensor.
        tail = [s for i, s in enumerate(res) if not _lone(res, i, width) and s[0] >= back_from]
        tail = tail[-cfg.min_windows * 2:]
        if len(tail) < cfg.min_windows:
            return self._finding(verdict, node, "suspect", "none", dict(ev, windows=len(tail)),
                                 reason="offset building up; too few windows to classify yet")
        xs = [s[0] for s in tail]
        es = [s[1] for s in tail]
        slope, intercept, resid_std, slope_se = _fit(xs, es)
        trend = abs(slope) * (xs[-1] - xs[0])
        ev.update(slope_per_s=slope, trend=trend, residual_std=resid_std, windows=len(tail))
        # A sensor error the node may be blamed for: beyond what the sensor is rated to (a
        # healthy BME280 may read off by its accuracy; its site's air may differ by the
        # allowance on top, and the consensus cannot tell that from its sensor).
        rated = width - self.allowance.get(q, 0.0)
        if trend > cfg.trend_fraction * width and abs(slope) > cfg.trend_sigmas * slope_se:
            fitted = slope * xs[-1] + intercept
            if abs(fitted) <= abs(slope * xs[0] + intercept):
                # Shrinking: the node is coming back to its zone (its air recovering after
                # a failsafe, its control catching up). What it settles at is judged then.
                return self._finding(verdict, node, "suspect", "none", dict(ev, kind="shrinking", level=fitted),
                                     reason="offset shrinking back toward the zone: not a sensor drift")
            # Judged on what was measured (the last windows), not on the line's extrapolation.
            recent = _median_of(es[-3:])
            if abs(recent) <= rated:
                return self._finding(verdict, node, "suspect", "none", dict(ev, kind="trend", level=recent),
                                     reason="offset growing, still within the sensor's rated accuracy")
            return self._finding(verdict, node, "drift", "recalibrate", dict(ev, kind="trend"), fitted,
                                 reason="offset growing (CUSUM alarm and a trend)")
        level = _median_of(es)
        if resid_std < cfg.stable_fraction * width and q != "p":
            corr = _corr(_diff([s[2] for s in tail]), _diff([s[3] for s in tail]))
            p_res = self._pressure_residual(zone, node, [s[0] for s in tail])
            ev.update(level=level, correlation=corr, pressure_residual=p_res)
            p_width = QUANTITIES["p"]["accuracy"] + self.allowance.get("p", 0.0)
            if corr is not None and corr >= cfg.min_correlation and p_res is not None and abs(p_res) <= p_width:
                self.offsets[(zone, node, q)] = off + level
                self._cusum_from[(zone, node, q)] = now.start + 1e-9
                self._cusum[(zone, node, q)] = [0.0, 0.0, now.start]
                return self._finding(verdict, node, "microclimate", "none", dict(ev, learned_offset=off + level),
                                     reason="stable offset that tracks the zone with pressure agreeing: learned")
            if len(tail) < cfg.min_windows * 2 and not outlier:
                return self._finding(verdict, node, "suspect", "none", ev,
                                     reason="stable offset; waiting for more windows before calling it a fault")
        if abs(level) <= rated and not outlier:
            ev.update(level=level)
            return self._finding(verdict, node, "suspect", "none", ev,
                                 reason="stable offset within the sensor's rated accuracy: not a fault on its own")
        return self._finding(verdict, node, "drift", "recalibrate", dict(ev, kind="step", level=level),
                             level, reason="stable offset not explained by a microclimate")

    @staticmethod
    def _elapsed(node: str, hist: deque[_Win], start_a: float, start_b: float) -> float:
        """Seconds between the node's last readings in two windows, on the node's own clock
        when both carry it (a virtual node's readings arrive 60 times faster than its air
        changes; a real node's in bursts), else on the receive clock."""
        wa = next(w for w in hist if w.start == start_a)
        wb = next(w for w in hist if w.start == start_b)
        ta, tb = wa.node_time.get(node), wb.node_time.get(node)
        if ta is not None and tb is not None and tb > ta:
            return tb - ta
        return wb.last_time[node] - wa.last_time[node]

    def _stuck_ranges(self, hist: deque[_Win]) -> dict[str, tuple[float, float]]:
        """node -> (range of its values, largest in-window spread) over the last
        stuck_windows windows, for the nodes present in all of them."""
        wins = list(hist)[-self.cfg.stuck_windows:]
        if len(wins) < self.cfg.stuck_windows:
            return {}
        out = {}
        for n in wins[-1].values:
            if all(n in w.values for w in wins):
                vals = [w.values[n] for w in wins]
                out[n] = (max(vals) - min(vals), max(w.spreads[n] for w in wins))
        return out

    def _stuck(self, node: str, hist: deque[_Win], q: str) -> dict[str, Any] | None:
        mine = self._ranges.get(node)
        others = [r for n, (r, _sp) in self._ranges.items() if n != node]
        if mine is None or not others:
            return None
        res = QUANTITIES.get(q, {}).get("resolution", 1e-6)
        # The LOWER median of the neighbours' ranges: with two neighbours a plain median is
        # their mean, and one drifting neighbour alone made a flat but live node "stuck".
        neigh = _lower_median(others)
        # Stuck means repeating one value: no reading in any window differs (spread within
        # float rounding). A live sensor in still air keeps flickering by a step or so
        # (measured: the virtual nodes' pressure std 0.004-0.009 hPa in a window, under
        # the 0.01 hPa step), and its window medians may well stay within one step.
        if mine[0] <= res and mine[1] <= STILL_SPREAD * res and neigh > 10 * res:
            return {"range": mine[0], "neighbour_range": neigh, "windows": self.cfg.stuck_windows}
        return None

    def _scatters(self, hist: deque[_Win]) -> dict[str, tuple[float, int]]:
        """node -> (scatter, windows): how much its readings scatter, as a Gaussian std.

        Windows of several readings (a node reporting every second): the median over the
        windows of the readings' scatter around each window's own trend. Sensor noise is
        plain there, reading to reading, while the window medians mostly carry the air,
        the node's control and its calibration steps, which are no sensor noise.

        Windows of one or two readings: the node's residual to the median of the OTHER
        nodes, window to window, as a robust spread of its SECOND differences (median
        absolute value scaled to a Gaussian std: white noise of std s gives second
        differences of std s*sqrt(6)). Second, not first: a drifting node's residual
        ramps by the same step every window, so its first differences are that step (a
        large "scatter" with no noise in it), its second differences zero but at the
        ramp's two corners, which the median ignores; one spike moves three of them."""
        cfg = self.cfg
        wins = [w for w in hist if w.zone_value is not None][-cfg.noise_windows:]
        series: dict[str, list[float]] = {}
        inside: dict[str, list[float]] = {}
        for w in wins:
            for n, e in w.loo.items():
                series.setdefault(n, []).append(e)
                if w.counts[n] >= NOISE_MIN_READINGS:
                    inside.setdefault(n, []).append(w.noises[n])
        out = {}
        for n, es in series.items():
            if len(es) < cfg.min_windows:
                continue
            mine = inside.get(n, [])
            if len(mine) >= cfg.min_windows:
                out[n] = (_median_of(mine), len(mine))
            else:
                out[n] = (_median_of([abs(x) for x in _diff(_diff(es))]) * 1.4826 / math.sqrt(6), len(es))
        return out

    def _noise(self, node: str, hist: deque[_Win], width: float) -> dict[str, Any] | None:
        cfg = self.cfg
        got = self._scatter.get(node)
        others = [sc for n, (sc, _k) in self._scatter.items() if n != node]
        if got is None or not others:
            return None
        mine, windows = got
        neigh = max(_median_of(others), 0.02 * width)
        ratio = mine / neigh
        # Scatter well under the sensor's accuracy is not worth a quarantine.
        if ratio >= cfg.noise_ratio and mine >= cfg.noise_floor * width:
            return {"std": mine, "neighbour_std": neigh, "ratio": ratio, "windows": windows}
        return None

    def _pressure_residual(self, zone: str, node: str, starts: list[float]) -> float | None:
        hist = self._hist.get((zone, "p"))
        if not hist:
            return None
        want = set(starts)
        res = [w.values[node] - self.offset(zone, node, "p") - w.zone_value for w in hist
               if w.start in want and node in w.values and w.zone_value is not None]
        if len(res) < max(2, len(starts) // 2):
            return None
        return _median_of(res)

    # -- actuators --------------------------------------------------------------------

    def observe_actuator(self, zone: str, quantity: str, window_start: float, windows: Mapping[str, NodeWindow],
                         humidity: Mapping[str, float] | None = None, *, actionable: bool = True) -> list[Finding]:
        """Findings for reported actuator outputs (`value`) against their setpoints.
        `humidity`: node -> its raw humidity this window, to check that misting has an effect."""
        cfg = self.cfg
        out = []
        dummy = Verdict(zone, quantity, window_start, "OK", None, None, None, False, [], [], 3, 0, None)
        for node, nw in sorted(windows.items()):
            key = (zone, node, quantity)
            h = self._act.setdefault(key, deque(maxlen=cfg.history))
            h.append((window_start, nw))
            hum = self._act.setdefault((zone, node, "_h"), deque(maxlen=cfg.history))
            if humidity and node in humidity:
                hum.append((window_start, NodeWindow(humidity[node], 0.0, 1, 0.0, window_start, window_start)))

            def fin(fault: str, kind: str, ev: dict[str, Any], reason: str) -> Finding:
                return Finding(node, zone, quantity, window_start, fault, fault in ALARM_CLASSES, actionable,
                               Action(kind, node, quantity, None, reason), ev)

            last = list(h)[-cfg.mismatch_windows:]
            diffs = [abs(w.value - w.setpoint) for _, w in last if w.setpoint is not None]
            if len(diffs) == cfg.mismatch_windows and min(diffs) > cfg.actuator_tolerance:
                out.append(fin("actuator_mismatch", "push_config",
                               {"reported": nw.value, "setpoint": nw.setpoint, "windows": len(diffs)},
                               "reported output differs from the setpoint"))
                continue
            if quantity == "mist":
                run = list(h)[-cfg.effect_windows:]
                hs = {s: w.value for s, w in hum}
                if (len(run) == cfg.effect_windows and all(w.value >= cfg.mist_on for _, w in run)
                        and all(s in hs for s, _ in run)):
                    rise = hs[run[-1][0]] - hs[run[0][0]]
                    if rise < cfg.mist_min_rise:
                        out.append(fin("actuator_mismatch", "quarantine",
                                       {"mist": nw.value, "humidity_rise": rise, "windows": len(run)},
                                       "misting without the expected humidity rise"))
                        continue
            out.append(fin("ok", "none", {"reported": nw.value, "setpoint": nw.setpoint}, ""))
        return out


# -- small statistics (no numpy on purpose: the host toolchain stays light) ---------------


def _median_of(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s)
    return s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2.0


def _lower_median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[(len(s) - 1) // 2]


def _leave_one_out(values: Mapping[str, float]) -> dict[str, float]:
    """node -> its value minus the median of the other nodes' values, in O(m log m)."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    m = len(items)
    if m < 2:
        return {}
    s = [v for _, v in items]
    k = m - 1  # size of the remaining list

    def at(j: int, r: int) -> float:  # element j of s without the element of rank r
        return s[j] if j < r else s[j + 1]

    out = {}
    for r, (n, v) in enumerate(items):
        med = at(k // 2, r) if k % 2 else (at(k // 2 - 1, r) + at(k // 2, r)) / 2.0
        out[n] = v - med
    return out


def _lone(series: list[tuple], i: int, width: float) -> bool:
    if abs(series[i][1]) <= width:
        return False
    before = i == 0 or abs(series[i - 1][1]) <= width
    after = i == len(series) - 1 or abs(series[i + 1][1]) <= width
    return before and after


def _diff(xs: list[float]) -> list[float]:
    return [b - a for a, b in zip(xs, xs[1:])]


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _rms(xs: list[float]) -> float:
    return math.sqrt(sum(x * x for x in xs) / len(xs)) if xs else 0.0


def _corr(a: list[float], b: list[float]) -> float | None:
    """Uncentred correlation (cosine) of two difference series: a node that moves with the
    zone scores near 1 even when the zone moves as a steady ramp (whose differences are
    nearly constant, so a centred Pearson coefficient would only see the noise)."""
    if len(a) < 3 or len(a) != len(b):
        return None
    va = sum(x * x for x in a)
    vb = sum(y * y for y in b)
    if va <= 0 or vb <= 0:
        return None
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(va * vb)


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float, float]:
    """Least-squares line: (slope, intercept, std of the residuals around it, slope's standard error)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    res = [y - (slope * x + intercept) for x, y in zip(xs, ys)]
    if n <= 2 or sxx == 0:
        return slope, intercept, 0.0, math.inf
    s2 = sum(r * r for r in res) / (n - 2)
    return slope, intercept, _std(res), math.sqrt(s2 / sxx)
