"""`canopy consensus` as a user runs it: JSON lines in (file, stdin), a monitor database,
one JSON verdict per zone/quantity/window out, clear errors for bad input."""

from __future__ import annotations

import calendar
import io
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from canopy_host.cli import main
from canopy_host.store import Store

T0 = calendar.timegm((2026, 11, 25, 20, 0, 0))  # 2026-11-25T20:00:00Z, a multiple of 60


def line(node, zone, time, q, value, **extra):
    return json.dumps({"node": node, "zone": zone, "time": time, "quantity": q, "value": value, **extra})


def sample_lines():
    out = []
    # Zone A, window 0: four nodes, n4 far off. Zone B: two nodes only.
    for node, t in (("n1", 22.1), ("n2", 22.3), ("n3", 21.9), ("n4", 30.0)):
        out.append(line(node, "A", T0 + 3, "t", t, accuracy=0.5))
    out.append(line("n5", "B", T0 + 10, "t", 18.0))
    out.append(line("n6", "B", T0 + 11, "t", 18.4))
    # Window 1 (starts at T0 + 60): the boundary reading belongs to it.
    for node, t in (("n1", 22.5), ("n2", 22.6), ("n3", 22.4), ("n4", 22.5)):
        out.append(line(node, "A", T0 + 60, "t", t))
    return out


def run_cli(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["consensus", *argv])
    cap = capsys.readouterr()
    return code, [json.loads(x) for x in cap.out.splitlines()], cap.err


def test_json_lines_file(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(sample_lines()) + "\n\n")  # a blank line is fine
    code, out, err = run_cli(capsys, [str(path)])
    assert code == 0 and err == ""
    assert [(v["zone"], v["window_start"], v["quantity"]) for v in out] == [
        ("A", T0, "t"), ("B", T0, "t"), ("A", T0 + 60, "t")]
    a0, b0, a1 = out
    assert a0["status"] == "OK" and a0["falsetickers"] == ["n4"]
    assert a0["truechimers"] == ["n1", "n2", "n3"]
    assert a0["value"] == pytest.approx(22.1)  # median of the three that agree
    assert a0["low"] <= 22.1 <= a0["high"]
    # accuracy 0.5 + default t allowance 1.0: intervals are ±1.5 around each reading
    assert a0["low"] == pytest.approx(22.3 - 1.5) and a0["high"] == pytest.approx(21.9 + 1.5)
    assert a0["tight"] is True  # n = 4 > 3 * f (f = 1)
    assert a0["faults"]["n4"]["class"] == "spike" and a0["faults"]["n4"]["action"]["kind"] == "none"
    assert set(a0["faults"]) == {"n1", "n2", "n3", "n4"}
    assert b0["status"] == "OK" and b0["actionable"] is False  # two nodes cannot attribute a fault
    assert a1["n"] == 4 and a1["falsetickers"] == []
    for v in out:
        for key in ("zone", "window_start", "quantity", "value", "low", "high", "tight", "status", "truechimers",
                    "falsetickers", "faults"):
            assert key in v


