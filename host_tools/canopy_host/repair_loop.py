"""The continuous repair loop behind `canopy monitor --repair` and `canopy demo`.

While the monitor keeps reading every node, the loop periodically judges the zones
from the store (`canopy consensus` over the readings received so far), decides which
nodes are worth repairing (the rules below, each a named constant), and repairs ONE
node at a time through the journaled `repair.RepairEngine`: that node's monitor reader
lends it its port (`monitor.PortReader.lend`), the other readers keep running, and the
reader takes the port back as soon as the repair ends. Every decision lands in the
journal's audit log (`repair_audit`), every repair step in `repair_jobs`.

Decision rules (docs/repair.md "The continuous loop"):

* ACTIONABLE: only a finding the consensus itself marks `actionable` (never from a
  NO_QUORUM verdict) whose recommended action is in `REPAIR_ACTIONS`: a finding whose
  action is `none` (ok, suspect, microclimate, spike, offline, no_quorum) never
  starts a repair, whatever its class.
* TRIGGER_QUANTITY: temperature, the quantity a node controls on, starts a repair; the
  same window's recalibrations of the other quantities come along (a BME280 compensates
  pressure and humidity with its temperature).
* MEASURABLY WRONG: the node must also be voted out of its zone's temperature verdict
  or be at least `T_ACCURACY_C` (the BME280's absolute accuracy) from its neighbours
  (`zone_error`: its median in the window minus the median of theirs) AND from each of
  them (`nearest_gap`: in a zone of three, one drifting node drags the other two's
  mean toward itself, and a healthy node close to its healthy neighbour is not the odd
  one out). A class alone
  (a noise or stuck score) on a node that agrees with its zone within the allowance
  is not worth taking its actuators away.
* ACTION: quarantine (actuators to failsafe, out of the vote) plus a temperature
  recalibration by the error MEASURED in the detection window (`zone_error`; the
  fault tracker's own offset averages in the windows of a still-growing drift), and
  the other quantities' recommended recalibrations.
* RELEASE: after `RELEASE_AFTER` complete windows in a row, after the repair, in which
  the zone has a temperature quorum and the node is a truechimer (hysteresis: one
  agreeing window is not enough, a disagreeing one restarts the count).
* CONVERGE: a node's own control loop moves its site's air against its wrong reading,
  so its zone sees only part of the sensor error (the loop's "gain" k < 1). After the
  release the loop keeps measuring the node's residual against its neighbours, per
  window, until it has settled (`settled_residual`: the limit of its first-order
  approach, extrapolated from three windows) and trims the calibration by residual / k.
  k is 1 (plain fixed-point iteration: each step leaves (1 - k) of the error, no
  overshoot) until two in-service residuals around a big enough correction give a
  secant estimate (k = (r_prev - r) / correction, clamped to `GAIN_RANGE`). Trims
  happen without a quarantine: failsafe actuators change the site's air, which is
  exactly what would bias the measurement. REPAIRED once the error left, settled
  residual / k, is at most `DONE_C`, or the last step flipped the residual's sign
  within `NOISE_C`; ESCALATED to a human (audit `escalated`, no more steps) when a
  residual above `NOISE_C` does not shrink geometrically (> `CONVERGENCE_RATIO` x the
  previous in-service one), or after `MAX_STEPS` calibration steps still above it.
  Every step is journaled and audited (`trim`, `converged`, `escalated`).
* A node that was repaired or escalated and is wrong again later in the run is only
  reported in the audit log (`again_wrong`) for `canopy repair`.

    loop = RepairLoop(db, shadow_path, lend=readers_lender(readers), client_for=client_for,
                      t0=time.time(), timescale=60.0, zone_of=lambda: {"n01": "A", ...})
    loop.start(every_s=2.0)        # or loop.check() from your own loop
    ...
    loop.stop()
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

from .errors import CanopyError

WINDOW_S = 60.0  # consensus seconds per window (simulated seconds for a virtual node)
CHECK_S = 2.0  # wall seconds between checks
TRIGGER_QUANTITY = "t"
REPAIR_ACTIONS = frozenset({"recalibrate", "quarantine"})
T_ACCURACY_C = 1.0  # °C: the BME280's absolute accuracy; smaller errors are not corrected
RELEASE_AFTER = 3  # complete agreeing windows after the repair before the release
REPAIR_DEADLINE_S = 10.0  # wall seconds one repair may take (an offline node waits in the journal)
LEND_TIMEOUT_S = 5.0  # how long the reader may take to let go of the port
HISTORY_WINDOWS = 60  # windows judged per check: the fault tracker's own memory (FaultConfig.history),
#                       so a monitor running for days does not re-judge its whole store every check
UNITS = {"t": "°C", "p": "hPa", "h": "%RH"}
SETTLE_AFTER_RELEASE = 1  # whole windows skipped after a release (the failsafe actuators' integrators
#                           restart: not yet the smooth approach `settled_residual` extrapolates)
STILL_C = 0.05  # °C per window: a residual moving less than this has settled
GEOMETRIC_MAX = 0.8  # a window-to-window ratio above this is too slow to extrapolate: wait
MAX_WAIT_WINDOWS = 8  # an unsettled (oscillating) residual is averaged after this many windows
DONE_C = 0.15  # °C: a sensor error left (settled residual / gain) this small is repaired; well under
#                the ±0.5 °C a node should agree with its zone by, because that estimate is rough: the
#                zone sees less of a small error than the secant gain (an average over the step) says
NOISE_C = 0.25  # °C: a settled residual this small cannot show whether a step helped (window noise,
#                 the node's own microclimate); within it a sign change ends the course as repaired
SETTLE_AFTER_TRIM = 1  # whole windows skipped after a trim (the air's response starts S-shaped)
GAIN_MIN_STEP_C = 0.5  # °C: a smaller correction is too close to the noise to estimate the gain from
MAX_STEPS = 5  # calibration steps per node per run (the first repair included)
CONVERGENCE_RATIO = 0.7  # each measured residual must be at most this times the previous one
GAIN_RANGE = (0.5, 1.0)  # the share of a sensor error the zone sees while the node controls: at most
#                         all of it; the floor bounds an overshoot from a noisy estimate to 2x


def _clock_text(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# -- consensus over the store ------------------------------------------------------------


def load_readings(db: str | Path, *, t0: float, timescale: float, zone_of: Mapping[str, str],
                  since: float | None = None) -> list[Any]:
    """Consensus inputs from the store: healthy readings, timed in consensus seconds
    ((rx_time - t0) * timescale, so a virtual node's windows are in simulated time:
    the fault classes' slew limits are physical)."""
    from .consensus import Reading
    from .consensus_cmd import STORE_SCALE
    from .store import iter_frames

    items: list[Any] = []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    con.row_factory = sqlite3.Row
    try:
        for row in iter_frames(con, kind="reading", since=since):
            # Failsafe ticks repeat old values (zeros before the first reading) and a
            # missing sensor has none: neither is a measurement to vote with. A
            # quarantined node's readings (failsafe bit 2 only) are: release needs them.
            if (row["failsafe"] or 0) & 1 or (row["faults"] or 0) & 1 or row["t"] is None:
                continue
            zone = zone_of.get(row["node"])
            if not zone:
                continue  # a node of no known zone has no neighbours to be judged against
            ct = (row["rx_time"] - t0) * timescale
            for q, scale in STORE_SCALE.items():
                if row[q] is not None:
                    items.append(Reading(row["node"], zone, ct, q, row[q] / scale))
    finally:
        con.close()
    return items


def zone_verdicts(items: list[Any], window: float = WINDOW_S) -> list[dict[str, Any]]:
    """The sensor quantities' verdicts (JSON form, with per-node `faults`), window order."""
    from .consensus_cmd import parse_allowances, verdicts

    return [v for v in verdicts(items, window=window, allowance=parse_allowances([]), max_faulty=None,
                                offsets={}, quarantined=[]) if v["quantity"] in ("t", "h", "p")]


# -- the decision rules (pure: no ports, no store) ---------------------------------------


def is_actionable(verdict: Mapping[str, Any], finding: Mapping[str, Any]) -> bool:
    """ACTIONABLE: the consensus' own flag, never on NO_QUORUM, and an action to take."""
    return (verdict.get("status") == "OK" and bool(finding.get("actionable"))
            and (finding.get("action") or {}).get("kind") in REPAIR_ACTIONS)


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def zone_error(node: str, verdict: Mapping[str, Any], items: Iterable[Any], window: float) -> float | None:
    """The node's median reading in the verdict's window minus its NEIGHBOURS' value
    there (the median of the other nodes' medians). Leave-one-out on purpose: the
    verdict's own value includes the node, and once the node reads within its
    neighbours' spread (a small error left, 4 nodes: the median of the middle two) it
    pulls that value toward itself and hides part of its own error."""
    if verdict.get("status") != "OK" or verdict.get("value") is None:
        return None  # no quorum: nothing to measure against
    per = _window_medians(verdict, items, window)
    mine = per.pop(node, None)
    if mine is None:
        return None
    # Without the neighbours' readings at hand, the consensus' own value is all there is.
    ref = _median(list(per.values())) if per else float(verdict["value"])
    return mine - ref


def nearest_gap(node: str, verdict: Mapping[str, Any], items: Iterable[Any], window: float) -> float | None:
    """How far the node's median in the window is from the CLOSEST other node's median
    (None without neighbours' readings). In a zone of three, one drifting neighbour
    drags the leave-one-out value (the mean of the other two) by half its error, so a
    healthy node can look a degree off its "neighbours" while it agrees with one of
    them; the odd one out is far from every other node."""
    per = _window_medians(verdict, items, window)
    mine = per.pop(node, None)
    if mine is None or not per:
        return None
    return min(abs(mine - v) for v in per.values())


def _window_medians(verdict: Mapping[str, Any], items: Iterable[Any], window: float) -> dict[str, float]:
    """node -> its median reading of the verdict's zone and quantity in the verdict's window."""
    ws = float(verdict["window_start"])
    per: dict[str, list[float]] = {}
    for r in items:
        if (getattr(r, "zone", verdict["zone"]) == verdict["zone"] and r.quantity == verdict["quantity"]
                and ws <= r.time < ws + window):
            per.setdefault(r.node, []).append(r.value)
    return {n: _median(v) for n, v in per.items()}


@dataclass
class Decision:
    node: str
    kind: str  # "repair" | "release"
    window_start: float
    findings: list[dict[str, Any]]  # for repair.plan
    classes: list[str]
    what: list[str]  # human words for the actions
    why: str
    t_error: float | None = None


def decide_repairs(latest: list[dict[str, Any]], items: list[Any], nodes: Iterable[str],
                   window: float = WINDOW_S) -> list[Decision]:
    """The repairs the rules call for in the latest complete window (see the module doc)."""
    out = []
    for node in sorted(nodes):
        alarms = [(v, f) for v in latest for n, f in v.get("faults", {}).items()
                  if n == node and is_actionable(v, f)]
        if not any(v["quantity"] == TRIGGER_QUANTITY for v, _ in alarms):
            continue
        tv = next((v for v in latest if v["quantity"] == TRIGGER_QUANTITY
                   and node in v.get("faults", {})), None)
        if tv is None:
            continue
        voted_out = node in tv.get("falsetickers", [])
        error = zone_error(node, tv, items, window)
        gap = nearest_gap(node, tv, items, window)
        off = error is not None and abs(error) >= T_ACCURACY_C and (gap is None or gap >= T_ACCURACY_C)
        if not (voted_out or off):
            continue  # agrees with its zone within the allowance: a score alone is not enough
        findings: list[dict[str, Any]] = [{"node": node, "actionable": True, "action": {"kind": "quarantine"}}]
        what = ["quarantined"]
        # Temperature is corrected by the error measured in this window: the tracker's
        # offset averages in older windows (a drift still growing when it started).
        recal = [(v, f) for v, f in alarms if f["action"]["kind"] == "recalibrate"
                 and f["action"].get("offset") is not None and v["quantity"] != TRIGGER_QUANTITY]
        if off and error is not None:
            recal.insert(0, (tv, {"action": {"kind": "recalibrate", "offset": error}}))
        elif error is not None and any(v["quantity"] == TRIGGER_QUANTITY and f["action"]["kind"] == "recalibrate"
                                       for v, f in alarms):
            recal.insert(0, (tv, {"action": {"kind": "recalibrate", "offset": error}}))
        for v, f in recal:
            q, offset = v["quantity"], float(f["action"]["offset"])
            findings.append({"node": node, "actionable": True,
                             "action": {"kind": "recalibrate", "quantity": q, "offset": offset}})
            what.append(f"{q} recalibrated by {-offset:+.2f} {UNITS.get(q, '')}".rstrip())
        classes = sorted({f"{v['quantity']}:{f['class']}" for v, f in alarms})
        why = "voted out of zone " + str(tv["zone"]) if voted_out else f"{error:+.2f} °C from zone {tv['zone']}"
        out.append(Decision(node, "repair", float(tv["window_start"]), findings, classes, what, why, error))
    return out


def node_residuals(node: str, zone: str, complete: list[dict[str, Any]], items: list[Any], since: float,
                   window: float = WINDOW_S) -> list[tuple[float, float]]:
    """(window_start, node median - neighbours' value) per complete temperature window of the
    zone from `since` on, in order; windows without a quorum or without the node's
    readings are left out (nothing to measure against)."""
    out = []
    for v in sorted((v for v in complete if v["quantity"] == TRIGGER_QUANTITY and v["zone"] == zone
                     and v["window_start"] >= since), key=lambda v: v["window_start"]):
        e = zone_error(node, v, items, window)
        if e is not None:
            out.append((float(v["window_start"]), e))
    return out


def settled_residual(values: list[float]) -> float | None:
    """The residual a node is settling to, from its per-window residuals since the last
    change (oldest first), or None while it cannot be told yet.

    The site's air follows a calibration change (through the node's control loop and
    the canopy's thermal time constant) roughly like a first-order system, so the
    last three windows form a geometric sequence; its limit (Aitken's extrapolation:
    r3 + d2 * q / (1 - q), q = d2 / d1) is the steady residual without waiting several
    time constants. A residual that no longer moves (< `STILL_C` per window) is taken
    as it is; one that oscillates is averaged once `MAX_WAIT_WINDOWS` have passed."""
    if len(values) >= MAX_WAIT_WINDOWS:
        return sum(values[-2:]) / 2
    if len(values) < 3:
        return None
    r1, r2, r3 = values[-3:]
    d1, d2 = r2 - r1, r3 - r2
    if d1 and 0 < d2 / d1 <= GEOMETRIC_MAX:
        q = d2 / d1
        return r3 + d2 * q / (1 - q)
    if abs(d2) <= STILL_C:
        return (r2 + r3) / 2
    return None


def next_trim(residual: float, history: list[tuple[float, float]]) -> tuple[str, float, float]:
    """CONVERGE: what to do with a node's newly settled residual.

    `history` holds (settled residual, correction applied after it) of the node's
    earlier steps, oldest first; the first entry is its detection, measured while its
    sensor may still have been drifting and its control loop saturated, so it never
    enters the gain. The gain is the share of a sensor error the zone sees: 1 (plain
    fixed-point iteration, which cannot overshoot) until two in-service residuals
    around a correction of at least `GAIN_MIN_STEP_C` give a secant estimate, clamped
    to `GAIN_RANGE`. Returns (verdict, correction, gain): "done" (the error left,
    |residual / gain|, at most `DONE_C`; or the last step flipped the residual's sign
    within `NOISE_C`; or the steps are spent with the residual within `NOISE_C`),
    "trim" (apply residual / gain) or "escalate" (a residual above `NOISE_C` did not
    shrink to `CONVERGENCE_RATIO` of the previous in-service one, or the steps are
    spent above it)."""
    lo, hi = GAIN_RANGE
    gain = hi
    service = history[1:] + [(residual, 0.0)]
    for (before, applied), (after, _) in zip(service, service[1:]):
        if abs(applied) >= GAIN_MIN_STEP_C:
            gain = min(max((before - after) / applied, lo), hi)
    correction = residual / gain
    # Judged on the error left, not on what the zone sees of it: the zone sees less of a
    # small error (the node's integrators absorb more of it), so a small residual alone
    # would stop a few tenths short.
    if abs(correction) <= DONE_C:
        return "done", correction, gain
    prev = history[-1][0] if len(history) > 1 else None  # in service: the detection's is another regime
    if prev is not None and residual * prev < 0 and max(abs(residual), abs(prev)) <= NOISE_C:
        return "done", correction, gain  # the last step crossed zero within the noise: bracketed
    if len(history) >= MAX_STEPS:
        return ("done" if abs(residual) <= NOISE_C else "escalate"), correction, gain
    if prev is not None and abs(residual) > max(CONVERGENCE_RATIO * abs(prev), NOISE_C):
        return "escalate", correction, gain
    return "trim", correction, gain


def agreeing_run(node: str, zone: str, complete: list[dict[str, Any]], since: float) -> int:
    """RELEASE hysteresis: windows in a row, up to the latest, from `since` on, where the
    zone had a temperature quorum and the node was a truechimer."""
    run = 0
    for v in sorted((v for v in complete if v["quantity"] == TRIGGER_QUANTITY and v["zone"] == zone
                     and v["window_start"] >= since), key=lambda v: v["window_start"]):
        run = run + 1 if (v["status"] == "OK" and node in v["truechimers"]) else 0
    return run


# -- lending ports ----------------------------------------------------------------------


def readers_lender(readers: Callable[[], Iterable[Any]], timeout: float = LEND_TIMEOUT_S
                   ) -> Callable[[str], ContextManager[None]]:
    """node -> a context manager during which that node's monitor reader has closed its
    port (`PortReader.lend`); the other readers are untouched. A node no reader follows
    needs nothing lent."""

    @contextlib.contextmanager
    def lend(node: str) -> Iterator[None]:
        mine = [r for r in readers() if (r.ps.node or r.ps.spec.node_hint) == node]
        loans = [r.lend(timeout=timeout, why="repair") for r in mine]
        try:
            yield
        finally:
            for loan in loans:
                loan.give_back()

    return lend


# -- the loop -----------------------------------------------------------------------------


@dataclass
class RepairEvent:
    at: float  # consensus seconds since t0
    node: str
    text: str
    ok: bool = True


class RepairLoop:
    """Check, decide, repair one node at a time, release; see the module doc."""

    def __init__(self, db: str | Path, shadow_path: str | Path, *,
                 lend: Callable[[str], ContextManager[None]],
                 client_for: Callable[[str], Any],
                 t0: float, timescale: float = 1.0, window: float = WINDOW_S,
                 zone_of: Callable[[], Mapping[str, str]] | Mapping[str, str] | None = None,
                 say: Callable[[str], None] = lambda text: None,
                 flush: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 deadline_s: float = REPAIR_DEADLINE_S) -> None:
        if not timescale > 0 or not window > 0:
            raise CanopyError("repair loop: timescale and window must be positive")
        self.db = Path(db)
        self.shadow_path = Path(shadow_path)
        self.lend = lend
        self.client_for = client_for  # node -> NodeClient with close(), on that node's port
        self.t0, self.timescale, self.window = t0, timescale, window
        self._zone_of = zone_of
        self.say, self.flush, self.clock = say, flush, clock
        self.deadline_s = deadline_s
        self.repaired: dict[str, float] = {}  # node -> first window after its repair
        self.released: set[str] = set()
        self.reported_again: set[str] = set()
        # CONVERGE state per released node: (residual, correction) per step so far, the
        # window from which the next residual is measured, and the end of its course.
        self.steps: dict[str, list[tuple[float, float]]] = {}
        self.measure_from: dict[str, float] = {}
        self.outcome: dict[str, str] = {}  # node -> "repaired" | "escalated"
        self.events: list[RepairEvent] = []
        self.checks = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- time and zones --

    def now(self) -> float:
        return (self.clock() - self.t0) * self.timescale

    def zone_of(self) -> dict[str, str]:
        z = self._zone_of
        if z is None:  # the store's nodes table (the monitor records each node's zone)
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10.0)
            try:
                return {n: zone for n, zone in con.execute("SELECT node, zone FROM nodes") if zone}
            finally:
                con.close()
        return dict(z() if callable(z) else z)

    # -- one check --

    def check(self) -> list[RepairEvent]:
        """Judge the complete windows so far, repair and release as the rules say."""
        before = len(self.events)
        self.checks += 1
        if self.flush is not None:
            self.flush()
        if not self.db.is_file():
            return []
        now = self.now()
        zones = self.zone_of()
        first = max(0.0, (now // self.window - HISTORY_WINDOWS) * self.window)  # a window boundary
        items = load_readings(self.db, t0=self.t0, timescale=self.timescale, zone_of=zones,
                              since=self.t0 + first / self.timescale)
        complete = [v for v in zone_verdicts(items, self.window) if v["window_start"] + self.window <= now]
        if not complete:
            return []
        last_ws = max(v["window_start"] for v in complete)
        latest = [v for v in complete if v["window_start"] == last_ws]
        for node in sorted(self.repaired):
            if node not in self.released:
                run = agreeing_run(node, zones.get(node, "?"), complete, self.repaired[node])
                if run >= RELEASE_AFTER:
                    self._release(node, zones.get(node, "?"), run)
        for node in sorted(self.measure_from):
            if node not in self.outcome:
                self._converge(node, zones.get(node, "?"), complete, items)
        candidates = {n for v in latest for n in v.get("faults", {})}
        for d in decide_repairs(latest, items, candidates, self.window):
            if d.node in self.repaired and d.node in self.outcome:
                if d.node not in self.reported_again:
                    self.reported_again.add(d.node)
                    self._note(d.node, "again_wrong", {"classes": d.classes, "why": d.why,
                                                       "window_start": d.window_start,
                                                       "hint": f"{self.outcome[d.node]} this run: run `canopy repair`"})
                    # A notice for a human, not a failed repair: ok stays True.
                    self._event(d.node, f"wrong again ({d.why}) after its course ended "
                                        f"({self.outcome[d.node]}): see `canopy audit`, run `canopy repair`", True)
                continue
            if d.node in self.repaired:
                continue  # under repair: its quarantine or its trims decide
            self._repair(d)
        return self.events[before:]

    def _repair(self, d: Decision) -> None:
        self.repaired[d.node] = d.window_start + self.window
        self._note(d.node, "detected", {"classes": d.classes, "why": d.why, "window_start": d.window_start,
                                        "t_error": None if d.t_error is None else round(d.t_error, 3),
                                        "actions": d.what})
        self._event(d.node, f"detected ({', '.join(d.classes)} in the window at {_clock_text(d.window_start)}; "
                            f"{d.why})", True)
        states = self.apply(d.node, d.findings)
        ok = bool(states) and set(states) <= {"VERIFIED"}
        self._event(d.node, f"{', '.join(d.what)} [{', '.join(states) or 'nothing to do'}]", ok)
        t_cal = next((float(f["action"]["offset"]) for f in d.findings if f["action"]["kind"] == "recalibrate"
                      and f["action"].get("quantity") == TRIGGER_QUANTITY), 0.0)
        if d.t_error is not None:
            self.steps[d.node] = [(d.t_error, t_cal)]

    def unfinished(self) -> list[RepairEvent]:
        """One notice per node whose course had not ended (repaired or escalated) when
        asked, e.g. at the end of a session: a summary must not read as "repaired"."""
        out = []
        for node in sorted(self.repaired):
            if node in self.outcome:
                continue
            steps = len(self.steps.get(node, []))
            where = ("still quarantined" if node not in self.released
                     else f"released, {steps} calibration step(s), its residual still being measured")
            out.append(RepairEvent(self.now(), node, f"not repaired yet when the run ended ({where}): "
                                                     "run longer, or see `canopy audit` and `canopy repair`"))
        return out

    def _next_window(self, settle: int) -> float:
        """Start of the first window that begins `settle` whole windows after now."""
        now = self.now()
        return (-(-now // self.window) + settle) * self.window

    def _converge(self, node: str, zone: str, complete: list[dict[str, Any]], items: list[Any]) -> None:
        res = node_residuals(node, zone, complete, items, self.measure_from[node], self.window)
        residual = settled_residual([e for _, e in res])
        if residual is None:
            return  # still settling
        history = self.steps.setdefault(node, [])
        verdict, correction, gain = next_trim(residual, history)
        detail = {"residual": round(residual, 3), "measured": [round(e, 3) for _, e in res],
                  "since_window": self.measure_from[node], "steps": len(history)}
        if verdict == "done":
            self.outcome[node] = "repaired"
            self._note(node, "converged", dict(detail, gain=round(gain, 3), left=round(correction, 3)))
            self._event(node, f"repaired: settles {residual:+.2f} °C from zone {zone} over {len(res)} windows "
                              f"(about {correction:+.2f} °C of sensor error left) after {len(history)} "
                              "calibration step(s)", True)
            return
        if verdict == "escalate":
            self.outcome[node] = "escalated"
            why = (f"still {residual:+.2f} °C from zone {zone} after {len(history)} calibration steps"
                   if len(history) >= MAX_STEPS else
                   f"residual {residual:+.2f} °C did not shrink enough (previous {history[-1][0]:+.2f} °C)")
            self._note(node, "escalated", dict(detail, why=why, hint="needs a human: check or replace the sensor"))
            self._event(node, f"NOT converging ({why}): left for a human, see `canopy audit`", False)
            return
        self._note(node, "trim", dict(detail, gain=round(gain, 3), correction=round(correction, 3)))
        finding = {"node": node, "actionable": True,
                   "action": {"kind": "recalibrate", "quantity": TRIGGER_QUANTITY, "offset": correction}}
        states = self.apply(node, [finding])
        ok = bool(states) and set(states) <= {"VERIFIED"}
        history.append((residual, correction))
        self.measure_from[node] = self._next_window(SETTLE_AFTER_TRIM)
        how = "a fixed-point step" if correction == residual else f"the zone sees {gain:.0%} of an error"
        self._event(node, f"settles {residual:+.2f} °C from zone {zone} while in service: t trimmed by "
                          f"{-correction:+.2f} °C ({how}) [{', '.join(states) or 'nothing to do'}]", ok)
        if not ok:
            self.outcome[node] = "escalated"

    def _release(self, node: str, zone: str, run: int) -> None:
        self._note(node, "agrees", {"zone": zone, "agreeing_windows": run, "since_window": self.repaired[node]})
        states = self.apply(node, [{"node": node, "actionable": True, "action": {"kind": "release"}}])
        ok = bool(states) and set(states) <= {"VERIFIED"}
        self._event(node, f"agrees with zone {zone} again ({run} windows): released "
                          f"[{', '.join(states) or 'nothing to do'}]", ok)
        self.released.add(node)
        if ok:
            # Its own control loop moves its air again: measure it from there (CONVERGE).
            self.measure_from[node] = self._next_window(SETTLE_AFTER_RELEASE)

    def _event(self, node: str, text: str, ok: bool) -> None:
        ev = RepairEvent(self.now(), node, text, ok)
        self.events.append(ev)
        self.say(f"{_clock_text(ev.at)} {node}: {text}")

    def _note(self, node: str, event: str, detail: Mapping[str, Any]) -> None:
        from .repair import Journal

        journal = Journal(self.db)
        try:
            journal.note(node, "loop", event, detail)
        finally:
            journal.close()

    # -- one journaled repair of one node, on its lent port --

    def apply(self, node: str, findings: list[dict[str, Any]]) -> list[str]:
        """Plan from the findings, run the engine; the final state of each job."""
        from .repair import Actual, Journal, NodeOffline, NodeRefused, RepairEngine, plan, status
        from .shadow import Shadow

        data: dict[str, Any] = {"config": {}, "nodes": {}}
        if self.shadow_path.is_file():
            try:
                data = json.loads(self.shadow_path.read_text())
            except (OSError, ValueError) as exc:
                self._event(node, f"repair skipped: cannot read {self.shadow_path}: {exc}", False)
                return ["FAILED"]
        data.setdefault("config", {})
        data.setdefault("nodes", {})
        # A shadow of this node alone: the planner asks every shadow node for its
        # status, and the other nodes' ports stay with the monitor.
        mine = Shadow(dict(data["config"]), {node: dict(data["nodes"].get(node, {}))}, None)
        journal = None
        client = None
        try:
            with self.lend(node):
                client = self.client_for(node)
                actual: dict[str, Actual | None]
                try:
                    actual = {node: status(client, node)}
                except (NodeOffline, NodeRefused):
                    actual = {node: None}
                p = plan(mine, actual, findings)
                journal = Journal(self.db)
                engine = RepairEngine(journal, client, mine)
                jobs = engine.submit(p)
                engine.run(deadline_s=self.deadline_s)
                ids = {j.id for j in jobs}
                states = [j.state for j in journal.jobs() if j.id in ids]
        except CanopyError as exc:  # includes a reader that would not let go
            self.errors += 1
            self._event(node, f"repair failed: {exc}", False)
            try:
                self._note(node, "failed", {"error": str(exc)})
            except Exception:  # the store itself is the problem: the event above says it
                pass
            return ["FAILED"]
        finally:
            if journal is not None:
                journal.close()
            if client is not None:
                client.close()
        data["nodes"][node] = mine.nodes[node]
        self.shadow_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.shadow_path.with_name(self.shadow_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.shadow_path)  # the desired state survives a host crash
        return states

    # -- in the background --

    def start(self, every_s: float | None = None) -> None:
        """Check every `every_s` wall seconds in a thread (the caller's UI stays live
        while a node is being repaired); by default `CHECK_S`, or once per window if
        windows pass faster than that (virtual nodes at speed: each settling step of
        CONVERGE waits for whole windows, so a slower check only adds delay)."""
        if self._thread is not None:
            return
        if every_s is None:
            every_s = min(CHECK_S, self.window / self.timescale)

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.check()
                except Exception as exc:  # a locked or half-written store: try again next time
                    self.errors += 1
                    self.say(f"repair loop: check failed: {exc}")

        self._thread = threading.Thread(target=loop, name="canopy-repair-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = REPAIR_DEADLINE_S + LEND_TIMEOUT_S + 5) -> None:
        """Stop after the check under way (a repair in progress finishes or waits in the journal)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
