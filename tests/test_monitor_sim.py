"""A short `canopy monitor` session against real virtual nodes (`canopy sim`), end to end:
the firmware in the unix port -> ptys -> monitor -> SQLite -> export/plot.

Faults injected by the sim supervisor: n01 is unplugged for a while (its pty vanishes
and comes back), n02 reboots, both get garbage bytes on the line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

SPEED = 20  # simulated s per wall s: sim fault times below are simulated seconds
MONITOR_S = 9.0


def _canopy(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "canopy_host.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


@pytest.mark.slow
def test_monitor_follows_virtual_nodes_through_unplug_reboot_and_garbage(tmp_path):
    state = tmp_path / "state.json"
    db = tmp_path / "m.db"
    sim = _canopy("sim", "--nodes", "2", "--zones", "2", "--speed", str(SPEED), "--dir", str(tmp_path / "sim"),
                  "--state", str(state), "--duration", "40",
                  # wall times: unplug n01 at 3 s for 1.5 s, reboot n02 at 5 s, garbage from 2 s
                  "--fault", "n01:disconnect@60/30", "--fault", "n02:reboot@100/10",
                  "--fault", "all:garbage=24@40/60")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not state.exists():
            time.sleep(0.05)
        assert state.exists(), sim.stderr.read1() if sim.stderr else b""
        mon = _canopy("monitor", "--sim-state", str(state), "--db", str(db), "--json",
                      "--duration", str(MONITOR_S))
        out, err = mon.communicate(timeout=60)
    finally:
        sim.send_signal(signal.SIGINT)
        try:
            sim.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.communicate()
    assert mon.returncode == 0, err.decode()
    assert b"Traceback" not in err
    frames = [json.loads(line) for line in out.splitlines()]
    by_node: dict[str, list[dict]] = {}
    for f in frames:
        by_node.setdefault(f["node"], []).append(f)
    assert set(by_node) == {"n01", "n02"}

    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == len(frames)  # every frame reported is stored
    m = re.search(rb"(\d+) frames", err)
    assert m and int(m.group(1)) == len(frames)

    def events(node: str, kind: str) -> list[tuple]:
        return con.execute("SELECT boot, seq_from, seq_to, count, detail FROM link_events "
                           "WHERE node=? AND kind=? ORDER BY id", (node, kind)).fetchall()

    # n01 was unplugged and came back: a disconnect, a second connect, frames after it.
    assert len(events("n01", "disconnect")) >= 1
    connects = events("n01", "connect")
    assert len(connects) >= 2
    last_connect = con.execute("SELECT MAX(rx_time) FROM link_events WHERE node='n01' AND kind='connect'").fetchone()[0]
    history = con.execute("SELECT rx_time, kind, detail FROM link_events WHERE node='n01' AND kind NOT IN "
                          "('text', 'garbage') ORDER BY id").fetchall()
    last_frame = con.execute("SELECT MAX(rx_time) FROM frames WHERE node='n01'").fetchone()[0]
    assert last_frame > last_connect, (history, last_frame, err.decode())
    # Frames the node sent while unplugged are lost: reported as gaps of that boot, and
    # the stored seqs plus the recorded gap ranges cover every seq exactly once.
    for node in ("n01", "n02"):
        for (boot,) in con.execute("SELECT DISTINCT boot FROM frames WHERE node=?", (node,)).fetchall():
            seqs = {r[0] for r in con.execute("SELECT seq FROM frames WHERE node=? AND boot=?", (node, boot))}
            missing: set[int] = set()
            for b, lo, hi, _, _ in events(node, "gap"):
                if b == boot:
                    missing |= set(range(lo, hi + 1))
            assert not (seqs & missing)
            assert seqs | missing == set(range(min(seqs | missing), max(seqs) + 1))

    # n02 rebooted: a reboot event and frames from two boots, the new one from seq 0 (or a recorded gap).
    reboots = events("n02", "reboot")
    assert len(reboots) == 1
    boots = [r[0] for r in con.execute("SELECT DISTINCT boot FROM frames WHERE node='n02' ORDER BY id")]
    assert len(boots) == 2 and reboots[0][0] == boots[1]
    garbage = con.execute("SELECT COALESCE(SUM(count), 0) FROM link_events WHERE kind='garbage'").fetchone()[0]
    assert garbage > 0
    zones = dict(con.execute("SELECT node, zone FROM nodes").fetchall())
    assert zones == {"n01": "A", "n02": "B"}

    # The recorded session reads back through export and plot.
    from canopy_host.cli import main

    csv_path = tmp_path / "n02.csv"
    assert main(["export", "--db", str(db), "--node", "n02", "--quantity", "t,h,shade", "-o", str(csv_path)]) == 0
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    readings = [f for f in by_node["n02"] if f["kind"] == "reading"]
    assert [int(r["t"]) for r in rows] == [f["fields"]["t"] for f in readings]
    png = tmp_path / "zone-a.png"
    assert main(["plot", "--db", str(db), "--zone", "A", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
