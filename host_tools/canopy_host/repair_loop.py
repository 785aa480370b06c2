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
  or be at least `T_ACCURACY_C` (the BME280's absolute accuracy) from the zone's value
  (the median of its readings in the window). A class alone (a noise or stuck score)
  on a node that agrees with its zone within the allowance is not worth taking its
  actuators away.
* ACTION: quarantine (actuators to failsafe, out of the vote) plus, where the
  consensus recommends it, a recalibration by its offset; if it only recommends
  quarantine but the node is measurably off, the measured error is corrected too, so
  the node can agree again.
* RELEASE: after `RELEASE_AFTER` complete windows in a row, after the repair, in which
  the zone has a temperature quorum and the node is a truechimer (hysteresis: one
  agreeing window is not enough, a disagreeing one restarts the count).
* ONCE PER RUN: a node is repaired at most once per loop run: the tracker's offsets
  afterwards mix readings from before and after the recalibration. A node that goes
  wrong again is reported in the audit log (`again_wrong`) for `canopy repair`.

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


def zone_error(node: str, verdict: Mapping[str, Any], items: Iterable[Any], window: float) -> float | None:
    """The node's median reading in the verdict's window minus the zone's value."""
    if verdict.get("status") != "OK" or verdict.get("value") is None:
        return None
    ws = float(verdict["window_start"])
    mine = sorted(r.value for r in items if r.node == node and r.quantity == verdict["quantity"]
                  and ws <= r.time < ws + window)
    if not mine:
        return None
    return mine[len(mine) // 2] - float(verdict["value"])


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
        off = error is not None and abs(error) >= T_ACCURACY_C
        if not (voted_out or off):
            continue  # agrees with its zone within the allowance: a score alone is not enough
        findings: list[dict[str, Any]] = [{"node": node, "actionable": True, "action": {"kind": "quarantine"}}]
        what = ["quarantined"]
        recal = [(v, f) for v, f in alarms if f["action"]["kind"] == "recalibrate"
                 and f["action"].get("offset") is not None]
        if off and not any(v["quantity"] == TRIGGER_QUANTITY for v, _ in recal):
            recal.append((tv, {"action": {"kind": "recalibrate", "offset": error}}))
        for v, f in recal:
            q, offset = v["quantity"], float(f["action"]["offset"])
            findings.append({"node": node, "actionable": True,
                             "action": {"kind": "recalibrate", "quantity": q, "offset": offset}})
            what.append(f"{q} recalibrated by {-offset:+.2f} {UNITS.get(q, '')}".rstrip())
        classes = sorted({f"{v['quantity']}:{f['class']}" for v, f in alarms})
        why = "voted out of zone " + str(tv["zone"]) if voted_out else f"{error:+.2f} °C from zone {tv['zone']}"
        out.append(Decision(node, "repair", float(tv["window_start"]), findings, classes, what, why, error))
    return out


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
        candidates = {n for v in latest for n in v.get("faults", {})}
        for d in decide_repairs(latest, items, candidates, self.window):
            if d.node in self.repaired:
                if d.node not in self.reported_again:
                    self.reported_again.add(d.node)
                    self._note(d.node, "again_wrong", {"classes": d.classes, "why": d.why,
                                                       "window_start": d.window_start,
                                                       "hint": "repaired once this run: run `canopy repair`"})
                    # A notice for a human, not a failed repair: ok stays True.
                    self._event(d.node, f"wrong again ({d.why}); not repaired twice in one run: "
                                        "see `canopy audit`, run `canopy repair`", True)
                continue
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

    def _release(self, node: str, zone: str, run: int) -> None:
        self._note(node, "agrees", {"zone": zone, "agreeing_windows": run, "since_window": self.repaired[node]})
        states = self.apply(node, [{"node": node, "actionable": True, "action": {"kind": "release"}}])
        ok = bool(states) and set(states) <= {"VERIFIED"}
        self._event(node, f"agrees with zone {zone} again ({run} windows): released "
                          f"[{', '.join(states) or 'nothing to do'}]", ok)
        self.released.add(node)

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
        from .repair import Journal, NodeOffline, NodeRefused, RepairEngine, plan, status
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

    def start(self, every_s: float = CHECK_S) -> None:
        """Check every `every_s` wall seconds in a thread (the caller's UI stays live
        while a node is being repaired)."""
        if self._thread is not None:
            return

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