def test_stdin_window_and_allowance_math(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, ["--window", "120", "--allowance", "t=0.2", "--zone", "A"],
                           stdin="\n".join(sample_lines()), monkeypatch=monkeypatch)
    assert code == 0
    assert len(out) == 1 and out[0]["zone"] == "A" and out[0]["window_start"] == T0  # both windows in one
    v = out[0]
    assert v["n"] == 4  # one interval per node per window: the median of its two readings
    medians = {"n1": (22.1 + 22.5) / 2, "n2": (22.3 + 22.6) / 2, "n3": (21.9 + 22.4) / 2, "n4": (30.0 + 22.5) / 2}
    assert v["falsetickers"] == ["n4"]
    # window-1 readings carry no accuracy: the t default 1.0 applies, the max per node is used
    width = 1.0 + 0.2
    assert v["low"] == pytest.approx(max(medians[n] for n in ("n1", "n2", "n3")) - width)
    assert v["high"] == pytest.approx(min(medians[n] for n in ("n1", "n2", "n3")) + width)


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"node": "n1", "zone": "A", "time": 1, "quantity": "x", "value": 1}', "'quantity' must be one of"),
    ('{"node": "n1", "zone": "A", "time": 1, "quantity": "t"}', "missing 'value'"),
    ('{"node": "n1", "zone": "A", "time": 1, "quantity": "t", "value": "hot"}', "finite number"),
    ('{"node": "", "zone": "A", "time": 1, "quantity": "t", "value": 1}', "'node' must be"),
    ('{"node": "n1", "zone": "A", "time": "yesterday", "quantity": "t", "value": 1}', "ISO time"),
    ('{"node": "n1", "zone": "A", "time": "2026-11-25T20:00", "quantity": "t", "value": 1}', "no time zone"),
    ('{"node": "n1", "zone": "A", "time": 1, "quantity": "t", "value": 1, "accuracy": -1}', "'accuracy'"),
    ('{"node": "n1", "zone": "A", "time": 1, "event": "hello"}', "unknown event"),
    ('{"node": "n1", "zone": "A", "time": 1, "quantity": "t", "value": 1, "node_time": "5"}', "'node_time'"),
    ('{"node": "n1", "zone": "A", "time": 1, "quantity": "t", "value": 1, "quarantined": 1}', "true or false"),
])
def test_bad_line_names_the_line(tmp_path, capsys, bad, message):
    lines = sample_lines()
    lines.insert(2, bad)
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines))
    code, out, err = run_cli(capsys, [str(path)])
    assert code == 2 and out == []
    assert "line 3: " in err and message in err and "--skip-bad" in err
    assert "Traceback" not in err


def test_skip_bad_counts_and_continues(tmp_path, capsys):
    lines = sample_lines()
    lines[1:1] = ["{oops", '{"node": "n9"}']
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines))
    code, out, err = run_cli(capsys, ["--skip-bad", str(path)])
    assert code == 0 and len(out) == 3
    assert "skipped 2 bad line(s)" in err and "line 2" in err


def test_iso_times_and_security_events(capsys, monkeypatch):
    lines = [line(f"n{i}", "A", "2026-11-25T20:00:05Z", "t", 20.0 + i / 10) for i in range(1, 5)]
    lines.append(json.dumps({"node": "n2", "zone": "A", "time": T0 + 7, "event": "replay"}))
    code, out, _ = run_cli(capsys, [], stdin="\n".join(lines), monkeypatch=monkeypatch)
    assert code == 0 and out[0]["window_start"] == T0
    f = out[0]["faults"]["n2"]
    assert f["class"] == "spoofing" and f["action"]["kind"] == "quarantine"
    assert f["evidence"]["security_events"] == {"replay": 1}


