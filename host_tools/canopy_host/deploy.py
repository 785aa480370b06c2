"""Deploy the app to nodes: compile, copy what changed, provision, prove it healthy.

One node, over mpremote's Python API (`SerialTransport`, the raw REPL):

1. build the bundle: `firmware/` compiled to `.mpy` for the board's `mpy_arch`
   (`main.py` stays source: the chip only runs `main.py`), `canopy/sim/` left out on
   real boards; the `unix-sim` board (no arch) gets the `.py` sources, because native
   and viper code inside an `.mpy` is machine code for one architecture and the unix
   port is neither. Plus `board.json` and `canopy/fw_hash.py` (the app hash the
   node's hello reports).
2. hash every bundle file ON the node (sha256 in the raw REPL) and list the app
   folders, so a file a previous deploy left half-written, or that someone changed by
   hand, is found by content, not trusted from a manifest; copy only the differing
   ones (each to `.part`, then renamed), remove stale `.py`/`.mpy`/`.part` files (a
   stale `x.py` would shadow a new `x.mpy`), write `fw_hash` last, re-hash to verify.
   All bundle files matching = **flashed**.
3. provision (identity + key, registry by MAC; see `provision.py`).
4. acceptance over the raw REPL: BME280 chip id 0x60, plausible readings, the
   control loop ticking; then reset the node and ping it over the serial link (a
   `status` command answered by the running app, whose hello reports the deployed
   hash). All passing = **healthy**, recorded separately from flashed.
5. mesh ping, when a gateway is known (`Gateway`: `canopy deploy --gateway PORT`, or
   the gateway `canopy sim --mesh` marks in its state file): a tagged `status` for the
   node written to the GATEWAY's serial port, answered by the node over the mesh and
   relayed back by the gateway (`mesh_ping`). Healthy then needs it too; without a
   gateway the report says `not checked (no gateway)`.

Usage::

    report = deploy_node("/dev/ttyUSB0", load_board("esp32-devkitc"), build_bundle(board), master)
    report.flashed, report.healthy, report.copied
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import provision as _prov
from . import registry as _registry
from .boards import Board
from .errors import CanopyError
from .paths import FIRMWARE_DIR, mpy_cross_command
from .security import DEFAULT_COUNTER_FILE, derive_node_key

FW_HASH_FILE = "canopy/fw_hash.py"
BOARD_FILE = "board.json"
APP_DIRS = ("canopy", "canopy/sim")  # folders whose .py/.mpy the deploy owns
CHIP_ID = 0x60
PING_TIMEOUT_S = 20.0
# pyserial read timeout: without one, mpremote's reads on a pty block forever when a
# node misses a Ctrl-C or dies mid-command, and its own timeouts never get a say.
READ_TIMEOUT_S = 1.0
ENTER_TIMEOUT_S = 5.0
SCAN_TIMEOUT_S = 30.0
# Per 1 KB chunk (~4 KB of repr() on the wire: 0.35 s at 115200 baud), not per file.
COPY_IDLE_S = 5.0
ACCEPT_TIMEOUT_S = 30.0
# Mesh ping: flooding over a lossy radio may lose a command or its reply, so the ping
# is resent (fresh counter, hence a new frame the duplicate filters let through).
MESH_PING_TIMEOUT_S = 12.0
MESH_RESEND_S = 3.0
NO_GATEWAY = "not checked (no gateway)"
# Plausible ranges: the BME280's operating range, and pressure from ~9 km altitude up.
T_RANGE = (-4000, 8500)  # 0.01 C
P_RANGE = (30000, 110000)  # Pa
H_RANGE = (0, 100 * 1024)  # 1/1024 %RH


@dataclass
class BundleFile:
    path: str  # on the node, relative to the flash root
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Bundle:
    board: str
    arch: str | None
    app_hash: str
    files: list[BundleFile]

    @property
    def paths(self) -> set[str]:
        return {f.path for f in self.files}


def _sources(firmware_dir: Path, include_sim: bool) -> list[Path]:
    out = []
    for p in sorted(firmware_dir.rglob("*.py")):
        rel = p.relative_to(firmware_dir)
        if "__pycache__" in rel.parts or rel.as_posix() == FW_HASH_FILE:
            continue
        if not include_sim and rel.parts[:2] == ("canopy", "sim"):
            continue
        out.append(p)
    return out


_COMPILED: dict[tuple[str, str, str], bytes] = {}  # (arch, path, source sha256) -> .mpy, per process


def _compile(src: Path, rel: str, arch: str, out_dir: Path) -> bytes:
    key = (arch, rel, hashlib.sha256(src.read_bytes()).hexdigest())
    if key in _COMPILED:
        return _COMPILED[key]
    out = out_dir / (rel.replace("/", "__") + ".mpy")
    # -s sets the name tracebacks show, as if the file had been compiled on the node.
    cmd = [*mpy_cross_command(), f"-march={arch}", "-s", rel, "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CanopyError(f"mpy-cross -march={arch} failed for {rel}:\n{proc.stderr.strip()}")
    _COMPILED[key] = data = out.read_bytes()
    return data


def build_bundle(board: Board, firmware_dir: Path = FIRMWARE_DIR) -> Bundle:
    """Everything the node's flash should hold for this board (see the module doc)."""
    virtual = board.chip == "unix"
    if not virtual and not board.mpy_arch:
        raise CanopyError(f"board {board.name} has no mpy_arch: cannot compile the app for it")
    if board.path is None or not board.path.is_file():
        raise CanopyError(f"board {board.name} has no board file to deploy")
    sources = _sources(firmware_dir, include_sim=virtual)
    if not sources:
        raise CanopyError(f"no firmware sources under {firmware_dir}")
    board_json = board.path.read_bytes()
    h = hashlib.sha256(f"canopy-app/v1 {board.name} {board.mpy_arch}\n".encode())
    for src in sources:
        h.update(src.relative_to(firmware_dir).as_posix().encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(board_json)
    app_hash = h.hexdigest()
    fw_hash_src = f"FW_HASH = {app_hash[:16]!r}\n"

    files: list[BundleFile] = []
    with tempfile.TemporaryDirectory(prefix="canopy-deploy-") as tmp:
        gen = Path(tmp) / "fw_hash.py"
        gen.write_text(fw_hash_src)
        items = [(s, s.relative_to(firmware_dir).as_posix()) for s in sources] + [(gen, FW_HASH_FILE)]

        def one(item: tuple[Path, str]) -> BundleFile:
            src, rel = item
            if virtual or rel == "main.py" or rel == "boot.py":
                return BundleFile(rel, src.read_bytes())
            return BundleFile(rel[:-3] + ".mpy", _compile(src, rel, board.mpy_arch or "", Path(tmp)))

        with ThreadPoolExecutor(max_workers=4) as pool:
            files = list(pool.map(one, items))
    files.append(BundleFile(BOARD_FILE, board_json))
    # fw_hash goes last: its new value on the node means every other file was written.
    files.sort(key=lambda f: (f.path.startswith(FW_HASH_FILE.rsplit(".", 1)[0]), f.path))
    return Bundle(board=board.name, arch=None if virtual else board.mpy_arch, app_hash=app_hash, files=files)


# Runs on the node: sha256 of each listed file (None if missing) and the app folders' files.
_SCAN = """
def _canopy_scan(paths, dirs):
    import os, json, hashlib, binascii
    buf = bytearray(512)
    mv = memoryview(buf)
    r = {"hashes": {}, "files": []}
    for p in paths:
        try:
            f = open(p, "rb")
        except OSError:
            r["hashes"][p] = None
            continue
        h = hashlib.sha256()
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
        f.close()
        r["hashes"][p] = binascii.hexlify(h.digest()).decode()
    for d in dirs:
        try:
            for e in os.ilistdir(d):
                if e[1] == 0x8000:
                    r["files"].append(d + "/" + e[0])
        except OSError:
            pass
    print(json.dumps(r))
_canopy_scan(%r, %r)
"""

# Runs on the node: bring up the board, read the sensor's chip id, tick the control loop.
_ACCEPT = """
def _canopy_accept():
    import json
    from canopy import board, hal
    from canopy.node import Node
    import main
    r = {"chip_id": None}
    hw = hal.open(board.load())
    try:
        r["chip_id"] = hw.i2c.readfrom_mem(0x76, 0xD0, 1)[0]
    except OSError:
        r["i2c_error"] = "no answer at 0x76"
    n = Node(hw, main.load_config(), 0)
    for _ in range(6):
        hw.sleep_ms(50)
        n.tick()
    r.update({"ticks": n.ticks, "readings": n.readings, "faults": n.faults, "failsafe": bool(n.failsafe),
              "meas": list(n.meas), "out": list(n.out), "board": hw.board.get("name")})
    print(json.dumps(r))
_canopy_accept()
"""


@dataclass
class NodeReport:
    port: str
    board: str
    node_id: str | None = None
    mac: str | None = None
    app_hash: str | None = None
    copied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    bytes_copied: int = 0
    flashed: bool = False
    provisioned: bool = False
    healthy: bool = False
    acceptance: dict[str, Any] = field(default_factory=dict)
    ping: dict[str, Any] = field(default_factory=dict)
    # {answered, via, ttl, hops, rtt_ms, ...} when a gateway was given, else why not
    mesh_ping: dict[str, Any] | str = NO_GATEWAY
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """Where one node's deploy reports progress (the CLI draws a bar per node)."""

    def stage(self, text: str) -> None: ...

    def total(self, nbytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


def usb_info(port: str) -> tuple[str | None, str | None]:
    """(USB serial number, USB location) of a port, for the registry; (None, None) if unknown."""
    try:
        from serial.tools import list_ports

        real = os.path.realpath(port)
        for p in list_ports.comports():
            if p.device in (port, real):
                return p.serial_number, p.location
    except Exception:  # noqa: BLE001 - listing ports is a nicety, never a reason to fail
        pass
    return None, None


OPEN_RETRY_S = 1.5  # a port another tool is just closing, or a board re-enumerating


def open_transport(port: str) -> Any:
    from mpremote.transport import TransportError
    from mpremote.transport_serial import SerialTransport

    deadline = time.monotonic() + OPEN_RETRY_S
    while True:
        try:
            return SerialTransport(port, baudrate=115200, timeout=READ_TIMEOUT_S)
        except (TransportError, OSError, Exception) as exc:  # serial.SerialException included
            if time.monotonic() < deadline and os.path.exists(port):  # busy, not absent
                time.sleep(0.1)
                continue
            raise CanopyError(f"cannot open {port}: {exc} (is another program, e.g. a monitor or a "
                              "terminal, using it?)") from exc


class _Guard:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def kick(self) -> None:
        """Progress was made: the time limit starts again."""
        self.deadline = time.monotonic() + self.seconds


@contextlib.contextmanager
def guarded(t: Any, seconds: float, what: str) -> Iterator[_Guard]:
    """Give up on `what` after `seconds` without progress (see `_Guard.kick`): mpremote
    waits for the REPL's answer as long as bytes keep coming, and a node that rebooted
    into its app never stops sending frames. Closing the port makes the blocked read
    fail; the transport is then done."""
    guard = _Guard(seconds)
    fired = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(max(0.0, min(0.2, guard.deadline - time.monotonic()))):
            if time.monotonic() >= guard.deadline:
                fired.set()
                try:
                    t.serial.close()
                except Exception:  # noqa: BLE001 - best effort from another thread
                    pass
                return

    watcher = threading.Thread(target=watch, name="deploy-watchdog", daemon=True)
    watcher.start()
    try:
        yield guard
    except Exception as exc:
        if fired.is_set():
            raise CanopyError(f"{what}: no answer from the node within {seconds:.0f} s "
                              "(did it reset or lose power?)") from exc
        raise
    finally:
        done.set()
        watcher.join()


def connect(port: str, soft_reset: bool = True, attempts: int = 3) -> Any:
    """Open `port`, stop the app and enter the raw REPL, retrying with a fresh port: a
    Ctrl-C that lands while the board is still booting is lost, and mpremote sends one."""
    last: Exception | None = None
    for k in range(attempts):
        # Short first try (a lost Ctrl-C is the usual failure), longer ones after it.
        limit = ENTER_TIMEOUT_S if k else 2.5
        t = open_transport(port)
        try:
            with guarded(t, limit, "entering the raw REPL"):
                t.enter_raw_repl(soft_reset=soft_reset, timeout_overall=limit)
            return t
        except Exception as exc:  # noqa: BLE001 - TransportError, closed port, ...
            last = exc
            try:
                t.close()
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.3)
    raise CanopyError(f"the node on {port} does not answer in the raw REPL ({str(last).strip()[:120]}); "
                      "is MicroPython flashed and the port right?")


def _enter_raw(t: Any, soft_reset: bool) -> None:
    from mpremote.transport import TransportError

    try:
        with guarded(t, 2 * ENTER_TIMEOUT_S, "entering the raw REPL"):
            t.enter_raw_repl(soft_reset=soft_reset, timeout_overall=ENTER_TIMEOUT_S)
    except TransportError as exc:
        raise CanopyError(f"the node on {t.device_name} does not answer in the raw REPL ({exc})") from exc


def scan_node(t: Any, bundle: Bundle) -> dict[str, Any]:
    return _prov.run_json(t, _SCAN % (sorted(bundle.paths), list(APP_DIRS)), "hashing the files on the node")


def sync_files(t: Any, bundle: Bundle, report: NodeReport, progress: Progress) -> None:
    """Copy what differs by hash, remove stale app files, verify."""
    progress.stage("hashing")
    with guarded(t, SCAN_TIMEOUT_S, "hashing the files on the node"):
        scan = scan_node(t, bundle)
    on_node = scan["hashes"]
    todo = [f for f in bundle.files if on_node.get(f.path) != f.sha256]
    report.unchanged = len(bundle.files) - len(todo)
    stale = sorted(p for p in scan["files"] if p not in bundle.paths and p.endswith((".py", ".mpy", ".part")))
    with guarded(t, SCAN_TIMEOUT_S, "removing stale files"):
        for p in stale:
            t.fs_rmfile(p)
            report.removed.append(p)
        for d in APP_DIRS:
            if any(f.path.startswith(d + "/") for f in todo) and not t.fs_exists(d):
                t.fs_mkdir(d)
    progress.total(sum(len(f.data) for f in todo))
    with guarded(t, COPY_IDLE_S, "copying") as guard:
        for f in todo:
            progress.stage(f"copying {f.path}")
            last = [0]

            def cb(done: int, size: int, last: list[int] = last) -> None:
                guard.kick()
                progress.advance(done - last[0])
                last[0] = done

            _prov.write_file_atomic(t, f.path, f.data, cb)
            guard.kick()
            report.copied.append(f.path)
            report.bytes_copied += len(f.data)
    progress.stage("verifying")
    with guarded(t, SCAN_TIMEOUT_S, "verifying the copy"):
        after = scan_node(t, bundle)["hashes"]
    bad = [f.path for f in bundle.files if after.get(f.path) != f.sha256]
    if bad:
        raise CanopyError(f"after copying, {len(bad)} file(s) still differ on the node: {', '.join(bad[:5])}")
    report.flashed = True


def acceptance(t: Any, report: NodeReport) -> bool:
    with guarded(t, ACCEPT_TIMEOUT_S, "the acceptance test"):
        r = _prov.run_json(t, _ACCEPT, "the acceptance test")
    report.acceptance = r
    problems = []
    if r.get("chip_id") != CHIP_ID:
        problems.append(f"BME280 not found (chip id {r.get('chip_id')!r}, expected 0x60)"
                        + (f": {r['i2c_error']}" if r.get("i2c_error") else ""))
    meas = r.get("meas") or [None, None, None]
    for name, v, (lo, hi) in zip(("temperature", "pressure", "humidity"), meas, (T_RANGE, P_RANGE, H_RANGE)):
        if not isinstance(v, int) or not lo <= v <= hi:
            problems.append(f"implausible {name} reading {v!r}")
    if not r.get("ticks") or r.get("readings", 0) < 1:
        problems.append(f"the control loop did not tick with readings (ticks={r.get('ticks')}, readings={r.get('readings')})")
    if r.get("faults"):
        problems.append(f"sensor faults during the test: {r.get('faults')}")
    report.problems += problems
    return not problems


def ping(port: str, node_id: str | None, app_hash: str | None, key: bytes | None = None,
         counter: Any = None, timeout: float = PING_TIMEOUT_S) -> dict[str, Any]:
    """Link-level ping: wait for the running app's hello, send `status` (tagged with the
    node key when given: a provisioned node is strict, docs/security.md), wait for its reply."""
    from .protocol import FrameParser, encode_command
    from .security import tag_command
    from .transport import open_port

    result: dict[str, Any] = {"kind": "link", "answered": False}
    parser = FrameParser()
    deadline = time.monotonic() + timeout
    sent_at = None
    ser = None
    while ser is None:
        try:
            ser = open_port(port, timeout=0.1)
        except CanopyError:
            # A native-USB board (ESP32-S3/C3 USB-Serial/JTAG) re-enumerates on reset.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with ser:
        while time.monotonic() < deadline:
            for fr in parser.feed(ser.read(4096)):
                if fr.kind == "hello" and "node_id" not in result:
                    result.update(node_id=fr.node, boot=fr.boot, fw_hash=fr.fields.get("fw_hash"),
                                  board=fr.fields.get("board"))
                    if key is not None and counter is not None:
                        line = tag_command(key, fr.node, counter.next(), "status")
                        result["tagged"] = True
                    else:
                        line = encode_command(fr.node, int(time.time()) % 1_000_000_000, "status")
                    ser.write(line)
                    sent_at = time.monotonic()
                elif fr.kind == "error" and sent_at is not None and "refused" not in result:
                    result["refused"] = f"{fr.fields.get('err')}: {fr.fields.get('msg')}"
                elif fr.kind == "reply" and fr.fields.get("cmd") == "status" and sent_at is not None:
                    result.update(answered=True, rtt_ms=round((time.monotonic() - sent_at) * 1000, 1),
                                  tick=fr.fields.get("tick"), auth=fr.fields.get("auth"))
                    break
            if result["answered"]:
                break
    if app_hash and result.get("fw_hash") not in (None, app_hash[:16]) \
            and not app_hash.startswith(str(result.get("fw_hash"))):
        result["fw_hash_mismatch"] = True
    if node_id and result.get("node_id") not in (None, node_id):
        result["node_id_mismatch"] = True
    return result


@dataclass
class Gateway:
    """The node wired to the host that relays commands into the mesh (docs/mesh.md).

    node_id/ttl/topology are known for virtual nodes (the `canopy sim` state file) and
    only refine the report (hop count by topology); the port alone is enough to ping.
    """

    port: str
    node_id: str | None = None
    ttl: int | None = None
    topology: dict[str, list[str]] | None = None  # node id -> the node ids in its range

    def hops_to(self, node_id: str) -> int | None:
        """Radio hops from the gateway to `node_id` by the simulated topology, if known."""
        if not self.topology or self.node_id not in self.topology:
            return None
        seen, frontier, hops = {self.node_id}, [self.node_id], 0
        while frontier:
            if node_id in frontier:
                return hops
            hops += 1
            nxt = [p for n in frontier for p in self.topology.get(n, []) if p not in seen]
            seen.update(nxt)
            frontier = nxt
        return None


def gateway_from_sim_state(state: dict[str, Any], port: str | None = None) -> Gateway | None:
    """The mesh gateway of a `canopy sim` state: the node on `port` if given (it need
    not be marked), else the node whose mesh section says `"gateway": true`."""
    nodes = [n for n in state.get("nodes", []) if isinstance(n, dict) and isinstance(n.get("mesh"), dict)]
    if not nodes:
        return None
    ids_by_port = {n["mesh"].get("port"): str(n.get("node_id")) for n in nodes}
    topology = {str(n.get("node_id")): [ids_by_port.get(p, str(name)) for name, p in
                                        (n["mesh"].get("peers") or {}).items()] for n in nodes}
    for n in nodes:
        on_port = port is not None and n.get("port") and _same_port(str(n["port"]), port)
        if on_port or (port is None and n["mesh"].get("gateway")):
            if not n.get("port"):
                raise CanopyError(f"the mesh gateway {n.get('node_id')} has no port right now "
                                  f"(state: {n.get('state')}); is its cable simulated unplugged?")
            return Gateway(str(n["port"]), n.get("node_id"), n["mesh"].get("ttl"), topology)
    return None


def _same_port(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def mesh_ping(gateway: Gateway, node_id: str, key: bytes, counter: Any, *,
              timeout: float | None = None, resend_s: float | None = None) -> dict[str, Any]:
    """Ping `node_id` THROUGH the gateway: a tagged `status` written to the gateway's
    port, answered only if the reply (the node's id, `re=` one of our counters, a tag
    that verifies under the node's key) comes back on that port. Resent every
    `resend_s` until `timeout`. Never raises for a silent mesh; the dict says what was heard."""
    from .protocol import FrameParser
    from .security import FrameVerifier, tag_command
    from .transport import open_port

    timeout = MESH_PING_TIMEOUT_S if timeout is None else timeout
    resend_s = MESH_RESEND_S if resend_s is None else resend_s
    via = {"port": gateway.port, "node": gateway.node_id}
    result: dict[str, Any] = {"answered": False, "via": via, "ttl": gateway.ttl,
                              "hops": gateway.hops_to(node_id), "sent": 0, "frames_from_node": 0,
                              "frames_from_others": 0}
    if gateway.topology is not None:
        result["hops_source"] = "sim topology"
    parser = FrameParser()
    verifier = FrameVerifier({node_id: key})
    sent: dict[int, float] = {}  # command counter -> when sent
    try:
        ser = open_port(gateway.port, timeout=0.1)
    except CanopyError as exc:
        result["error"] = f"cannot open the gateway port: {exc}"
        return result
    start = time.monotonic()
    deadline = start + timeout
    next_send = start
    with ser:
        while time.monotonic() < deadline and not result["answered"]:
            now = time.monotonic()
            if now >= next_send:
                c = counter.next()
                ser.write(tag_command(key, node_id, c, "status"))
                sent[c] = time.monotonic()
                result["sent"] += 1
                next_send = now + resend_s
            for fr in parser.feed(ser.read(4096)):
                if fr.node != node_id:
                    if fr.kind != "command":
                        result["frames_from_others"] += 1
                    continue
                if fr.kind == "command":
                    continue  # our own command echoed by a terminal-ish port
                result["frames_from_node"] += 1
                re_ = fr.fields.get("re")
                if fr.kind == "error" and re_ in sent and "refused" not in result:
                    result["refused"] = f"{fr.fields.get('err')}: {fr.fields.get('msg')}"
                elif fr.kind == "reply" and fr.fields.get("cmd") == "status" and re_ in sent:
                    verdict = verifier.verify(fr)
                    if verdict != "ok":
                        result["bad_tag"] = verdict  # keep listening: a forged or stale copy is no answer
                        continue
                    result.update(answered=True, rtt_ms=round((time.monotonic() - sent[re_]) * 1000, 1),
                                  tick=fr.fields.get("tick"), tag="ok")
                    break
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def check_mesh(report: NodeReport, gateway: Gateway, master: bytes, *, counter_file: Path | None = None,
               registry_path: Path | None = None, progress: Progress | None = None) -> bool:
    """Step 5 for a provisioned node: record `mesh_ping`, add the reason and a hint to
    `problems` and clear `healthy` (here and in the registry) when it went unanswered."""
    from .security import CommandCounter

    if report.node_id is None:
        return False
    if gateway.node_id == report.node_id or _same_port(gateway.port, report.port):
        report.mesh_ping = "not checked (the node is the gateway)"
        return True
    if progress is not None:
        progress.stage("mesh ping")
    r = mesh_ping(gateway, report.node_id, derive_node_key(master, report.node_id),
                  CommandCounter(counter_file or DEFAULT_COUNTER_FILE))
    report.mesh_ping = r
    if r["answered"]:
        return True
    gw = f"gateway {gateway.node_id or gateway.port}"
    if r.get("error"):
        why, hint = r["error"], "check --gateway names the port of the node wired to the host"
    elif r.get("refused"):
        why = f"the node refused it through the mesh ({r['refused']})"
        hint = "a host command counter behind the node's (see --counter-file) or a key from another master key"
    elif r.get("bad_tag"):
        why = f"a reply came back but its tag did not verify ({r['bad_tag']})"
        hint = "the node's key is not the one derived from this master key"
    elif r["frames_from_node"]:
        why = f"the {gw} relays the node's frames but no reply to {r['sent']} ping(s)"
        hint = "commands are lost on the way to the node: check link quality (`canopy mesh status`)"
    elif r["frames_from_others"]:
        why = f"the {gw} hears other nodes but nothing from {report.node_id}"
        hint = ("the node is out of the mesh: out of range, partitioned or its radio down "
                "(`canopy mesh status`; virtual nodes: `canopy mesh heal`), or more hops away than the TTL")
    else:
        why = f"the {gw} port {gateway.port} sent nothing at all"
        hint = "is the gateway running the app with its mesh enabled, and is --gateway the right port?"
    report.problems.append(f"no answer to a mesh ping through the {gw} within "
                           f"{r.get('seconds', 0):.0f} s: {why}. Hint: {hint}")
    if report.healthy:
        report.healthy = False
        _registry.update_locked(registry_path, report.node_id, healthy=False,
                                healthy_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                problems=report.problems)
    return False


def deploy_node(port: str, board: Board, bundle: Bundle, master: bytes, *, zone: str | None = None,
                node_id: str | None = None, registry_path: Path | None = None, check: bool = True,
                progress: Progress | None = None, usb_serial: str | None = None,
                location: str | None = None, counter_file: Path | None = None,
                gateway: Gateway | None = None) -> NodeReport:
    """Deploy to one port; never raises for node trouble, the report says what happened."""
    from mpremote.transport import TransportError

    progress = progress or Progress()
    report = NodeReport(port=port, board=board.name, app_hash=bundle.app_hash)
    t0 = time.monotonic()
    t = None
    try:
        progress.stage("connecting")
        t = connect(port, soft_reset=True)  # a fresh interpreter, the app's loop not running
        with guarded(t, SCAN_TIMEOUT_S, "reading the node's MAC"):
            facts = _prov.read_facts(t)
        report.mac = facts.mac
        _prov.check_board_fits(board, facts.platform)  # before any file of the wrong arch is copied
        sync_files(t, bundle, report, progress)
        progress.stage("provisioning")
        if usb_serial is None and location is None:
            usb_serial, location = usb_info(port)
        with guarded(t, SCAN_TIMEOUT_S, "provisioning"):
            prov = _prov.provision_node(t, board.name, master, zone=zone, node_id=node_id,
                                        registry_path=registry_path, usb_serial=usb_serial,
                                        location=location, facts=facts)
        report.node_id, report.provisioned = prov.node_id, True
        if prov.warning:
            report.warnings.append(prov.warning)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _registry.update_locked(registry_path, prov.node_id, app_hash=bundle.app_hash, flashed=True,
                                flashed_at=now, healthy=False)
        if check:
            progress.stage("acceptance test")
            t.exit_raw_repl()
            try:
                _enter_raw(t, soft_reset=True)  # import the modules just copied, not cached ones
            except CanopyError:
                # The reset handshake can be lost while the board restarts (seen once on a
                # loaded machine): start over on a fresh port, as connect() does.
                try:
                    t.close()
                except Exception:  # noqa: BLE001
                    pass
                t = None
                t = connect(port, soft_reset=True)
            ok = acceptance(t, report)
            progress.stage("ping")
            t.exec_raw_no_follow("import machine\nmachine.reset()")
            time.sleep(0.2)
            t.close()
            t = None
            from .security import CommandCounter

            report.ping = ping(port, prov.node_id, bundle.app_hash,
                               key=derive_node_key(master, prov.node_id),
                               counter=CommandCounter(counter_file or DEFAULT_COUNTER_FILE))
            if not report.ping.get("answered"):
                why = ""
                if report.ping.get("refused"):
                    why = (f" (refused: {report.ping['refused']}; a host command counter behind the node's, "
                           "see --counter-file, or a key from another master key)")
                report.problems.append(f"the node did not answer a status ping after reset{why}")
                ok = False
            if report.ping.get("node_id_mismatch"):
                report.problems.append(f"the running app calls itself {report.ping.get('node_id')}, "
                                       f"provisioned as {prov.node_id}")
                ok = False
            if report.ping.get("fw_hash_mismatch"):
                report.problems.append(f"the running app reports fw_hash {report.ping.get('fw_hash')}, "
                                       f"deployed {bundle.app_hash[:16]}")
                ok = False
            report.healthy = ok
            _registry.update_locked(registry_path, prov.node_id, healthy=ok,
                                    healthy_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    problems=report.problems)
            if gateway is not None:
                check_mesh(report, gateway, master, counter_file=counter_file, registry_path=registry_path,
                           progress=progress)
        else:
            report.mesh_ping = "not checked (acceptance skipped)"
        progress.stage("healthy" if report.healthy else ("flashed" if report.flashed else "failed"))
    except Exception as exc:  # noqa: BLE001 - serial/struct/transport trouble: one node's report
        text = str(exc).strip()
        report.error = text.splitlines()[-1] if text else type(exc).__name__
        if not isinstance(exc, (CanopyError, TransportError, OSError)):
            report.error = f"{type(exc).__name__}: {report.error} (the link to the node broke mid-command)"
        progress.stage("failed")
    finally:
        if t is not None:
            try:
                t.exit_raw_repl()
                if report.flashed:
                    # Ctrl-D in the friendly REPL: soft reset, the new app starts. A failed
                    # copy stays stopped in the REPL rather than run a mix of two versions.
                    t.serial.write(b"\x04")
            except Exception:
                pass
            try:  # always: an open handle keeps mpremote's exclusive lock on the port
                t.close()
            except Exception:
                pass
        report.seconds = round(time.monotonic() - t0, 2)
    return report


def deploy_nodes(ports: list[str], board: Board, master: bytes, *, firmware_dir: Path = FIRMWARE_DIR,
                 make_progress: Callable[[str], Progress] | None = None, **kw: Any) -> list[NodeReport]:
    """Build once, deploy to every port in parallel; reports in the order of `ports`."""
    bundle = build_bundle(board, firmware_dir)
    make_progress = make_progress or (lambda _p: Progress())
    if "node_id" in kw and kw["node_id"] and len(ports) > 1:
        raise CanopyError("--node-id names one node; deploy to one port at a time with it")
    gateway = kw.pop("gateway", None)
    progresses = {p: make_progress(p) for p in ports}
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ports)))) as pool:
        futs = [pool.submit(deploy_node, p, board, bundle, master, progress=progresses[p], **kw) for p in ports]
        reports = [f.result() for f in futs]
    if gateway is not None and kw.get("check", True):
        # After every deploy: the gateway may be one of the ports, reset and in the raw
        # REPL while the others deploy; one ping at a time, as they share its port.
        for r in reports:
            if r.flashed and r.provisioned and r.error is None:
                t0 = time.monotonic()
                check_mesh(r, gateway, master, counter_file=kw.get("counter_file"),
                           registry_path=kw.get("registry_path"), progress=progresses[r.port])
                r.seconds = round(r.seconds + time.monotonic() - t0, 2)
                progresses[r.port].stage("healthy" if r.healthy else "flashed")
    return reports


def bundle_summary(bundle: Bundle) -> dict[str, Any]:
    return {"board": bundle.board, "arch": bundle.arch, "app_hash": bundle.app_hash,
            "files": len(bundle.files), "bytes": sum(len(f.data) for f in bundle.files)}


__all__ = ["Bundle", "BundleFile", "Gateway", "NodeReport", "Progress", "build_bundle", "check_mesh",
           "deploy_node", "deploy_nodes", "gateway_from_sim_state", "mesh_ping",
           "bundle_summary"]
