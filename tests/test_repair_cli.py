"""`canopy repair` and `canopy audit` as a user runs them, against `canopy sim` virtual nodes
(the firmware's main.py in the unix port, on ptys)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from canopy_host.shadow import firmware_config
from test_repair_support import canonical_digest


def canopy(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "canopy_host.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture
def sim(tmp_path):
    state = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "canopy_host.cli", "sim", "--nodes", "2", "--speed", "20",
                             "--dir", str(tmp_path / "sim"), "--state", str(state), "--duration", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not state.exists():
        time.sleep(0.05)
    assert state.exists()
    time.sleep(0.5)
    yield state
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_repair_dry_run_then_repair_then_audit(tmp_path, sim):
    shadow = tmp_path / "shadow.json"
    shadow.write_text(json.dumps({"config": {"version": 2, "t_setpoint": 2450},
                                  "nodes": {"n01": {}, "n02": {"quarantine": True}}}))
    db = tmp_path / "repair.db"
    r = canopy("repair", "--shadow", str(shadow), "--sim-state", str(sim), "--db", str(db), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "n01: push_config" in r.stdout and "n02: quarantine" in r.stdout and "dry run" in r.stdout
    assert r.stdout.count("stale (v1)") == 2, r.stdout  # the nodes answered their status
    assert not db.exists()

    r = canopy("repair", "--shadow", str(shadow), "--sim-state", str(sim), "--db", str(db), "--deadline", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": VERIFIED") == 3, r.stdout
    # the nodes' flash folders now hold the canonical desired config
    want = dict(firmware_config().DEFAULT_CONFIG, version=2, t_setpoint=2450)
    for n in ("n01", "n02"):
        got = json.loads((tmp_path / "sim" / n / "config.json").read_text())
        assert canonical_digest(got) == canonical_digest(want)
    assert (tmp_path / "sim" / "n02" / "quarantine").exists()

    # again: nothing to do
    r = canopy("repair", "--shadow", str(shadow), "--sim-state", str(sim), "--db", str(db), "--dry-run")
    assert "nothing to repair" in r.stdout, r.stdout

    r = canopy("audit", "--db", str(db), "--node", "n02", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and {e["node"] for e in rows} == {"n02"}
    assert [e["state"] for e in rows if e["event"] == "state"][-1] == "VERIFIED"
    assert canopy("audit", "--db", str(db), "--since", "1d").stdout.count("n01") >= 4
    assert "no audit entries" in canopy("audit", "--db", str(db), "--until", "1d").stdout

    # `canopy monitor --repair`: record a few seconds, then repair the nodes it saw (v3)
    shadow.write_text(json.dumps({"config": {"version": 3, "t_setpoint": 2400},
                                  "nodes": {"n01": {}, "n02": {"quarantine": False}}}))
    r = canopy("monitor", "--sim-state", str(sim), "--db", str(db), "--json", "--duration", "2",
               "--repair", str(shadow))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(": VERIFIED") == 3  # this run's jobs only
    want = dict(firmware_config().DEFAULT_CONFIG, version=3, t_setpoint=2400)
    for n in ("n01", "n02"):
        got = json.loads((tmp_path / "sim" / n / "config.json").read_text())
        assert canonical_digest(got) == canonical_digest(want)
    assert not (tmp_path / "sim" / "n02" / "quarantine").exists()


class _Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = code, out, err


def inproc(capsys, *args: str) -> _Run:
    """The CLI in this process (no interpreter start per call); same code path as `canopy`."""
    from canopy_host.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return _Run(code, out.out, out.err)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "shadow.json"
    bad.write_text(json.dumps({"config": {"t_setpoint": 99999}, "nodes": {"n01": {}}}))
    r = inproc(capsys, "repair", "--shadow", str(bad), "--dry-run")
    assert r.returncode == 2 and "t_setpoint" in r.stderr and "Traceback" not in r.stderr
    r = inproc(capsys, "repair", "--shadow", str(tmp_path / "missing.json"), "--dry-run")
    assert r.returncode == 2 and "no shadow file" in r.stderr
    bad.write_text(json.dumps({"config": {}, "nodes": {"n01": {}}}))
    r = inproc(capsys, "repair", "--shadow", str(bad), "--port", "n01", "--dry-run")
    assert r.returncode == 2 and "NODE=PORT" in r.stderr
    (tmp_path / "f.jsonl").write_text("{not json\n")
    r = inproc(capsys, "repair", "--shadow", str(bad), "--findings", str(tmp_path / "f.jsonl"), "--dry-run")
    assert r.returncode == 2 and "f.jsonl:1" in r.stderr
    r = inproc(capsys, "audit", "--db", str(tmp_path / "none.db"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = inproc(capsys, "audit", "--db", str(tmp_path / "none.db"), "--since", "yesterday-ish")
    assert r.returncode == 2 and "cannot read time" in r.stderr
    # and once as a user runs it: one line on stderr, no traceback
    r = canopy("repair", "--shadow", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_offline_node_dry_run_still_plans(tmp_path, capsys):
    sh = tmp_path / "shadow.json"
    sh.write_text(json.dumps({"config": {"version": 2}, "nodes": {"n01": {}}}))
    r = inproc(capsys, "repair", "--shadow", str(sh), "--port", "n01=socket://127.0.0.1:9", "--dry-run",
               "--timeout", "0.3")
    assert r.returncode == 0, r.stderr
    assert "n01: push_config" in r.stdout and "offline" in r.stdout and "no status" in r.stderr
