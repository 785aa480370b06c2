"""The authenticated link end to end: `canopy sim --master-key` nodes (the firmware's
main.py, strict mode) -> ptys -> `canopy monitor` verifying every frame -> SQLite.

The test sits on the line between the nodes and the monitor (a tap: it reads each
node's pty and forwards whole lines to a pty of its own that the monitor follows), so
it can put frames on the line between two genuine ones: a forged reading, a replayed
one, one tagged with another node's key, an untagged one and one from an older boot.
It also sends commands through the same line: a tagged `status` is answered, the very
same bytes sent again are refused by the node (`err=auth msg=replay`, `E code=security`).

Tags are computed here from the spec (docs/security.md, Python's `hmac`), not with the
code under test.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tty
import zlib
from pathlib import Path

import pytest

MASTER = bytes(range(100, 132))
SPEED = 20  # simulated s per wall s: each node sends ~20 readings per wall second
MONITOR_S = 120.0  # an upper bound: the test stops the monitor with Ctrl-C when done


class Lines(threading.Thread):
    """Collects a pipe's lines as they come (the monitor's JSON frames)."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.lines: list[bytes] = []

    def run(self) -> None:
        for line in iter(self.pipe.readline, b""):
            self.lines.append(line)

    def wait_json(self, pred, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ln in list(self.lines):
                d = json.loads(ln)
                if pred(d):
                    return d
            time.sleep(0.05)
        raise AssertionError("the monitor never reported such a frame")


def _canopy(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "canopy_host.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def node_key(nid: str) -> bytes:
    return hmac.new(MASTER, b"canopy/node-key/v1/" + nid.encode(), hashlib.sha256).digest()


def seal(body: bytes, key: bytes | None) -> bytes:
    """A frame line from its body (`@CNP1 ... payload`): tag (if a key) and CRC as specified."""
    if key is not None:
        body += b" !" + hmac.new(key, body, hashlib.sha256).digest()[:16].hex().encode()
    return body + b" *%08x\n" % zlib.crc32(body)


def body_of(line: bytes) -> bytes:
    """The part of a tagged frame line that the tag covers."""
    return line[: line.rindex(b" !")]


class Tap(threading.Thread):
    """Forwards one node's pty to a pty the monitor reads, whole lines at a time."""

    def __init__(self, node_path: str) -> None:
        super().__init__(daemon=True)
        from canopy_host.transport import open_port

        self.node = open_port(node_path, 115200)
        self.node.timeout = 0.05
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.lines: list[bytes] = []  # every genuine line forwarded, without its LF
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        buf = b""
        while not self.stop.is_set():
            buf += self.node.read(4096)
            *whole, buf = buf.split(b"\n")
            for line in whole:
                with self.lock:
                    os.write(self.master, line + b"\n")
                    self.lines.append(line.rstrip(b"\r"))

    def inject(self, line: bytes) -> None:
        with self.lock:  # between two genuine lines, never inside one
            os.write(self.master, line)

    def command(self, line: bytes) -> None:
        self.node.write(line)

    def wait_for(self, pattern: bytes, since: int = 0, timeout: float = 15) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for ln in self.lines[since:]:
                    if re.search(pattern, ln):
                        return ln
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}; last lines: {self.lines[-5:]}")

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.node.close()
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.slow
def test_strict_nodes_verified_by_monitor_and_rejects_stored(tmp_path: Path) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_text(MASTER.hex() + "\n")
    state = tmp_path / "state.json"
    sim = _canopy("sim", "--nodes", "2", "--speed", str(SPEED), "--dir", str(tmp_path / "sim"), "--state",
                  str(state), "--duration", "60", "--master-key", str(key_file))
    taps: dict[str, Tap] = {}
    mon = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not state.exists():
            time.sleep(0.05)
        assert state.exists(), sim.stderr.read1() if sim.stderr else b""
        st = json.loads(state.read_text())
        assert Path(st["master_key_file"]) == key_file.resolve()  # what the monitor will find
        assert {n["node_id"]: n["auth"] for n in st["nodes"]} == {"n01": "strict", "n02": "strict"}
        for n in st["nodes"]:
            taps[n["node_id"]] = Tap(n["port"])
            taps[n["node_id"]].start()
        # The monitor follows the taps through a state file of the same shape, which also
        # names the key: no --master-key on its command line.
        tap_state = tmp_path / "tap-state.json"
        tap_state.write_text(json.dumps({"master_key_file": st["master_key_file"], "nodes": [
            {"node_id": nid, "zone": "A", "pty": t.path} for nid, t in taps.items()]}))
        db = tmp_path / "m.db"
        mon = _canopy("monitor", "--sim-state", str(tap_state), "--db", str(db), "--json",
                      "--duration", str(MONITOR_S))
        mon_out = Lines(mon.stdout)
        mon_out.start()
        t1 = taps["n01"]
        # A reading the monitor has taken (opening a port drops what was waiting in it, so
        # only what it reported is known to have been seen): the one to replay.
        seen = mon_out.wait_json(lambda d: d["node"] == "n01" and d["kind"] == "reading")
        mon_out.wait_json(lambda d: d["node"] == "n02")
        boot, seq = seen["boot"], seen["seq"]
        reading = t1.wait_for(rb"^@CNP1 n01 %d %d R " % (boot, seq))

        # 1. forged: a genuine reading with one digit of its payload changed, CRC fixed up
        head, payload = reading.split(b" R ", 1)
        changed = payload.replace(b",", b"9,", 1)
        forged = seal(head + b" R " + changed[: changed.rindex(b" *")], None)
        # 2. replay: the genuine reading again, byte for byte
        replay = reading + b"\n"
        # 3. cross-node: claims to be n02, tagged with n01's key (a captured n01)
        cross = seal(b"@CNP1 n02 1 5 E code=failsafe arg=1", node_key("n01"))
        # 4. unauthenticated: no tag at all
        unauth = seal(b"@CNP1 n01 %d %d E code=failsafe arg=1" % (boot, seq + 1000), None)
        # 5. rollback: correctly tagged, but from a boot before the current one
        rollback = seal(b"@CNP1 n01 %d 3 E code=failsafe arg=0" % (boot - 1), node_key("n01"))
        injected = {"forged": forged, "replay": replay, "cross_node": cross, "unauth": unauth,
                    "rollback": rollback}
        for line in injected.values():
            t1.inject(line)
            time.sleep(0.1)

        # A tagged command: answered. The same bytes again: refused as a replay.
        from canopy_host.protocol import encode_command

        counter = 7
        body = encode_command("n01", counter, "status")
        body = body[: body.rindex(b" *")]
        cmd = seal(body, node_key("n01"))
        mark = len(t1.lines)
        t1.command(cmd)
        ok = t1.wait_for(rb"^@CNP1 n01 \d+ \d+ A re=%d cmd=status ok=1 " % counter, mark)
        assert b" auth=strict " in ok and b" sec_rejects=0 " in ok
        mark = len(t1.lines)
        t1.command(cmd)
        refused = t1.wait_for(rb"^@CNP1 n01 \d+ \d+ X re=%d err=auth msg=replay " % counter, mark)
        t1.wait_for(rb"^@CNP1 n01 \d+ \d+ E code=security arg=3 ", mark)  # REASONS: replay = 3
        # Its own frames are tagged under its key (checked here independently of the monitor).
        for line in (ok, refused):
            tag = line[line.rindex(b" !") + 2: line.rindex(b" *")]
            assert hmac.new(node_key("n01"), body_of(line), hashlib.sha256).digest()[:16].hex().encode() == tag

        # The refusal has reached the monitor too: then stop it as Ctrl-C would.
        mon_out.wait_json(lambda d: d["node"] == "n01" and d["fields"].get("code") == "security")
        mon.send_signal(signal.SIGINT)
        mon.wait(timeout=60)
        mon_out.join(10)
        out, err = b"".join(mon_out.lines), mon.stderr.read()
    finally:
        if mon is not None and mon.poll() is None:
            mon.kill()
        for t in taps.values():
            t.close()
        sim.send_signal(signal.SIGINT)
        try:
            sim.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.communicate()
    assert mon.returncode == 0, err.decode()
    assert b"Traceback" not in err

    con = sqlite3.connect(db)
    events = con.execute("SELECT node, boot, seq_from, detail FROM link_events WHERE kind = 'security'").fetchall()
    # Exactly the injected frames were refused: every genuine frame of both nodes verified.
    verdicts = {d.split(" ", 1)[0]: (node, d.split(" ", 1)[1]) for node, _b, _s, d in events}
    assert sorted(verdicts) == sorted(injected) and len(events) == len(injected), events
    for verdict, line in injected.items():
        assert verdicts[verdict][1] == line.rstrip(b"\n").decode()  # raw bytes kept as evidence
    assert verdicts["cross_node"][0] == "n02"  # stored under the node it claims to be
    # None of them is data: each (node, boot, seq) in `frames` appears once (the replay
    # was not stored again) and is one the node really sent.
    rows = con.execute("SELECT node, boot, seq, kind, extra FROM frames").fetchall()
    assert len(rows) == len({(n, b, s) for n, b, s, _k, _e in rows})
    genuine = {nid: {tuple(int(x) for x in ln.split()[2:4]) for ln in t.lines if ln.startswith(b"@CNP1 " + nid.encode())}
               for nid, t in taps.items()}
    for n, b, s, _k, _e in rows:
        assert (b, s) in genuine[n]
    per_node = dict(con.execute("SELECT node, COUNT(*) FROM frames GROUP BY node"))
    assert per_node["n01"] >= 5 and per_node["n02"] >= 5  # genuine frames of both, all verified
    # The node's refusal travelled as a genuine (tagged) frame and is stored as data.
    assert con.execute("SELECT COUNT(*) FROM frames WHERE node='n01' AND kind='event' "
                       "AND extra LIKE '%\"code\":\"security\"%'").fetchone()[0] == 1
    con.close()

    # JSON output carries only verified frames; the summary counts the rejects per node.
    jframes = [json.loads(ln) for ln in out.splitlines()]
    assert len(jframes) == len(rows)
    text = err.decode()
    assert "authentication: 5 frame(s) rejected" in text
    n01 = next(ln for ln in text.splitlines() if ln.strip().startswith("n01 "))
    assert "auth rejects 4 forged=1 replay=1 rollback=1 unauth=1" in n01, n01
    assert "refused commands 1" in n01
    n02 = next(ln for ln in text.splitlines() if ln.strip().startswith("n02 "))
    assert "auth rejects 1 cross_node=1" in n02, n02


def _main_py(folder: Path, sim: dict, stdin: bytes, **env_extra: str) -> subprocess.CompletedProcess[bytes]:
    """firmware/main.py as the unix port runs it for a virtual node, commands on stdin."""
    from canopy_host.paths import FIRMWARE_DIR, micropython_command
    from canopy_host.unixport import micropython_env

    (folder / "sim.json").write_text(json.dumps(sim))
    env = micropython_env()
    env.update({"CANOPY_SPEED": "0", "CANOPY_RUN_S": "20", **env_extra})
    return subprocess.run(micropython_command() + [str(FIRMWARE_DIR / "main.py")], cwd=folder, env=env,
                          input=stdin, capture_output=True, timeout=60)


def _answers(out: bytes, nid: str) -> dict[int, bytes]:
    return {int(m.group(1)): ln for ln in out.splitlines()
            if (m := re.match(rb"^@CNP1 " + nid.encode() + rb" \d+ \d+ [AX] re=(\d+) ", ln))}


def test_main_py_link_modes(tmp_path: Path) -> None:
    """main.py builds the authenticated link: locked without a key (commands refused),
    dev only when enabled (commands run, loud warning), strict with a key file."""
    from canopy_host.protocol import encode_command

    status = encode_command("m01", 5, "status")
    # No key file, dev mode not enabled: locked. Refused, and it says why.
    locked = tmp_path / "locked"
    locked.mkdir()
    proc = _main_py(locked, {"node_id": "m01", "seed": 1}, status)
    assert proc.returncode == 0, proc.stderr
    assert b"no key file: commands are refused" in proc.stdout
    assert b" err=auth msg=unauth " in _answers(proc.stdout, "m01")[5]
    assert re.search(rb"^@CNP1 m01 \d+ \d+ E code=security arg=1 ", proc.stdout, re.M)
    # Dev mode from sim.json (what `canopy sim` writes without --master-key) or CANOPY_AUTH.
    for name, sim, env in (("dev-sim", {"auth": "dev"}, {}), ("dev-env", {}, {"CANOPY_AUTH": "dev"})):
        folder = tmp_path / name
        folder.mkdir()
        proc = _main_py(folder, {"node_id": "m01", "seed": 1, **sim}, status, **env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count(b"UNAUTHENTICATED DEV MODE") == 1  # once per boot
        reply = _answers(proc.stdout, "m01")[5]
        assert b" A re=5 cmd=status ok=1 " in reply and b" auth=dev " in reply
        assert b" !" not in reply  # dev frames are untagged
    # A key file for this node: strict, even with dev mode asked for. An untagged command
    # is refused; a tagged one runs; its reply is tagged under the node's key.
    strict = tmp_path / "strict"
    strict.mkdir()
    (strict / "canopy_key.json").write_text(json.dumps({"v": 1, "node_id": "m01", "key": node_key("m01").hex()}))
    body = status[: status.rindex(b" *")].replace(b" 5 C ", b" 6 C ")
    proc = _main_py(strict, {"node_id": "m01", "seed": 1, "auth": "dev"}, status + seal(body, node_key("m01")))
    assert proc.returncode == 0, proc.stderr
    assert b"DEV MODE" not in proc.stdout
    answers = _answers(proc.stdout, "m01")
    assert b" err=auth msg=unauth " in answers[5]
    assert b" A re=6 cmd=status ok=1 " in answers[6] and b" auth=strict " in answers[6]
    tag = answers[6][answers[6].rindex(b" !") + 2: answers[6].rindex(b" *")]
    assert hmac.new(node_key("m01"), body_of(answers[6]), hashlib.sha256).digest()[:16].hex().encode() == tag


def test_protocol_doc_tag_examples_verify() -> None:
    """The tagged examples in docs/protocol.md are real: tags under the key the text names."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    assert "master key bytes 0x00..0x1f" in doc
    master = bytes(range(32))
    key = hmac.new(master, b"canopy/node-key/v1/a4cf12e8d0b4", hashlib.sha256).digest()
    tagged = [ln.encode() for ln in doc.splitlines() if ln.startswith("@CNP1 a4cf12e8d0b4 ") and " !" in ln]
    assert len(tagged) == 3
    for line in tagged:
        tag = line[line.rindex(b" !") + 2: line.rindex(b" *")]
        assert hmac.new(key, body_of(line), hashlib.sha256).digest()[:16].hex().encode() == tag, line


def test_collector_counts_rejects_and_the_dashboard_shows_them(tmp_path: Path) -> None:
    """In process: a genuine tagged reading is data, a tampered copy is a security event,
    and the dashboard (wide and compact) shows the reject."""
    import io

    from rich.console import Console

    from canopy_host.dashboard import render
    from canopy_host.monitor import Collector, PortSpec
    from canopy_host.protocol import FrameParser
    from canopy_host.security import HostAuth
    from canopy_host.store import Store

    good = seal(b"@CNP1 n01 3 0 E code=boot arg=3", node_key("n01"))
    bad = good.replace(b"arg=3", b"arg=4")
    bad = bad[: bad.rindex(b" *")] + b" *%08x\n" % zlib.crc32(bad[: bad.rindex(b" *")])
    store = Store(tmp_path / "c.db")
    c = Collector(store, auth=HostAuth(MASTER, tmp_path / "ctr.json"), clock=lambda: 1000.0)
    ps = c.add_port(PortSpec(label="/dev/pts/1", path="/dev/pts/1"))
    parser = FrameParser()
    c.ingest(ps, parser, parser.feed(good + bad + good), 1000.0)  # genuine, forged, replayed
    store.close()
    summary = c.summary()
    assert summary["sec_rejects"] == 2
    assert summary["nodes"]["n01"]["security"] == {"forged": 1, "replay": 1}
    assert summary["nodes"]["n01"]["frames"] == 1 and summary["nodes"]["n01"]["duplicates"] == 0
    con = sqlite3.connect(tmp_path / "c.db")
    assert con.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 1
    details = [d for (d,) in con.execute("SELECT detail FROM link_events WHERE kind='security' ORDER BY id")]
    assert details == ["forged " + bad.decode().rstrip("\n"), "replay " + good.decode().rstrip("\n")]
    nodes, ports = c.snapshot()
    for width, want in ((300, "2 forged 1,replay 1"), (120, "auth rej")):
        con_ = Console(record=True, width=width, file=io.StringIO())
        con_.print(render(nodes, ports, [], 1000.0, "t", width=width))
        text = con_.export_text()
        assert want in text, text


def test_monitor_finds_the_key_a_sim_recorded(tmp_path: Path) -> None:
    import argparse

    from canopy_host.monitor_cmd import master_key_file

    state = tmp_path / "state.json"
    state.write_text(json.dumps({"master_key_file": "/keys/mesh.key", "nodes": []}))
    ns = lambda **kw: argparse.Namespace(**{"master_key": None, "sim_state": None, "no_auth": False, **kw})  # noqa: E731
    assert master_key_file(ns(sim_state=str(state))) == Path("/keys/mesh.key")
    assert master_key_file(ns(sim_state=str(state), master_key="own.key")) == Path("own.key")
    assert master_key_file(ns(sim_state=str(state), no_auth=True)) is None
    assert master_key_file(ns()) is None
    # A key file that is not there is a clear error, not a traceback.
    proc = subprocess.run([sys.executable, "-m", "canopy_host.cli", "monitor", "--master-key",
                           str(tmp_path / "missing.key"), "--duration", "1", "socket://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "missing.key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_runs_strict_and_its_replayed_command_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "canopy_host.cli", "demo", "--duration", "6", "--speed", "40",
                           "--nodes", "4", "--zones", "1", "--no-repair", "--plain", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    assert "attack: a command to n03 replayed" in out  # the one node no fault touches
    assert "0 frame(s) rejected by the monitor, 1 command(s) refused by the nodes" in out
    assert "replay attack on n03: refused by the node" in out
    assert (tmp_path / "mesh.key").stat().st_mode & 0o077 == 0  # the demo's own key, owner-only
    db = Path(re.search(r"database: (\S+)", out).group(1))
    con = sqlite3.connect(db)
    refusals = con.execute("SELECT node, extra FROM frames WHERE kind='error' AND extra LIKE '%auth%'").fetchall()
    assert [(n, json.loads(e)["msg"]) for n, e in refusals] == [("n03", "replay")]
    assert con.execute("SELECT COUNT(*) FROM link_events WHERE kind='security'").fetchone()[0] == 0
    con.close()
    # Every node ran strict: its key file is the one derived from the demo's key.
    master = bytes.fromhex((tmp_path / "mesh.key").read_text().strip())
    for nid in ("n01", "n02", "n03", "n04"):
        kf = json.loads((tmp_path / "sim" / nid / "canopy_key.json").read_text())
        assert kf["key"] == hmac.new(master, b"canopy/node-key/v1/" + nid.encode(), hashlib.sha256).hexdigest()