@pytest.mark.parametrize("argv, message", [
    (["--window", "0"], "--window must be a positive"),
    (["--allowance", "x=1"], "--allowance 'x=1'"),
    (["--allowance", "t=warm"], "not a number"),
    (["--max-faulty", "-1"], "--max-faulty"),
    (["--since", "1h"], "--since/--until work with --db"),
    (["/nonexistent/r.jsonl"], "cannot read"),
    (["--db", "/nonexistent/m.db"], "does not exist"),
    (["--db", "x.db", "file.jsonl"], "either an input FILE or --db"),
])
def test_option_errors(capsys, argv, message):
    code, out, err = run_cli(capsys, argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_offsets_file(tmp_path, capsys, monkeypatch):
    offsets = tmp_path / "off.json"
    offsets.write_text(json.dumps({"n4": {"t": 7.9}}))
    code, out, _ = run_cli(capsys, ["--offsets", str(offsets)], stdin="\n".join(sample_lines()[:4]),
                           monkeypatch=monkeypatch)
    assert out[0]["falsetickers"] == []  # 30.0 - 7.9 = 22.1 agrees
    bad = tmp_path / "bad.json"
    bad.write_text('{"n4": {"t": "x"}}')
    code, out, err = run_cli(capsys, ["--offsets", str(bad)], stdin="", monkeypatch=monkeypatch)
    assert code == 2 and "--offsets" in err


# -- from the monitor's store ------------------------------------------------------------


@dataclass
class F:
    kind: str
    node: str
    boot: int
    seq: int
    fields: dict = field(default_factory=dict)


def test_from_store_converts_protocol_units(tmp_path, capsys):
    db = tmp_path / "m.db"
    # protocol integers: t in 0.01 °C, p in Pa, h in 1/1024 %RH
    rows = {"n1": (2210, 100512, 51200), "n2": (2230, 100530, 52224), "n3": (2190, 100490, 50176),
            "n4": (3000, 100500, 51712)}
    with Store(db) as store:
        for i, (node, (t, p, h)) in enumerate(rows.items()):
            store.upsert_node(node, seen=T0, zone="A")
            store.add_frame(T0 + 5 + i, "sim:" + node, F("reading", node, 1, 1, {"t": t, "p": p, "h": h}))
            store.add_frame(T0 + 6 + i, "sim:" + node, F("hello", node, 1, 0, {"fw": "x"}))
        store.add_frame(T0 + 9, "sim:n7", F("reading", "n7", 1, 1, {"t": 2200, "p": 100500, "h": 51200}))
        # the monitor's authentication reject (docs/monitor.md): a forged frame claiming n2
        store.add_event(T0 + 20, "sim:n2", "n2", "security", boot=1, seq_from=9, count=1,
                        detail="forged @CNP1 n2 1 9 R t=9999 *00000000")
    code, out, err = run_cli(capsys, ["--db", str(db)])
    assert code == 0, err
    got = {(v["zone"], v["quantity"]): v for v in out}
    assert set(got) == {("A", "p"), ("A", "t"), ("A", "h"), ("unassigned", "p"), ("unassigned", "t"),
                        ("unassigned", "h")}
    t = got[("A", "t")]
    assert t["value"] == pytest.approx(22.10) and t["falsetickers"] == ["n4"]
    assert t["faults"]["n2"]["class"] == "spoofing"
    assert t["faults"]["n2"]["evidence"]["security_events"] == {"forged": 1}
    assert t["faults"]["n1"]["class"] == "ok"
    p = got[("A", "p")]
    assert p["value"] == pytest.approx((1005.00 + 1005.12) / 2)  # hPa; median of four
    h = got[("A", "h")]
    assert h["value"] == pytest.approx((51200 / 1024 + 51712 / 1024) / 2)  # %RH; the middle two of four
    # --since/--until filter by receive time
    code, out, err = run_cli(capsys, ["--db", str(db), "--until", "2026-11-25T20:00:05Z"])
    assert {v["zone"] for v in out} == {"A"} and all(v["n"] == 1 for v in out)


def test_real_command_in_a_pipe(tmp_path):
    exe = Path(sys.executable).parent / "canopy"
    data = "\n".join(sample_lines() * 3) + "\n"
    r = subprocess.run([str(exe), "consensus", "-"], input=data, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # duplicated lines: each node's window holds three equal readings, same verdicts
    assert len(r.stdout.splitlines()) == 3
    r = subprocess.run([str(exe), "consensus"], input="{bad\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "stdin line 1" in r.stderr and "Traceback" not in r.stderr


# -- quarantine per window (--db) ------------------------------------------------------------


def _quarantine_store(db, plan):
    """Four nodes of zone A, one reading per node every 20 s for six 60 s windows. n4 reads
    30 °C throughout (far from the others' 22 °C); plan(k) -> its failsafe field for its
    k-th reading (bit 2: the repair agent holds it in quarantine, docs/protocol.md)."""
    with Store(db) as store:
        for node in ("n1", "n2", "n3", "n4"):
            store.upsert_node(node, seen=T0, zone="A")
        for k in range(18):
            for i, node in enumerate(("n1", "n2", "n3", "n4")):
                held = plan(k) if node == "n4" else 0
                t = 3000 if node == "n4" else 2200 + 5 * i
                store.add_frame(T0 + 20 * k + 1 + i, "sim:" + node, F("reading", node, 1, k, {
                    "t": t, "p": 100500, "h": 51200, "failsafe": held, "tick": 20 * k}))


def _t_windows(out):
    return {(v["window_start"] - T0) // 60: v for v in out if v["quantity"] == "t"}


def test_db_quarantine_holds_per_window_not_by_the_latest_state(tmp_path, capsys):
    db = tmp_path / "m.db"
    # n4: quarantined from its reading at 2:01 (window 2) to its release at 4:01 (window 4).
    _quarantine_store(db, lambda k: 2 if 6 <= k < 12 else 0)
    code, out, err = run_cli(capsys, ["--db", str(db), "--window", "60"])
    assert code == 0, err
    t = _t_windows(out)
    assert sorted(t) == [0, 1, 2, 3, 4, 5]
    for w in (0, 1, 4, 5):  # before the quarantine and after the release: it votes (and is voted out)
        assert t[w]["n"] == 4 and t[w]["falsetickers"] == ["n4"], w
    for w in (2, 3):  # quarantined: out of the vote
        assert t[w]["n"] == 3 and "n4" not in t[w]["truechimers"] + t[w]["falsetickers"], w
    assert "quarantined per the store (out of the vote): n4 (2 of 6 windows)" in err


def test_db_node_quarantined_at_the_end_voted_before(tmp_path, capsys):
    db = tmp_path / "m.db"
    # Quarantined from its reading at 3:21 (window 3) on; the window it happens in ends
    # quarantined, so it is out of it too.
    _quarantine_store(db, lambda k: 2 if k >= 10 else 0)
    code, out, err = run_cli(capsys, ["--db", str(db), "--window", "60"])
    t = _t_windows(out)
    assert [t[w]["n"] for w in range(6)] == [4, 4, 4, 3, 3, 3]
    assert all(t[w]["falsetickers"] == ["n4"] for w in (0, 1, 2))
    # The same store from the window after the quarantine on: out of every window.
    code, out, err = run_cli(capsys, ["--db", str(db), "--window", "60", "--since", "2026-11-25T20:04:00Z"])
    assert [v["n"] for v in out if v["quantity"] == "t"] == [3, 3]


def test_json_lines_carry_quarantine_and_node_clock(capsys, monkeypatch):
    """The JSON input says the same as the store: `quarantined` per reading, and the
    node's own clock, on which slews are judged (here readings received 60x fast)."""
    rows = []
    for w in range(14):
        for i, node in enumerate(("n1", "n2", "n3", "n4")):
            value = 22.0 + 0.01 * i + (1.25 * (w - 5) if node == "n2" and w >= 6 else 0.0)  # drifts 1.25 °C/min
            rows.append(line(node, "A", T0 + w + 0.01 * i, "t", round(value, 2), node_time=60.0 * w + i,
                             quarantined=node == "n4" and w >= 10))
    code, out, err = run_cli(capsys, ["--window", "1"], stdin="\n".join(rows), monkeypatch=monkeypatch)
    assert code == 0, err
    assert [v["n"] for v in out] == [4] * 10 + [3] * 4
    n2 = [v["faults"]["n2"]["class"] for v in out]
    assert "spoofing" not in n2 and "drift" in n2  # 1.25 °C per node minute: a drift, not a takeover


def test_node_clock_runs_on_across_a_reboot():
    from canopy_host.consensus_cmd import NodeClock

    clock = NodeClock()
    # A virtual node at 60x: 600 ticks (1 s each) in 10 receive seconds.
    assert clock.at("n1", 1, 0, 100.0) == 0
    assert clock.at("n1", 1, 600, 110.0) == 600
    # Rebooted: its tick restarts. The 2 receive seconds it was away count at its own rate.
    assert clock.at("n1", 2, 1, 112.0) == pytest.approx(600 + 2 * 60)
    assert clock.at("n1", 2, 61, 113.0) == pytest.approx(600 + 2 * 60 + 60)
    assert clock.at("n2", 1, 5, 113.0) == 5  # every node on its own clock
    assert clock.at("n1", 2, None, 114.0) is None  # a frame without a tick says nothing
