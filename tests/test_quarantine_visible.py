"""A quarantined node is visible as such: the reading's `failsafe` bitmask (bit 2 = held by
quarantine, docs/protocol.md) on a real virtual node driven through its repair agent, the
dashboard's health column, the monitor and demo summaries, and `canopy consensus --db`
keeping a node the store says is quarantined out of the vote."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field

import pytest

from canopy_host.cli import main
from canopy_host.monitor import Collector, PortSpec
from canopy_host.protocol import FrameParser
from canopy_host.repair import encode_repair_command
from canopy_host.shadow import firmware_config
from canopy_host.store import Store
from canopy_host.unixport import call_batch

DRIVER = r'''
import os, micropython
from canopy import config, board, hal
from canopy.link import Link
from canopy.node import Node

class Sink:
    def __init__(self):
        self.data = bytearray()
    def write(self, buf, n=None):
        self.data.extend(buf if n is None else buf[:n])
    def take(self):
        s = bytes(self.data).decode()
        self.data = bytearray()
        return s

def _fresh(d):
    try:
        os.mkdir(d)
    except OSError:
        pass
    for n in os.listdir(d):
        os.remove(d + "/" + n)

def run(d, quarantine, status, release):
    """Phases of one virtual node: healthy, quarantined via the agent, released."""
    _fresh(d)
    os.chdir(d)
    hw = hal.open(board.load("unix-sim"), {"seed": 3, "speed": 0})
    node = Node(hw, config.merged(), boot_id=5)
    sink = Sink()
    link = Link(node, node_id="n01", out=sink, inp=object())

    def ticks(n):
        for _ in range(n):
            node.tick()
            hw.sleep_ms(1000)
            link.service(hw.ticks_ms())

    out = []
    ticks(12)
    out.append(sink.take())
    link.feed(quarantine.encode())
    link.feed(status.encode())
    ticks(2)
    held = [0, 0]
    for _ in range(4):
        micropython.heap_lock()  # the tick and held() stay allocation-free when quarantined
        try:
            node.tick()
            held[0] = node.held()
        finally:
            micropython.heap_unlock()
        hw.sleep_ms(1000)
        link.service(hw.ticks_ms())
    node.failsafe = True  # as if its sensor failed too: both reasons in one reading
    held[1] = node.held()
    link.send_reading()
    node.failsafe = False
    out.append(sink.take())
    link.feed(release.encode())
    ticks(6)
    out.append(sink.take())
    return [out, held, node.reading()["failsafe"]]
'''


@pytest.fixture(scope="module")
def node_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("qv")
    (d / "qv_driver.py").write_text(DRIVER)
    cmds = [encode_repair_command("n01", 1, "quarantine", {"on": 1}).decode(),
            encode_repair_command("n01", 2, "status", {}).decode(),
            encode_repair_command("n01", 3, "quarantine", {"on": 0}).decode()]
    [res] = call_batch("qv_driver", "run", [(str(d / "node"), *cmds)], extra_path=[d])
    return res


def _frames(text: str):
    return FrameParser().feed(text.encode())


def test_virtual_node_reports_quarantine_and_clears_it_on_release(node_run):
    (healthy, quarantined, released), held, last = node_run
    cfg = firmware_config().DEFAULT_CONFIG
    before = [f.fields for f in _frames(healthy) if f.kind == "reading"]
    # Before the first good reading the node is in its own failsafe (bit 1), then under control.
    assert before[0]["failsafe"] == 1 and before[-1]["failsafe"] == 0 and before[-1]["faults"] == 0

    frames = _frames(quarantined)
    replies = {f.fields["re"]: f.fields for f in frames if f.kind == "reply"}
    assert replies[1]["cmd"] == "quarantine" and replies[1].get("ok") == 1
    assert replies[2]["failsafe"] == 2  # status says it too
    rs = [f.fields for f in frames if f.kind == "reading"]
    *plain, both = rs
    assert len(plain) >= 5
    for r in plain:
        # Held by quarantine only: the sensor is healthy, the actuators sit at failsafe.
        assert r["failsafe"] == 2 and r["faults"] == 0
        assert (r["shade"], r["mist"], r["fan"]) == (cfg["safe_shade"], 0, cfg["safe_fan"])
    # The readings stay real measurements while quarantined (consensus decides the release).
    assert len({r["t_raw"] for r in plain} | {r["h_raw"] for r in plain}) > 1
    assert both["failsafe"] == 3
    assert held == [2, 3]

    after = [f.fields for f in _frames(released)]
    rel = next(f for f in after if f.get("re") == 3)
    assert rel.get("ok") == 1
    rs = [f for f in after if "failsafe" in f and "tick" in f and "re" not in f]
    assert rs and all(r["failsafe"] == 0 for r in rs)
    assert last == 0


# -- the dashboard and the monitor summary ----------------------------------------------


class _Frame:
    def __init__(self, node: str, seq: int, fields: dict) -> None:
        self.node, self.boot, self.seq, self.kind, self.fields = node, 1, seq, "reading", fields


def _collector(states: dict[str, dict]) -> Collector:
    collector = Collector(None, clock=lambda: 1000.0)
    for i, (node, fields) in enumerate(states.items()):
        ps = collector.add_port(PortSpec(label=f"/dev/pts/{i}", path=f"/dev/pts/{i}", zone="A"))
        base = {"t": 2500, "p": 100500, "h": 51200, "shade": 5000, "mist": 0, "fan": 3000, "faults": 0}
        collector.ingest(ps, object(), [_Frame(node, 0, {**base, **fields})], 1000.0)
    return collector


STATES = {"n01": {"failsafe": 0}, "n02": {"failsafe": 2}, "n03": {"failsafe": 3, "faults": 1},
          "n04": {"failsafe": 1, "faults": 2}, "n05": {"failsafe": 2, "faults": 4}}


@pytest.mark.parametrize("width", [300, 120])
def test_dashboard_health_column_shows_quarantined(width):
    from rich.console import Console

    from canopy_host.dashboard import render

    nodes, ports = _collector(STATES).snapshot()
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(nodes, ports, [], 1000.0, "t", width=width))
    rows: dict[str, list[str]] = {}
    for line in console.export_text().splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] in STATES:
            rows[cells[0]] = cells
    assert set(rows) == set(STATES)
    health = {n: next(c for c in cells if c in ("ok", "quarantined") or c.startswith(("FAILSAFE", "quar", "fault")))
              for n, cells in rows.items()}
    both = "FAILSAFE 0x1 quarantined" if width >= 170 else "FAILSAFE 0x1 quar"
    assert health == {"n01": "ok", "n02": "quarantined", "n03": both, "n04": "FAILSAFE 0x2",
                      "n05": "quarantined fault 0x4"}


def test_monitor_summary_counts_quarantined_nodes():
    from canopy_host.monitor_cmd import _print_summary, quarantined_nodes

    collector = _collector(STATES)
    held = quarantined_nodes(collector)
    assert held == ["n02", "n03", "n05"]
    out = io.StringIO()
    _print_summary(collector.summary(), "m.db", out, held)
    lines = out.getvalue().splitlines()
    row = {ln.split()[0]: ln for ln in lines if ln.startswith("  n0")}
    assert all(("QUARANTINED" in row[n]) == (n in held) for n in STATES)
    assert any("quarantined at the end" in ln and ": 3: n02, n03, n05" in ln for ln in lines)


def test_demo_summary_counts_quarantined_readings(tmp_path):
    from canopy_host.demo_cmd import build_report, format_report

    db = tmp_path / "d.db"
    t0 = 1_764_100_800.0
    with Store(db) as store:
        seq = 0
        for i in range(10):
            for node, fs in (("n01", 0), ("n02", 2 if 3 <= i < 7 else 0), ("n03", 2 if i >= 6 else 0)):
                store.add_frame(t0 + i, "sim:" + node, F("reading", node, 1, seq, {
                    "t": 2500 + i, "p": 100500, "h": 51200, "faults": 0, "failsafe": fs}))
                seq += 1
    summary = {"nodes": {n: {"frames": 10, "readings": 10, "gaps": 0, "missing": 0, "reboots": 0,
                             "crc_errors": 0, "disconnects": 0} for n in ("n01", "n02", "n03")}}
    rep = build_report(db, summary, t0=t0, speed=1.0, members={"A": ["n01", "n02", "n03"]})
    assert [(r.quarantined_readings, r.quarantined_at_end) for r in rep.nodes.values()] == [
        (0, False), (4, False), (4, True)]
    lines = format_report(rep, db=db, wall=10.0, speed=1.0, setpoints={}, injected=[])
    assert "quarantined" in lines[2]
    col = lines[2].index("quarantined") + len("quarantined")
    cells = {ln.split()[0]: ln[:col].split()[-1] for ln in lines[3:6]}
    assert cells == {"n01": "-", "n02": "4", "n03": "now"}  # "4 now": the last word
    assert "4 now" in lines[5]
    assert any(ln.startswith("quarantined at the end: n03") for ln in lines)


# -- consensus from the store -------------------------------------------------------------


@dataclass
class F:
    kind: str
    node: str
    boot: int
    seq: int
    fields: dict = field(default_factory=dict)


T0 = 1_795_636_800.0  # 2026-11-25T20:00:00Z, a window boundary


def _consensus(capsys, argv):
    code = main(["consensus", *argv])
    cap = capsys.readouterr()
    return code, [json.loads(x) for x in cap.out.splitlines()], cap.err


def test_consensus_takes_quarantined_nodes_from_the_store(tmp_path, capsys):
    db = tmp_path / "m.db"
    # n4 is far off and quarantined now; n3 was quarantined earlier but its last reading
    # says released, so it votes.
    with Store(db) as store:
        for node in ("n1", "n2", "n3", "n4"):
            store.upsert_node(node, seen=T0, zone="A")
        plan = {"n1": (2210, [0, 0]), "n2": (2220, [0, 0]), "n3": (2215, [2, 0]), "n4": (3000, [0, 2])}
        for i, (node, (t, fs)) in enumerate(plan.items()):
            for k, f in enumerate(fs):
                store.add_frame(T0 + 5 + i + 10 * k, "sim:" + node,
                                F("reading", node, 1, k, {"t": t, "p": 100500, "h": 51200, "failsafe": f}))
    code, out, err = _consensus(capsys, ["--db", str(db), "--window", "60"])
    assert code == 0, err
    t = next(v for v in out if v["quantity"] == "t")
    assert "n4" not in t["truechimers"] + t["falsetickers"]
    assert sorted(t["truechimers"]) == ["n1", "n2", "n3"]
    assert "quarantined per the store (out of the vote): n4" in err

    # The same store judged without exclusion (a node list that names nobody else) for
    # comparison: n4 only stays out because the store said so.
    with Store(db) as store:
        store.add_frame(T0 + 40, "sim:n4", F("reading", "n4", 1, 2, {"t": 3000, "p": 100500, "h": 51200,
                                                                     "failsafe": 0}))
    code, out, err = _consensus(capsys, ["--db", str(db), "--window", "60"])
    t = next(v for v in out if v["quantity"] == "t")
    assert "n4" in t["falsetickers"] and "quarantined per the store" not in err


def test_consensus_explicit_quarantined_is_not_repeated(tmp_path, capsys):
    db = tmp_path / "m.db"
    with Store(db) as store:
        for i, node in enumerate(("n1", "n2", "n3")):
            store.upsert_node(node, seen=T0, zone="A")
            store.add_frame(T0 + 5 + i, "sim:" + node, F("reading", node, 1, 1, {
                "t": 2200 + i, "p": 100500, "h": 51200, "failsafe": 2 if node == "n3" else 0}))
    code, out, err = _consensus(capsys, ["--db", str(db), "--quarantined", "n3", "--quarantined", "n2"])
    assert code == 0, err
    t = next(v for v in out if v["quantity"] == "t")
    assert t["truechimers"] == ["n1"] and "quarantined per the store" not in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
