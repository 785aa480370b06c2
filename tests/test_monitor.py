"""`canopy monitor`'s collector against pseudo-terminals the test drives byte by byte.

Frames are produced by the REAL node encoder (firmware/canopy/protocol.py) in the
unix port, in one interpreter start, so these tests check the monitor against what a
node actually sends; the host parser is the protocol helper's `FrameParser`.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

import pytest

from canopy_host.monitor import Collector, PortReader, read_sim_state, sim_specs
from canopy_host.store import Store, decode_fields
from canopy_host.unixport import run_code

_GEN = r"""
import sys, json
from canopy.protocol import Encoder
for node, boot, seq, kind in json.loads(sys.stdin.read()):
    e = Encoder(node, boot)
    e.seq = seq
    if kind == "R":
        n = e.reading((519888 + seq, 415148, 30000), (2500 + seq, 100000 + seq, 40000 + seq),
                      (seq * 10, 0, 2500), 0, 0, seq, (seq, -seq, 0))
    elif kind == "H":
        n = e.hello("unix-sim", "0.1.0", "abcd1234", 1, "beef")
    else:
        n = e.event("fault", seq)
    sys.stdout.write(bytes(e.buf[:n]).decode())
"""


def make_frames(specs: list[tuple[str, int, int, str]]) -> dict[tuple[str, int, int], bytes]:
    """(node, boot, seq, 'R'|'H'|'E') -> the node encoder's line, all in one unix-port run."""
    proc = run_code(_GEN, stdin=json.dumps(specs), timeout=60)
    lines = proc.stdout.encode().splitlines(keepends=True)
    assert proc.returncode == 0 and len(lines) == len(specs), proc.stderr
    return {(n, b, s): line for (n, b, s, _), line in zip(specs, lines)}


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Pty:
    """A pty pair: the monitor opens `path` (the slave); the test plays the node on the master."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no CR/LF translation: a clean byte pipe
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def write_state(path: Path, node: str, port: str | None) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"nodes": [{"node_id": node, "zone": "A", "port": port, "usb_serial": "SIM-" + node}]}))
    tmp.replace(path)


@pytest.fixture(scope="module")
def frames() -> dict[tuple[str, int, int], bytes]:
    specs = [("n01", 5, 0, "H")] + [("n01", 5, s, "R") for s in range(1, 25)]
    specs += [("n01", 6, 0, "H")] + [("n01", 6, s, "R") for s in range(1, 10)] + [("n01", 6, 10, "E")]
    specs += [("n02", 9, s, "R") for s in range(300)]
    return make_frames(specs)


def corrupt(line: bytes) -> bytes:
    # Change one payload digit, keep the CRC: exactly one CRC error.
    i = line.index(b" R ") + 3
    digit = line[i:i + 1]
    return line[:i] + (b"1" if digit != b"1" else b"2") + line[i + 1:]


def test_collector_rows_and_link_events(tmp_path, frames):
    f = lambda boot, seq: frames[("n01", boot, seq)]  # noqa: E731
    db = tmp_path / "m.db"
    state = tmp_path / "state.json"
    pty1 = Pty()
    write_state(state, "n01", pty1.path)
    store = Store(db)
    collector = Collector(store)
    spec = sim_specs(state)[0]
    ps = collector.add_port(spec)
    reader = PortReader(ps, collector, backoff_min=0.05, backoff_max=0.2)
    reader.start()
    pty2 = None
    try:
        wait_for(lambda: ps.connects == 1, what="first connect")
        garbage = b"\x00\xff\x13\x37junk"
        pty1.write(b"".join(f(5, s) for s in range(0, 10)))
        pty1.write(garbage + f(5, 10))  # garbage, then a frame on the same line
        pty1.write(corrupt(f(5, 11)) + f(5, 12))  # 11 fails its CRC -> missing
        pty1.write(b"".join(f(5, s) for s in range(16, 20)))  # 13..15 dropped
        pty1.write(f(5, 17))  # a repeat
        pty1.write(b"Traceback (most recent call last):\r\n")
        pty1.write(b"".join(f(5, s) for s in range(20, 25)))
        pty1.write(b"".join(f(6, s) for s in range(0, 5)))  # the node rebooted
        wait_for(lambda: collector.nodes["n01"].frames == 27, what="27 frames before unplug")
        pty1.unplug()
        wait_for(lambda: ps.disconnects == 1, what="disconnect")
        write_state(state, "n01", None)  # unplugged: the sim lists no port for a while
        time.sleep(0.3)
        pty2 = Pty()
        write_state(state, "n01", pty2.path)  # replugged at a new path
        wait_for(lambda: ps.connects == 2, what="reconnect at the new path")
        pty2.write(b"".join(f(6, s) for s in range(5, 11)))
        wait_for(lambda: collector.nodes["n01"].frames == 33, what="33 frames")
    finally:
        reader.stop()
        reader.join(5)
        store.close()
        if pty2 is not None:
            pty2.unplug()

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [(r["boot"], r["seq"], r["kind"], r["port"], r["t"], r["p"], r["h"], r["shade"], decode_fields(r))
            for r in con.execute("SELECT * FROM frames ORDER BY id")]
    expected = [(5, s) for s in [*range(0, 11), 12, 16, 17, 18, 19, 17, *range(20, 25)]]
    expected += [(6, s) for s in range(0, 11)]
    assert [(b, s) for b, s, *_ in rows] == expected
    for boot, seq, kind, port, t, p, h, shade, fields in rows:
        assert port == (pty1.path if (boot, seq) < (6, 5) else pty2.path)
        if seq == 0:
            assert kind == "hello" and fields["board"] == "unix-sim"
        elif (boot, seq) == (6, 10):
            assert kind == "event" and fields["code"] == "fault"
        else:
            assert kind == "reading"
            assert (t, p, h, shade) == (2500 + seq, 100000 + seq, 40000 + seq, seq * 10)
            assert fields["i_mist"] == -seq

    con.row_factory = None
    events = con.execute(
        "SELECT kind, node, boot, seq_from, seq_to, count, detail FROM link_events ORDER BY id").fetchall()
    ordered = [e[:6] for e in events if e[0] not in ("text", "garbage", "open_failed")]
    assert ordered == [
        ("connect", "n01", None, None, None, None),
        ("crc_error", "n01", None, None, None, 1),
        ("gap", "n01", 5, 11, 11, None),
        ("gap", "n01", 5, 13, 15, None),
        ("duplicate", "n01", 5, 17, None, None),
        ("reboot", "n01", 6, None, None, None),
        ("disconnect", "n01", None, None, None, None),
        ("connect", "n01", None, None, None, None),
    ]
    assert [e[6] for e in events if e[0] == "connect"] == [pty1.path, pty2.path]
    texts = [e[6] for e in events if e[0] == "text"]
    assert any("Traceback (most recent call last):" in t for t in texts)
    garbage_counted = sum(e[5] for e in events if e[0] == "garbage")
    assert garbage_counted >= 4  # at least the non-printable junk bytes

    st = collector.nodes["n01"]
    assert (st.gaps, st.missing, st.duplicates, st.reboots, st.crc_errors, st.disconnects) == (2, 4, 1, 1, 1, 1)
    assert st.gap_ranges == [(5, 11, 11), (5, 13, 15)]
    node_row = con.execute("SELECT zone, usb_serial, board, fw_version FROM nodes WHERE node='n01'").fetchone()
    assert node_row == ("A", "SIM-n01", "unix-sim", "0.1.0")


class _Fake:
    def __init__(self, node: str, boot: int, seq: int, kind: str = "reading") -> None:
        self.node, self.boot, self.seq, self.kind, self.fields = node, boot, seq, kind, {}


def test_gap_detection_across_seq_wrap_and_first_frames_after_reboot(tmp_path):
    from canopy_host.monitor import PortSpec, SEQ_MODULUS

    collector = Collector(None)
    ps = collector.add_port(PortSpec(label="x", path="x"))
    top = SEQ_MODULUS - 1
    seqs = [top - 3, top - 2, top, 1, 2]  # top-1 and 0 lost across the wrap
    collector.ingest(ps, object(), [_Fake("n01", 1, s) for s in seqs])
    collector.ingest(ps, object(), [_Fake("n01", 2, 3)])  # reboot, 0..2 of the new boot lost
    collector.ingest(ps, object(), [_Fake("n01", 2, 4), _Fake("n01", 2, 2)])  # 2 is behind: repeat
    st = collector.nodes["n01"]
    assert st.gap_ranges == [(1, top - 1, top - 1), (1, 0, 0), (2, 0, 2)]
    assert (st.missing, st.reboots, st.duplicates) == (5, 1, 1)


def test_many_nodes_on_many_ports_are_kept_apart(tmp_path, frames):
    """Two ports at once, one of them under heavy traffic: no frame lost or misfiled."""
    db = tmp_path / "m.db"
    ptys = [Pty(), Pty()]
    store = Store(db)
    collector = Collector(store)
    from canopy_host.monitor import explicit_specs

    states = [collector.add_port(s) for s in explicit_specs([p.path for p in ptys])]
    readers = [PortReader(s, collector) for s in states]
    for r in readers:
        r.start()
    try:
        wait_for(lambda: all(s.connects == 1 for s in states), what="connects")
        ptys[1].write(b"".join(frames[("n02", 9, s)] for s in range(300)))
        ptys[0].write(b"".join(frames[("n01", 5, s)] for s in range(25)))
        wait_for(lambda: collector.total_frames == 325, what="325 frames")
    finally:
        for r in readers:
            r.stop()
        for r in readers:
            r.join(5)
        store.close()
        for p in ptys:
            p.unplug()
    con = sqlite3.connect(db)
    per_node = dict(con.execute("SELECT node, COUNT(DISTINCT seq) FROM frames GROUP BY node").fetchall())
    assert per_node == {"n01": 25, "n02": 300}
    assert con.execute("SELECT COUNT(*) FROM link_events WHERE kind IN ('gap','duplicate','crc_error')").fetchone()[0] == 0
    ports = dict(con.execute("SELECT node, port FROM frames GROUP BY node").fetchall())
    assert ports == {"n01": ptys[0].path, "n02": ptys[1].path}


def test_read_sim_state_accepts_the_sim_format_and_rejects_junk(tmp_path, monkeypatch):
    from canopy_host.errors import CanopyError
    from canopy_host.monitor import explicit_specs

    p = tmp_path / "state.json"
    p.write_text(json.dumps({"nodes": [{"node_id": "n01", "zone": "A", "port": "/dev/pts/3", "usb_serial": "X1"},
                                       {"node_id": "n02", "zone": "B", "port": None}]}))
    assert [(e["node"], e["zone"], e["path"]) for e in read_sim_state(p)] == [("n01", "A", "/dev/pts/3"),
                                                                             ("n02", "B", None)]
    spec = sim_specs(p)[0]
    assert spec.resolve() == "/dev/pts/3"
    write_state(p, "n01", None)  # unplugged: never retry the old pty number, it may be reused
    assert spec.resolve() is None
    write_state(p, "n01", "/dev/pts/8")
    assert spec.resolve() == "/dev/pts/8"
    monkeypatch.setenv("CANOPY_SIM_STATE", str(p))
    by_id = explicit_specs(["sim:n01"])[0]  # the same node named on the command line
    assert (by_id.node_hint, by_id.resolve()) == ("n01", "/dev/pts/8")
    write_state(p, "n01", None)
    assert by_id.resolve() is None
    p.write_text("{not json")
    with pytest.raises(CanopyError, match="cannot read sim state"):
        read_sim_state(p)
    with pytest.raises(CanopyError, match="not found"):
        read_sim_state(tmp_path / "nope.json")


# -- the CLI as a subprocess ---------------------------------------------------------


def _canopy(*args: str, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "canopy_host.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **kw)


def _line_queue(stream) -> "queue.Queue[bytes]":
    q: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        for line in iter(stream.readline, b""):
            q.put(line)
        q.put(b"")

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_sigint_flushes_everything_received(tmp_path, frames):
    db = tmp_path / "m.db"
    pty = Pty()
    # A commit interval far beyond the test's length: only the shutdown flush can have
    # put the frames into the file.
    proc = _canopy("monitor", pty.path, "--db", str(db), "--json", "--commit-interval", "600")
    try:
        lines = _line_queue(proc.stdout)
        # Until the monitor has opened the port, its open() may flush what we write:
        # repeat the first frame until the monitor reports it.
        first = None
        deadline = time.monotonic() + 20
        while first is None and time.monotonic() < deadline:
            pty.write(frames[("n02", 9, 0)])
            try:
                first = lines.get(timeout=0.2)
            except queue.Empty:
                pass
        assert first, "monitor never reported a frame"
        pty.write(b"".join(frames[("n02", 9, s)] for s in range(1, 300)))
        seen = {json.loads(first)["seq"]}
        while 299 not in seen:  # every frame written is now confirmed received...
            line = lines.get(timeout=20)
            assert line, "monitor stopped early"
            seen.add(json.loads(line)["seq"])
        proc.send_signal(signal.SIGINT)  # ...and Ctrl-C comes at once, mid-batch
        proc.wait(timeout=20)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        pty.unplug()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    con = sqlite3.connect(db)
    seqs = [r[0] for r in con.execute("SELECT seq FROM frames WHERE node='n02' ORDER BY id")]
    assert seqs[-299:] == list(range(1, 300))  # each frame after the first exactly once
    assert set(seqs[:-299]) == {0}
    m = re.search(rb"(\d+) frames", err)  # the end-of-run summary agrees with the file
    assert m and int(m.group(1)) == len(seqs)


def test_bad_port_is_a_clear_error_and_the_others_are_followed(tmp_path, frames):
    db = tmp_path / "m.db"
    pty = Pty()
    proc = _canopy("monitor", "/dev/does-not-exist-0", pty.path, "--db", str(db), "--json", "--duration", "3")
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            pty.write(frames[("n02", 9, 0)])
            time.sleep(0.1)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        pty.unplug()
    assert proc.returncode == 0
    assert b"/dev/does-not-exist-0" in err and b"does not exist" in err and b"Traceback" not in err
    assert any(json.loads(line)["node"] == "n02" for line in out.splitlines())

    alone = _canopy("monitor", "/dev/does-not-exist-0", "--db", str(db), "--duration", "1")
    out, err = alone.communicate(timeout=20)
    assert alone.returncode == 2
    assert b"error" in err and b"Traceback" not in err


# -- port discovery and the dashboard --------------------------------------------------


class _Port:
    def __init__(self, device: str, vid: int | None, pid: int | None, serial: str | None) -> None:
        self.device, self.vid, self.pid, self.serial_number = device, vid, pid, serial


def test_usb_discovery_by_board_vid_pid_and_refind_by_serial(monkeypatch):
    import canopy_host.monitor as mon

    ports = [
        _Port("/dev/ttyUSB0", 0x10C4, 0xEA60, "A1B2"),  # CP210x: esp32-devkitc & co (boards/*.json)
        _Port("/dev/ttyACM0", 0x303A, 0x1001, "F4:12:FA:00:11:22"),  # Espressif USB-Serial/JTAG
        _Port("/dev/ttyUSB1", 0x0403, 0x6001, "FT1"),  # FTDI: no board uses it
        _Port("/dev/ttyS0", None, None, None),
        _Port("/dev/ttyUSB2", 0x1A86, 0x7523, "0001"),  # two CH340s with the same serial
        _Port("/dev/ttyUSB3", 0x1A86, 0x7523, "0001"),
    ]
    monkeypatch.setattr(mon, "_comports", lambda: list(ports))
    specs = {s.path: s for s in mon.discover_usb_specs()}
    assert sorted(specs) == ["/dev/ttyACM0", "/dev/ttyUSB0", "/dev/ttyUSB2", "/dev/ttyUSB3"]
    assert specs["/dev/ttyUSB2"].resolver is None  # ambiguous serial: keep the path
    # Replug: the CP2102 comes back as ttyUSB4; it is found by its serial number.
    ports[0] = _Port("/dev/ttyUSB4", 0x10C4, 0xEA60, "A1B2")
    assert specs["/dev/ttyUSB0"].resolve() == "/dev/ttyUSB4"
    ports.pop(0)  # unplugged: the last known path is kept for the next attempt
    assert specs["/dev/ttyUSB0"].resolve() == "/dev/ttyUSB4"


def test_dashboard_row_shows_latest_values_in_units():
    from rich.console import Console

    from canopy_host.dashboard import render
    from canopy_host.monitor import PortSpec

    collector = Collector(None, clock=lambda: 1000.0)
    ps = collector.add_port(PortSpec(label="/dev/pts/3", path="/dev/pts/3", zone="A"))
    idle = collector.add_port(PortSpec(label="/dev/ttyUSB9", path="/dev/ttyUSB9"))
    idle.status = "cannot open: busy"
    frames = [_Fake("n01", 4, s) for s in (0, 1, 5)]
    frames[-1].fields = {"t": 2508, "p": 100653, "h": 47445, "shade": 2550, "mist": 0, "fan": 10000,
                         "faults": 3, "failsafe": 1}
    collector.ingest(ps, object(), frames, 1000.0)
    nodes, ports = collector.snapshot()
    wide = Console(record=True, width=300, file=io.StringIO())
    wide.print(render(nodes, ports, ["/dev/ttyUSB9: cannot open"], 1000.0, "t", width=300))
    narrow = Console(record=True, width=120, file=io.StringIO())  # a common terminal width
    narrow.print(render(nodes, ports, [], 1000.0, "t", width=120))
    # 2508 -> 25.08 °C, 100653 Pa -> 1006.5 hPa, 47445/1024 -> 46.3 %RH, 2550/100 -> 26 %
    for console, wants in ((wide, ("A", "25.08", "1006.5", "46.3", "26/0/100", "FAILSAFE 0x3", "1 (3)", "gap 2..4")),
                           (narrow, ("25.08", "1006.5", "46.3", "26/0/100", "FAILSAFE 0x3", "1(3)/0/0/0"))):
        text = console.export_text()
        row = next(line for line in text.splitlines() if "n01" in line)
        for want in wants:
            assert want in row, (want, row)
        assert "…" not in row  # nothing squashed away
        assert any("ttyUSB9" in line and "cannot open" in line for line in text.splitlines())


def test_monitor_picks_up_virtual_nodes_started_later(tmp_path, frames):
    state = tmp_path / "state.json"
    ptys = {"n01": Pty()}
    write_state(state, "n01", ptys["n01"].path)
    proc = _canopy("monitor", "--sim-state", str(state), "--db", str(tmp_path / "m.db"), "--json")
    try:
        lines = _line_queue(proc.stdout)

        def until_seen(node: str, line: bytes) -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                ptys[node].write(line)
                try:
                    if json.loads(lines.get(timeout=0.2))["node"] == node:
                        return
                except queue.Empty:
                    pass
            raise AssertionError(f"monitor never reported {node}")

        until_seen("n01", frames[("n01", 5, 1)])
        ptys["n02"] = Pty()  # the sim grew a node: it appears in the state file
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nodes": [{"node_id": n, "zone": "A", "port": p.path} for n, p in ptys.items()]}))
        tmp.replace(state)
        until_seen("n02", frames[("n02", 9, 1)])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        for p in ptys.values():
            p.unplug()
    assert proc.returncode == 0
