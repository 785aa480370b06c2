"""`canopy sim`: virtual nodes on real ptys, opened with pyserial like a USB serial port.

Two supervisors run here: one with the real firmware (readings, REPL, soft reset), and
one whose nodes carry a quiet main.py so injected serial faults can be seen exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from canopy_host import transport
from canopy_host.errors import CanopyError
from canopy_host.protocol import FrameParser, encode_command
from canopy_host.sim import SimConfig, Supervisor, parse_fault

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")

REPO = Path(__file__).resolve().parents[1]


def read_until(port: serial.Serial, pattern: bytes | tuple[bytes, ...], timeout: float = 5.0) -> bytes:
    patterns = pattern if isinstance(pattern, tuple) else (pattern,)
    data = b""
    end = time.monotonic() + timeout
    while not any(p in data for p in patterns) and time.monotonic() < end:
        data += port.read(max(1, port.in_waiting))
    return data


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes, but only its parent can reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def firmware_nodes(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("sim")
    sup = Supervisor(SimConfig(nodes=2, directory=d, speed=20.0, seed=5))
    with sup:
        yield sup


# -- parsing and configuration -------------------------------------------------------------

def test_fault_spec_parsing() -> None:
    f = parse_fault("n02:stuck@300/120")
    assert (f.node, f.kind, f.at_s, f.duration_s, f.value) == ("n02", "stuck", 300.0, 120.0, None)
    f = parse_fault("3:drift=0.05@60")
    assert (f.node, f.kind, f.at_s, f.value) == ("n03", "drift", 60.0, 0.05)
    assert parse_fault("all:garbage=32").node == "all"
    assert parse_fault("*:reboot@5").node == "all"
    assert parse_fault("n01:spike=-4.5@10").sim_json() == {"at_s": 10.0, "kind": "spike", "duration_s": 0.0, "value": -4.5}
    for bad in ("n01", "n01:melt@3", "n01:stuck@", "n01:stuck@x", ":stuck", "n01:stuck/3/4",
                "n01:garbage=-3", "n01:garbage=0", "n01:garbage=2.5", "n01:garbage_inline=1e9",
                "n01:spike=1e999", "n01:spike=500", "n01:drift=1e999", "n01:stuck@1e999"):
        with pytest.raises(CanopyError):
            parse_fault(bad)
    assert parse_fault("n01:garbage=4096").value == 4096 and parse_fault("n01:spike=-40").value == -40


def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    for cfg in (
        SimConfig(nodes=0, directory=tmp_path),
        SimConfig(nodes=2, zones=3, directory=tmp_path),
        SimConfig(nodes=2, speed=-1, directory=tmp_path),
        SimConfig(nodes=2, weather="sunny-ish", directory=tmp_path),
        SimConfig(nodes=2, faults=[parse_fault("n07:stuck")], directory=tmp_path),
    ):
        with pytest.raises(CanopyError):
            Supervisor(cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "canopy_host.cli", "sim", "--nodes", "2", "--fault", "n01:melt@3",
         "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown kind 'melt'" in proc.stderr and "Traceback" not in proc.stderr


def test_open_port_errors_are_clear() -> None:
    with pytest.raises(CanopyError, match="no such device"):
        transport.open_port("/dev/does-not-exist-canopy")
    with transport.open_port("loop://", timeout=0.5) as port:  # URLs take the same path
        port.write(b"ping")
        assert port.read(4) == b"ping"


# -- real firmware on ptys -----------------------------------------------------------------

def test_two_nodes_stream_readings_on_their_ptys(firmware_nodes: Supervisor) -> None:
    state = json.loads(firmware_nodes.cfg.state_path.read_text())
    assert [n["node_id"] for n in state["nodes"]] == ["n01", "n02"]
    assert state["running"] and state["supervisor_pid"] == os.getpid()
    for entry, node in zip(state["nodes"], firmware_nodes.nodes):
        assert entry["port"] == node.port and entry["port"].startswith("/dev/pts/")
        assert os.path.realpath(entry["by_id"]) == entry["port"] and entry["serial_number"] in entry["by_id"]
        assert alive(entry["pid"])
        assert transport.resolve_port(f"sim:{entry['node_id']}", firmware_nodes.cfg.state_path) == entry["port"]
        sim = json.loads((Path(entry["folder"]) / "sim.json").read_text())
        assert sim["node_id"] == entry["node_id"] and sim["speed"] == 20.0

    for node in firmware_nodes.nodes:
        with transport.open_port(node.port, timeout=0.2) as port:
            parser = FrameParser()
            end = time.monotonic() + 10
            readings: list[object] = []
            while not readings and time.monotonic() < end:
                frames = parser.feed(port.read(max(1, port.in_waiting)))
                # Either the wire protocol (frames) or the plain-text link ("R t=..").
                readings += [f for f in frames if f.kind == "reading"]
                readings += [t for t in parser.text_lines if t.startswith("R t=")]
            assert readings, f"{node.node_id}: no reading within 10 s; text: {parser.text_lines[-5:]}"


def test_ctrl_c_lands_in_the_repl_and_ctrl_d_soft_reboots(firmware_nodes: Supervisor) -> None:
    node = firmware_nodes.node("n02")
    pid_before = node.pid
    with transport.open_port(node.port, timeout=0.1) as port:
        port.write(b"\x03")
        assert b">>> " in read_until(port, b">>> ")
        port.write(b"print(6 * 7)\r")
        assert b"42\r\n>>> " in read_until(port, b"42\r\n>>> ")
        port.write(b"\x04")  # soft reset: a new process, main.py runs again
        # main.py runs again: a frame (protocol link) or a text reading (text link).
        out = read_until(port, (b"@CNP", b"R t="), timeout=10)
        assert b"soft reboot\r\n" in out
        assert b"R t=" in out or b"@CNP" in out
    assert node.pid != pid_before and not alive(pid_before)


def test_reboot_command_restarts_the_node_like_a_board(firmware_nodes: Supervisor) -> None:
    # The firmware's reboot (SystemExit out of main.py) must become a new boot, not a REPL.
    node = firmware_nodes.node("n01")
    pid_before = node.pid
    with transport.open_port(node.port, timeout=0.1) as port:
        parser = FrameParser()
        hellos: list[int] = []
        end = time.monotonic() + 10
        while not hellos and time.monotonic() < end:
            frames = parser.feed(port.read(max(1, port.in_waiting)))
            hellos += [f.boot for f in frames if f.kind in ("reading", "hello")]
        assert hellos, f"no frames from the firmware: {parser.text_lines[-5:]}"
        port.write(encode_command("n01", 1, "reboot", {}))
        boots: set[int] = set()
        end = time.monotonic() + 10
        while time.monotonic() < end and not any(b > hellos[0] for b in boots):
            boots |= {f.boot for f in parser.feed(port.read(max(1, port.in_waiting))) if f.kind == "hello"}
    assert any(b > hellos[0] for b in boots), "no hello from a new boot after the reboot command"
    assert node.reboots[-1] == "reset" and node.pid != pid_before and not alive(pid_before)


# -- serial-level faults -------------------------------------------------------------------

QUIET_MAIN = "import time\nprint('main ran')\nwhile True:\n    time.sleep_ms(50)\n"


@pytest.fixture()
def quiet_dir(tmp_path: Path) -> Path:
    for nid in ("n01", "n02"):
        (tmp_path / nid).mkdir()
        (tmp_path / nid / "main.py").write_text(QUIET_MAIN)
    return tmp_path


def _sim_jsons(directory: Path, seed: int) -> dict[str, dict]:
    cfg = SimConfig(nodes=3, zones=2, directory=directory, seed=seed, speed=5.0, weather="mild",
                    faults=[parse_fault("n02:stuck@300/120"), parse_fault("all:drift=0.05@60"),
                            parse_fault("n03:disconnect@100")])
    with Supervisor(cfg) as sup:
        return {n.node_id: json.loads((n.folder / "sim.json").read_text()) for n in sup.nodes}


def test_sim_json_zones_seeds_and_sensor_faults(tmp_path: Path) -> None:
    sims = _sim_jsons(tmp_path, seed=3)
    assert [sims[n]["zone"] for n in ("n01", "n02", "n03")] == ["A", "B", "A"]
    assert sims["n01"]["zone_seed"] == sims["n03"]["zone_seed"] != sims["n02"]["zone_seed"]
    assert len({s["seed"] for s in sims.values()}) == 3
    assert all(s["speed"] == 5.0 and s["weather"] == "mild" for s in sims.values())
    assert {"at_s": 300.0, "kind": "stuck", "duration_s": 120.0} in sims["n02"]["faults"]
    assert all({"at_s": 60.0, "kind": "drift", "duration_s": 10**9, "value": 0.05} in s["faults"]
               for s in sims.values())
    # Serial-level faults are the supervisor's business, not the firmware's.
    assert not any(f["kind"] == "disconnect" for s in sims.values() for f in s["faults"])
    assert _sim_jsons(tmp_path, seed=3) == sims  # reproducible from --seed
    other = _sim_jsons(tmp_path, seed=4)
    assert other["n01"]["seed"] != sims["n01"]["seed"] and other["n01"]["zone_seed"] != sims["n01"]["zone_seed"]


def test_garbage_injects_random_bytes_reproducibly(tmp_path: Path) -> None:
    # Three runs side by side: seed 11 twice and seed 12; the node prints only "main ran".
    # The garbage comes 3 s after start so the ports are open by then even on a busy machine.
    sups = []
    for i, seed in enumerate((11, 11, 12)):
        d = tmp_path / f"run{i}"
        (d / "n01").mkdir(parents=True)
        (d / "n01" / "main.py").write_text(QUIET_MAIN)
        sups.append(Supervisor(SimConfig(nodes=1, directory=d, seed=seed, speed=1.0,
                                         faults=[parse_fault("n01:garbage=200@3")])))
    ports = []
    try:
        t0 = time.monotonic()
        for sup in sups:
            sup.start()
            ports.append(transport.open_port(sup.nodes[0].port, timeout=0.05))
        assert time.monotonic() - t0 < 2.5, "nodes took too long to start for this test's timing"
        got = [b"" for _ in ports]
        while time.monotonic() < t0 + 5.0:
            for i, port in enumerate(ports):
                got[i] += port.read(max(1, port.in_waiting))
        dbg = [(sup.nodes[0].info(), sup.nodes[0].reboots) for sup in sups]
    finally:
        for port in ports:
            port.close()
        for sup in sups:
            sup.stop()
    # "main ran" is there unless the node printed it before the port was opened.
    first, again, other = (g.replace(b"main ran\r\n", b"", 1) for g in got)
    assert len(first) == 200, (got, dbg)  # the node is otherwise silent: these are the injected bytes
    assert len(set(first)) > 50 and any(b >= 0x80 for b in first)
    assert again == first
    assert other != first and len(other) == 200


def test_disconnect_and_reboot_faults(quiet_dir: Path) -> None:
    cfg = SimConfig(nodes=2, directory=quiet_dir, speed=2.0,
                    faults=[parse_fault("n01:disconnect@4/3"), parse_fault("n02:reboot@5")])
    with Supervisor(cfg) as sup:
        n1, n2 = sup.nodes
        old_port, n1_pid, n2_pid = n1.port, n1.pid, n2.pid
        state_path = cfg.state_path
        p1 = transport.open_port(old_port, timeout=0.1)
        p2 = transport.open_port(n2.port, timeout=0.1)
        out2 = b""  # (output before a port is opened is dropped, so no "main ran" check here)

        # n01 unplugged after 2 s of wall time: the open handle fails like a pulled cable.
        with pytest.raises(serial.SerialException):
            end = time.monotonic() + 5
            while time.monotonic() < end:
                p1.read(1)
                p1.write(b"\r")
        p1.close()
        entry = json.loads(state_path.read_text())["nodes"][0]
        assert entry["state"] == "disconnected" and entry["port"] is None, entry
        assert not Path(old_port).exists() and not n1.by_id.exists()

        # n02 was power-cycled meanwhile: new process, main.py ran again.
        out2 += read_until(p2, b"POWERON_RESET", timeout=3)
        after = out2.split(b"POWERON_RESET", 1)[-1]
        after += read_until(p2, b"main ran", timeout=3) if b"main ran" not in after else b""
        assert b"POWERON_RESET" in out2 and b"main ran" in after, out2
        assert n2.pid != n2_pid and not alive(n2_pid) and n2.reboots == ["reboot fault"]
        p2.close()

        # n01 comes back after 1.5 s of wall time, at a path published in the state file,
        # and its firmware kept running while unplugged (same process).
        end = time.monotonic() + 4
        while time.monotonic() < end and json.loads(state_path.read_text())["nodes"][0]["port"] is None:
            time.sleep(0.05)
        entry = json.loads(state_path.read_text())["nodes"][0]
        assert entry["state"] == "running" and entry["port"]
        assert entry["pid"] == n1_pid and alive(n1_pid)
        assert os.path.realpath(entry["by_id"]) == entry["port"]  # the stable name follows it
        with transport.open_port(transport.resolve_port("n01", state_path), timeout=0.1) as p1:
            p1.write(b"\x03")
            p1.write(b"print('back', 1 + 2)\r")
            assert b"back 3" in read_until(p1, b"back 3")
        pids = [n1.pid, n2.pid]
    assert not any(alive(p) for p in pids)
    final = json.loads(state_path.read_text())
    assert not final["running"] and all(n["pid"] is None for n in final["nodes"])


def test_cli_ctrl_c_stops_every_node(quiet_dir: Path) -> None:
    state = quiet_dir / "state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "canopy_host.cli", "sim", "--nodes", "2", "--dir", str(quiet_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        head = ""
        while "Ctrl-C stops all nodes." not in head and proc.poll() is None:
            head += proc.stdout.readline()
        pids = [n["pid"] for n in json.loads(state.read_text())["nodes"]]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        out = head + out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "/dev/pts/" in out and "stopped 2 virtual node(s)" in out
    assert not any(alive(p) for p in pids)
