"""`canopy demo --single`: the one-node text demo, run as a user would (subprocess).

The mesh demo (the default) is tested in test_demo_mesh.py."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def _demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "canopy_host.cli", "demo", "--single", *args],
                          capture_output=True, text=True, timeout=timeout)


def _rows(out: str) -> list[list[str]]:
    return [ln.split() for ln in out.splitlines() if re.match(r"^\s+\d+:\d\d\s+-?\d", ln)]


def test_demo_shows_readings_and_summary() -> None:
    proc = _demo("--minutes", "20", "--speed", "0", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = _rows(out)
    # ~30 rows for the run (every 40 ticks of 1200) plus the first healthy reading.
    assert 25 <= len(rows) <= 35
    assert rows[-1][0] == "20:00"
    assert "event: boot" in out
    assert "simulated 20 min 0 s" in out and "1200 ticks" in out
    assert re.search(r"setpoint 26\.00 C: within \+-0\.5 C for \d+%", out)
    assert proc.stderr == ""


def test_demo_disconnect_fault_shows_failsafe_and_recovery() -> None:
    proc = _demo("--minutes", "12", "--speed", "0", "--fault", "disconnect", "--every", "60")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # Fault a third in (4:00) for a quarter of the run (3 min): failsafe rows in between.
    assert re.search(r"4:0\d\s+\*\* event: failsafe", out)
    fs_rows = [r for r in _rows(out) if r[-1] == "FS"]
    assert fs_rows and all(r[-2] == "1" for r in fs_rows)
    assert "event: recovered" in out
    assert "sensor faults: 1" in out and "recoveries: 1" in out


def test_demo_speed_paces_the_run() -> None:
    # 60 simulated seconds at 30x: about 2 s of wall time, not instant.
    proc = _demo("--minutes", "1", "--speed", "30")
    assert proc.returncode == 0, proc.stderr
    wall = float(re.search(r"in ([\d.]+) s wall", proc.stdout).group(1))
    assert 1.5 <= wall <= 10


@pytest.mark.parametrize(
    "args, words",
    [
        (["--minutes", "-3"], "--minutes"),
        (["--minutes", "lots"], "not a number"),
        (["--speed", "fast"], "'auto'"),
        (["--speed", "-1"], ">= 0"),
        (["--fault", "fire"], "invalid choice"),
        (["--fault", "stuck", "--fault", "spike"], "at most one"),
        (["--nodes", "3"], "not with --single"),
        (["--seed", "x"], "not an integer"),
        (["--every", "-2"], "--every"),
    ],
)
def test_demo_user_mistakes_are_clear_errors(capsys: pytest.CaptureFixture[str], args: list[str],
                                             words: str) -> None:
    # The CLI's own entry point in-process (no Python start per case); argparse exits with 2.
    from canopy_host.cli import main

    try:
        rc = main(["demo", "--single", *args])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert rc == 2
    assert words in err
    assert "Traceback" not in err


def test_demo_help_teaches() -> None:
    proc = subprocess.run([sys.executable, "-m", "canopy_host.cli", "demo", "--help"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for word in ("--single", "--minutes", "--speed", "--seed", "--fault", "examples:", "failsafe"):
        assert word in proc.stdout
