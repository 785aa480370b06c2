"""The repair loop's pieces without nodes: the port-lending handshake of the monitor's
PortReader, the decision rules, the release hysteresis, and a loop check on a store
where a zone has no quorum."""

from __future__ import annotations

import threading
import time

import pytest

from canopy_host.errors import CanopyError
from canopy_host.monitor import Collector, PortReader, PortSpec
from canopy_host.protocol import READING_KEYS, encode_frame
from canopy_host.repair_loop import (RELEASE_AFTER, T_ACCURACY_C, RepairLoop, agreeing_run, decide_repairs,
                                     nearest_gap, readers_lender, zone_error)


class FakePort:
    """A serial port that yields one reading frame per read() until closed."""

    def __init__(self, node: str) -> None:
        self.node, self.seq, self.closed, self.timeout = node, 0, False, 0.1

    @property
    def in_waiting(self) -> int:
        return 0

    def read(self, n: int) -> bytes:
        if self.closed:
            raise OSError("closed")
        time.sleep(0.01)
        self.seq += 1
        return encode_frame("reading", self.node, 1, self.seq, reading(2500))

    def cancel_read(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def reading(t: int) -> dict[str, int]:
    f = dict.fromkeys(READING_KEYS, 0)
    f.update(t=t, t_raw=t, p=100000, p_raw=100000, h=40960, h_raw=40960)
    return f


def _readers(nodes):
    opened: dict[str, list[FakePort]] = {n: [] for n in nodes}

    def opener(path: str, baud: int) -> FakePort:
        port = FakePort(path)
        opened[path].append(port)
        return port

    collector = Collector(None)
    readers = [PortReader(collector.add_port(PortSpec(label=n, path=n, node_hint=n)), collector, opener=opener)
               for n in nodes]
    return collector, readers, opened


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_lend_closes_only_that_port_and_reopens_it_on_return():
    collector, readers, opened = _readers(["n01", "n02"])
    for r in readers:
        r.start()
    try:
        assert _wait(lambda: all(collector.nodes[n].frames > 3 for n in ("n01", "n02")))
        lend = readers_lender(lambda: readers)
        with lend("n01"):
            assert opened["n01"][0].closed  # closed before lend() returned
            held = collector.nodes["n01"].frames
            others = collector.nodes["n02"].frames
            time.sleep(0.3)
            assert len(opened["n01"]) == 1  # not reopened while lent
            assert collector.nodes["n01"].frames == held
            assert collector.nodes["n02"].frames > others  # the other reader kept going
            assert not opened["n02"][0].closed
            assert not collector.nodes["n01"].connected
            with pytest.raises(CanopyError, match="already lent"):
                readers[0].lend(timeout=0.5)
        assert _wait(lambda: len(opened["n01"]) == 2 and collector.nodes["n01"].frames > held)
        assert collector.nodes["n01"].connected
        assert collector.nodes["n01"].disconnects == 0  # a loan is not an unplug
        assert collector.ports[0].connects == 2
    finally:
        for r in readers:
            r.stop()
        for r in readers:
            r.join(5)
    assert not any(r.is_alive() for r in readers)


def test_lend_times_out_cleanly_when_the_reader_is_stuck():
    collector, readers, _ = _readers(["n01"])
    reader = readers[0]
    stuck = threading.Event()

    class Stuck(PortReader):  # a reader whose thread never reaches the lend check
        def run(self) -> None:
            stuck.wait(5)

    s = Stuck(reader.ps, collector)
    s.start()
    try:
        with pytest.raises(CanopyError, match="did not let go"):
            s.lend(timeout=0.2)
        assert s._wanted is None  # a later loan can be asked for again
    finally:
        stuck.set()
        s.join(5)


def test_lend_while_the_port_cannot_be_opened():
    # A reader in its reconnect backoff lends at once (there is no port to close).
    collector = Collector(None)

    def opener(path: str, baud: int):
        raise OSError("no such port")

    r = PortReader(collector.add_port(PortSpec(label="n09", path="n09", node_hint="n09")), collector,
                   opener=opener, backoff_min=5.0, backoff_max=5.0)
    r.start()
    try:
        time.sleep(0.1)
        began = time.monotonic()
        loan = r.lend(timeout=2.0)
        assert time.monotonic() - began < 1.0  # the 5 s backoff wait was cut short
        loan.give_back()
    finally:
        r.stop()
        r.join(5)
    assert not r.is_alive()


# -- decision rules (verdicts as `canopy consensus` prints them) ---------------------------


class R:  # consensus.Reading's fields the rules read
    def __init__(self, node, quantity, time, value):
        self.node, self.quantity, self.time, self.value = node, quantity, time, value


def verdict(q="t", status="OK", value=25.0, falsetickers=(), faults=None, ws=600.0, zone="A"):
    nodes = ["n01", "n02", "n03", "n04"]
    return {"zone": zone, "window_start": ws, "quantity": q, "status": status, "value": value,
            "truechimers": [n for n in nodes if n not in falsetickers], "falsetickers": list(falsetickers),
            "faults": faults or {}, "actionable": status == "OK"}


def finding(cls, kind, actionable=True, offset=None):
    a = {"kind": kind}
    if offset is not None:
        a["offset"] = offset
    return {"class": cls, "alarm": cls != "ok", "actionable": actionable, "action": a}


def readings(node_values, ws=600.0):
    return [R(n, "t", ws + i, v) for n, v in node_values.items() for i in range(5)]


def test_a_finding_whose_action_is_none_never_starts_a_repair():
    # Large error and voted out, but the consensus recommends nothing (e.g. a suspect or a
    # spike): the loop does not act on a class alone, nor on an error alone.
    for cls in ("suspect", "spike", "microclimate", "offline", "ok"):
        v = verdict(falsetickers=["n04"], faults={"n04": finding(cls, "none")})
        assert decide_repairs([v], readings({"n04": 30.0}), ["n04"]) == []


def test_no_quorum_findings_are_never_acted_on():
    v = verdict(status="NO_QUORUM", value=None, faults={"n04": finding("drift", "recalibrate", False, 5.0)})
    assert decide_repairs([v], readings({"n04": 30.0}), ["n04"]) == []
    # a stale `actionable` flag on a NO_QUORUM verdict is not trusted either
    v = verdict(status="NO_QUORUM", value=None, faults={"n04": finding("drift", "recalibrate", True, 5.0)})
    assert decide_repairs([v], readings({"n04": 30.0}), ["n04"]) == []


def test_a_node_that_agrees_with_its_zone_is_not_quarantined_for_a_score():
    # The known consensus false alarm: a healthy node scored `noise` (action quarantine)
    # while it is a truechimer within the sensor's accuracy of the zone.
    v = verdict(faults={"n02": finding("noise", "quarantine")})
    near = 25.0 + 0.5 * T_ACCURACY_C
    assert decide_repairs([v], readings({"n02": near}), ["n02"]) == []
    # the same score on a node measurably off is repaired, and its error corrected
    far = 25.0 + 2.0 * T_ACCURACY_C
    (d,) = decide_repairs([v], readings({"n02": far}), ["n02"])
    assert d.node == "n02" and d.kind == "repair"
    kinds = [f["action"]["kind"] for f in d.findings]
    assert kinds == ["quarantine", "recalibrate"]
    assert d.findings[1]["action"]["quantity"] == "t"
    assert d.findings[1]["action"]["offset"] == pytest.approx(far - 25.0)


def test_in_a_zone_of_three_a_drifting_neighbour_does_not_make_a_healthy_node_the_odd_one_out():
    # Seen in a loaded CI run of the short demo: n05 drifted +2.4 °C, so the leave-one-out
    # value of healthy n01 (the mean of n03 and n05) sat 1.2 °C above it; with a noise
    # score that was enough to quarantine and "recalibrate" n01.
    v = verdict(faults={"n01": finding("noise", "quarantine"), "n05": finding("drift", "recalibrate", offset=2.4)})
    zone = {"n01": 25.0, "n03": 25.1, "n05": 27.4}
    assert zone_error("n01", v, readings(zone), 60.0) == pytest.approx(-1.25)  # what fooled the old rule
    assert nearest_gap("n01", v, readings(zone), 60.0) == pytest.approx(0.1)
    decisions = decide_repairs([v], readings(zone), ["n01", "n03", "n05"])
    assert [d.node for d in decisions] == ["n05"] and decisions[0].t_error == pytest.approx(27.4 - 25.05)


def test_only_the_trigger_quantity_starts_a_repair_others_come_along():
    p_only = verdict(q="p", faults={"n03": finding("drift", "recalibrate", offset=3.0)})
    t_ok = verdict(faults={"n03": finding("ok", "none")})
    assert decide_repairs([p_only, t_ok], readings({"n03": 29.0}), ["n03"]) == []
    t_drift = verdict(falsetickers=["n03"], faults={"n03": finding("drift", "recalibrate", offset=4.0)})
    (d,) = decide_repairs([p_only, t_drift], readings({"n03": 29.0}), ["n03"])
    got = {(f["action"]["kind"], f["action"].get("quantity")): f["action"].get("offset") for f in d.findings}
    # the consensus' own offset wins over the measured error for t; p comes along
    assert got == {("quarantine", None): None, ("recalibrate", "t"): 4.0, ("recalibrate", "p"): 3.0}
    assert d.classes == ["p:drift", "t:drift"]


def test_release_needs_consecutive_agreeing_windows_after_the_repair():
    def w(ws, ok=True, status="OK"):
        return verdict(ws=ws, status=status, falsetickers=[] if ok else ["n04"])

    since = 600.0
    seq = [w(540, ok=True), w(600), w(660, ok=False), w(720), w(780)]
    assert agreeing_run("n04", "A", seq, since) == 2  # the disagreeing window restarted the count
    seq.append(w(840, status="NO_QUORUM"))
    assert agreeing_run("n04", "A", seq, since) == 0  # no quorum is not agreement
    seq += [w(900 + 60 * i) for i in range(RELEASE_AFTER)]
    assert agreeing_run("n04", "A", seq, since) == RELEASE_AFTER
    assert agreeing_run("n04", "B", seq, since) == 0  # another zone's windows do not count


def test_loop_on_a_no_quorum_store_lends_nothing_and_journals_nothing(tmp_path):
    # Two nodes 6 °C apart in one zone for 10 windows: real consensus says NO_QUORUM.
    from canopy_host.protocol import FrameParser
    from canopy_host.store import Store

    db = tmp_path / "s.db"
    store = Store(db)
    t0 = 1_000_000.0
    parser = FrameParser()
    for i in range(600):
        for node, t in (("n01", 2500), ("n02", 3100)):
            line = encode_frame("reading", node, 1, i, reading(t + (i % 7)))
            for f in parser.feed(line):
                store.add_frame(t0 + i, "x", f)
    store.close()
    lent: list[str] = []

    def lend(node):
        lent.append(node)
        raise AssertionError("nothing may be lent")

    loop = RepairLoop(db, tmp_path / "shadow.json", lend=lend, client_for=lambda n: None, t0=t0,
                      timescale=1.0, zone_of={"n01": "A", "n02": "A"}, clock=lambda: t0 + 700)
    from canopy_host.repair_loop import load_readings, zone_verdicts

    vs = zone_verdicts(load_readings(db, t0=t0, timescale=1.0, zone_of={"n01": "A", "n02": "A"}))
    assert {v["status"] for v in vs if v["quantity"] == "t"} == {"NO_QUORUM"}
    assert loop.check() == []
    assert loop.checks == 1 and loop.errors == 0
    assert lent == [] and not (tmp_path / "shadow.json").exists()
    import sqlite3

    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM repair_jobs").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM repair_audit").fetchone()[0] == 0
