"""`canopy demo` (the mesh demo): run as a user would, checked against the database it wrote.

The summary is only trusted where the test can check it against something the demo
did not compute itself: the SQLite file (read here with plain sqlite3), the sim state
file and the process table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from canopy_host.demo_cmd import default_faults, zone_members
from canopy_host.sim import SimConfig, Supervisor, parse_fault

CLI = [sys.executable, "-m", "canopy_host.cli", "demo"]


def _db_counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT node, COUNT(*) FROM frames GROUP BY node"))
    finally:
        con.close()


def _summary_rows(out: str) -> dict[str, list[str]]:
    return {m.group(1): ln.split() for ln in out.splitlines() if (m := re.match(r"^(n\d\d)\s+[A-Z]\s+\d", ln))}


def _db_path(out: str) -> Path:
    return Path(re.search(r"database: (\S+)", out).group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes only once reaped; the demo reaps its children.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The default demo (6 nodes, 2 zones, default faults), shortened: one run for several tests."""
    folder = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(CLI + ["--duration", "10", "--speed", "60", "--dir", str(folder)],
                          capture_output=True, text=True, timeout=90)
    return proc, folder


def test_short_demo_covers_every_node_and_stores_everything(default_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, folder = default_run
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    db = _db_path(out)
    assert db.parent == folder and db.is_file()
    counts = _db_counts(db)
    rows = _summary_rows(out)
    # Every node: in the summary, with frames in the database, and the summary's
    # "stored" column is what the database really holds.
    assert sorted(rows) == sorted(counts) == [f"n0{i}" for i in range(1, 7)]
    for node, row in rows.items():
        assert counts[node] > 100, (node, counts)
        received, stored = int(row[2]), int(row[3])
        assert stored == counts[node]
        assert received == stored  # nothing received was lost on the way to disk
    # Zones as the simulator assigned them (its state file), not as the demo guessed.
    state = json.loads((folder / "sim" / "state.json").read_text())
    assert {n["node_id"]: n["zone"] for n in state["nodes"]} == {n: r[1] for n, r in rows.items()}
    assert state["running"] is False
    # Non-tty stdout: periodic status lines instead of the live table.
    assert re.search(r"^\[\s*\d+\.\d s, sim \d\d:\d\d\] n01/A ", out, re.M)
    assert re.search(r"^zone A: T \d+\.\d\d °C \(setpoint 26\.00", out, re.M)
    assert re.search(r"^zone B: T ", out, re.M)
    assert "canopy export --db " + str(db) in out and f"canopy plot --db {db} --zone A" in out


def test_default_faults_show_up_in_the_database(default_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = default_run
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    faults = dict(re.findall(r"^  fault: (n\d\d):(\w+)", out, re.M))
    assert sorted(faults.values()) == ["disconnect", "drift", "sensor_off"]
    inv = {k: n for n, k in faults.items()}
    con = sqlite3.connect(f"file:{_db_path(out)}?mode=ro", uri=True)
    try:
        # The unplugged node: the monitor saw the link drop, then frames again.
        unplug = inv["disconnect"]
        kinds = [k for (k,) in con.execute("SELECT kind FROM link_events WHERE node = ? ORDER BY id", (unplug,))]
        assert "disconnect" in kinds and kinds.count("connect") >= 2
        # The node that lost its sensor reported failsafe and recovery itself.
        codes = [json.loads(e).get("code") for (e,) in con.execute(
            "SELECT extra FROM frames WHERE node = ? AND kind = 'event' ORDER BY id", (inv["sensor_off"],))]
        assert "failsafe" in codes and codes.index("recovered") > codes.index("failsafe")
        assert con.execute("SELECT COUNT(*) FROM frames WHERE node = ? AND failsafe = 1",
                           (inv["sensor_off"],)).fetchone()[0] > 0
    finally:
        con.close()
    row = _summary_rows(out)[unplug]  # node zone frames stored gaps (missing) reboots crc unplugs ...
    assert int(row[8]) == kinds.count("disconnect")


def test_sabotaged_node_is_detected_quarantined_and_recalibrated(
        default_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, folder = default_run
    out = proc.stdout
    sabotaged = re.search(r"^  fault: (n\d\d):drift=\d", out, re.M).group(1)
    # The journal the repair engine wrote, read here directly: the sabotaged node and
    # only it was quarantined and recalibrated, and the node confirmed both.
    con = sqlite3.connect(f"file:{_db_path(out)}?mode=ro", uri=True)
    try:
        jobs = con.execute("SELECT node, action, target, state FROM repair_jobs ORDER BY id").fetchall()
    finally:
        con.close()
    assert {n for n, *_ in jobs} == {sabotaged}, jobs
    actions = {(a, s) for _, a, _, s in jobs}
    assert ("quarantine", "VERIFIED") in actions
    cal = [json.loads(t) for _, a, t, s in jobs if a == "recalibrate" and s == "VERIFIED"]
    # The sensor reads SABOTAGE_C too warm; the loop hides part of it, so the measured
    # error is smaller, but the correction must go the right way.
    t_cal = [c["offset"] for c in cal if c["channel"] == "t"]
    assert t_cal and t_cal[0] < 0
    # The node's own view: the shadow file the demo keeps next to the database.
    shadow = json.loads(_db_path(out).with_suffix(".shadow.json").read_text())
    assert shadow["nodes"][sabotaged]["cal"]["t"] == t_cal[0]
    assert re.search(rf"^  \d\d:\d\d {sabotaged}: quarantined, .*t recalibrated by -\d", out, re.M)


def test_ctrl_c_stops_every_node_and_flushes_the_store(tmp_path: Path) -> None:
    proc = subprocess.Popen(CLI + ["--duration", "600", "--speed", "20", "--nodes", "3", "--zones", "1",
                                   "--no-faults", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_file = tmp_path / "sim" / "state.json"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                state = json.loads(state_file.read_text())
                pids = [n["pid"] for n in state["nodes"] if n.get("pid")]
                dbs = list(tmp_path.glob("demo-*.db"))
                if len(pids) == 3 and dbs and len(_db_counts(dbs[0])) == 3:
                    break
            except (OSError, ValueError, sqlite3.Error):
                pass
            time.sleep(0.2)
        assert len(pids) == 3, "the nodes never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted after" in out and "Traceback" not in out + err
    assert not [p for p in pids if _alive(p)]
    assert json.loads(state_file.read_text())["running"] is False
    counts = _db_counts(_db_path(out))
    received = int(re.search(r"summary: 3 nodes, (\d+) frames received", out).group(1))
    assert sorted(counts) == ["n01", "n02", "n03"]
    assert sum(counts.values()) == received


@pytest.mark.parametrize(
    "args, words",
    [
        (["--nodes", "2", "--zones", "3"], "--zones"),
        (["--nodes", "0"], "at least 1"),
        (["--fault", "n01:fire"], "unknown kind"),
        (["--fault", "n09:stuck"], "n09"),
        (["--fault", "n01:stuck", "--no-faults"], "contradict"),
        (["--minutes", "3"], "only with --single"),
        (["--speed", "0"], "more than 0"),
        (["--duration", "-1"], "--duration"),
    ],
)
def test_user_mistakes_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                       words: str) -> None:
    rc = _main_in_process(["demo", "--dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert words in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("sim/n*")), "nothing may start on a bad command line"


def _main_in_process(argv: list[str]) -> int:
    # The CLI's own entry point, minus a Python start per case (argparse exits with 2).
    from canopy_host.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_existing_db_is_not_appended_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "old.db"
    db.write_bytes(b"")
    assert _main_in_process(["demo", "--dir", str(tmp_path), "--db", str(db)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("nodes, zones", [(1, 1), (2, 1), (2, 2), (4, 2), (6, 2), (7, 3), (9, 3)])
def test_default_faults_fit_the_simulator(tmp_path: Path, nodes: int, zones: int) -> None:
    sim_s = 1200.0
    faults = [parse_fault(f.text) for f in default_faults(nodes, zones, sim_s)]
    # The simulator accepts them (node ids exist) ...
    SimConfig(nodes=nodes, zones=zones, faults=faults, directory=tmp_path).validate()
    # ... the demo's idea of the zones is the simulator's ...
    sup = Supervisor(SimConfig(nodes=nodes, zones=zones, directory=tmp_path))
    sup._prepare_nodes()
    real: dict[str, list[str]] = {}
    for n in sup.nodes:
        real.setdefault(n.zone, []).append(n.node_id)
    assert zone_members(nodes, zones) == real
    # ... the sabotage is in zone A, the other faults each on another node, inside the run.
    drifts = [f for f in faults if f.kind == "drift"]
    assert len(drifts) == 2 and {f.node for f in drifts} == {faults[0].node} and faults[0].node in real["A"]
    others = [f.node for f in faults if f.kind != "drift"]
    assert len(set(others)) == len(others) == min(nodes - 1, 2) and faults[0].node not in others
    for f in faults:
        assert 0 < f.at_s < sim_s
        assert f.duration_s is None or f.at_s + f.duration_s <= sim_s
    # The sensor error (docs/simulation.md: a drift adds VALUE C per second while it is
    # active; no duration = until the end): it settles at 5 C and stays there.
    def error_at(t: float) -> float:
        return sum(f.value * (t - f.at_s) for f in drifts if t >= f.at_s)

    assert error_at(drifts[1].at_s) == pytest.approx(5.0, rel=1e-3)
    assert error_at(sim_s) == pytest.approx(5.0, rel=1e-3)
