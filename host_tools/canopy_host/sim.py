"""Virtual canopy nodes: the real firmware in unix-port processes behind real ptys.

Each virtual node is one MicroPython unix-port process running `firmware/` from its
own folder (its "flash"), started through the boot shim `firmware/canopy/sim/boot.py`.
The unix port only gives a REPL when its stdin is a terminal, so every process gets
an inner pseudo-terminal; a relay thread copies bytes between it and a second,
public pty whose path (`/dev/pts/N`) is what tools open, like a USB serial device.

The relay is also the "board": when the process exits it prints what a board prints
and starts it again (Ctrl-D -> soft reboot, raw-REPL Ctrl-D -> back in the raw REPL
without main.py, exit status 3 or a crash -> hard reset), which is what mpremote
expects. It performs the serial-level faults too: `disconnect` (the public pty goes
away like an unplugged cable), `reboot` (kill and restart), `garbage` (random bytes
in the node->host stream) and `garbage_inline` (the same, spliced into a frame line).
Sensor faults go into the node's `sim.json` for the firmware's simulated world. With
`SimConfig(delivery_log=True)` each relay writes the ground truth of its serial line to
`<node folder>/delivery.jsonl` (`DeliveryLog`).

Usage::

    from canopy_host.sim import SimConfig, Supervisor, parse_fault
    cfg = SimConfig(nodes=2, directory=Path("var/sim"), faults=[parse_fault("n02:stuck@60")])
    with Supervisor(cfg) as sup:
        print([n.port for n in sup.nodes])     # ['/dev/pts/7', '/dev/pts/9']
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CanopyError
from .paths import FIRMWARE_DIR, micropython_command
from .unixport import firmware_path

BOOT_SHIM = FIRMWARE_DIR / "canopy" / "sim" / "boot.py"
CLIMATE_MODULE = FIRMWARE_DIR / "canopy" / "sim" / "climate.py"

SENSOR_FAULTS = ("drift", "stuck", "spike", "sensor_off")
SERIAL_FAULTS = ("disconnect", "reboot", "garbage", "garbage_inline")
FAULT_KINDS = SENSOR_FAULTS + SERIAL_FAULTS

# Defaults when `--fault` leaves them out (VALUE units: drift C/s, spike C, garbage bytes).
DEFAULT_VALUE = {"drift": 0.02, "spike": 5.0, "garbage": 64, "garbage_inline": 16}
DEFAULT_DURATION_S = {"disconnect": 10.0, "reboot": 0.0, "garbage": 0.0, "garbage_inline": 0.0, "spike": 0.0}
FOREVER_S = 10**9  # "until the run ends", kept numeric so the firmware needs no None case
MAX_GARBAGE_BYTES = 4096  # per burst: beyond it a "garbage" fault only floods the pty
MAX_SPIKE_C = 100.0  # beyond the BME280's range (-40..85 °C) a spike is just a clipped reading

RESET_STATUS = 3  # exit status the boot shim and the simulated HAL use for a hard reset
RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n"
FRIENDLY_BANNER = b'Type "help()" for more information.'
SOFT_REBOOT = b"MPY: soft reboot\r\n"
GARBAGE_REPEAT_S = 0.5
POLL_MS = 20
PENDING_MAX = 4096
REBOOT_HISTORY = 100


@dataclass(frozen=True)
class FaultSpec:
    """One `--fault NODE:KIND[=VALUE][@T][/DURATION]`; times are simulated seconds since boot."""

    node: str  # node id, or "all"
    kind: str
    at_s: float = 0.0
    duration_s: float | None = None
    value: float | None = None

    def sim_json(self) -> dict[str, Any]:
        """The entry for the firmware's `sim.json` `faults` list."""
        duration = self.duration_s if self.duration_s is not None else DEFAULT_DURATION_S.get(self.kind, FOREVER_S)
        entry: dict[str, Any] = {"at_s": self.at_s, "kind": self.kind, "duration_s": duration}
        value = self.value if self.value is not None else DEFAULT_VALUE.get(self.kind)
        if value is not None:
            entry["value"] = value
        return entry


_FAULT_RE = re.compile(
    r"^(?P<node>[A-Za-z0-9_*-]+):(?P<kind>[a-z_]+)"
    r"(?:=(?P<value>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))?"
    r"(?:@(?P<at>[0-9]*\.?[0-9]+))?"
    r"(?:/(?P<dur>[0-9]*\.?[0-9]+))?$"
)


def parse_fault(text: str) -> FaultSpec:
    """Parse `NODE:KIND[=VALUE][@T][/DURATION]`, e.g. `n02:stuck@300/120`, `all:garbage=32@5`."""
    m = _FAULT_RE.match(text.strip())
    if not m:
        raise CanopyError(
            f"bad --fault {text!r}: expected NODE:KIND[=VALUE][@T][/DURATION], e.g. n02:stuck@300/120"
        )
    kind = m["kind"]
    if kind not in FAULT_KINDS:
        raise CanopyError(f"bad --fault {text!r}: unknown kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
    node = m["node"]
    if node in ("*", "all"):
        node = "all"
    elif node.isdigit():
        node = node_id(int(node))
    at_s = float(m["at"]) if m["at"] else 0.0
    duration_s = float(m["dur"]) if m["dur"] else None
    value = float(m["value"]) if m["value"] else None
    for what, x in (("time", at_s), ("duration", duration_s), ("value", value)):
        if x is not None and not math.isfinite(x):
            raise CanopyError(f"bad --fault {text!r}: the {what} must be a finite number")
    if kind in ("garbage", "garbage_inline") and value is not None and not (1 <= value <= MAX_GARBAGE_BYTES
                                                                           and value == int(value)):
        raise CanopyError(f"bad --fault {text!r}: {kind}=N is a byte count, 1..{MAX_GARBAGE_BYTES}")
    if kind == "spike" and value is not None and abs(value) > MAX_SPIKE_C:
        raise CanopyError(f"bad --fault {text!r}: a spike is at most {MAX_SPIKE_C:g} °C")
    return FaultSpec(node=node, kind=kind, at_s=at_s, duration_s=duration_s, value=value)


def node_id(index: int, count: int = 1) -> str:
    """`n01`, `n02`, ...: 1-based, at least two digits so ids sort like the nodes."""
    return f"n{index:0{max(2, len(str(count)))}d}"


def zone_name(k: int) -> str:
    """Zones are letters: A..Z, then AA, AB, ..."""
    name = ""
    k += 1
    while k:
        k, r = divmod(k - 1, 26)
        name = chr(ord("A") + r) + name
    return name


def derived_seed(seed: int, *parts: object) -> int:
    """A per-node/per-zone seed from the run seed; < 2**30 so it is a small int on the chip."""
    return random.Random(":".join(["canopy-sim", str(seed), *map(str, parts)])).randrange(1, 1 << 30)


def usb_serial_number(nid: str) -> str:
    """A fake USB serial number, stable per node id (a board keeps its serial across runs)."""
    return "CNPYSIM" + hashlib.sha1(f"canopy-sim:{nid}".encode()).hexdigest()[:8].upper()


def weather_kinds() -> list[str]:
    """The weather names the firmware's climate model knows (read from its KINDS table)."""
    try:
        tree = ast.parse(CLIMATE_MODULE.read_text())
    except (OSError, SyntaxError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "KINDS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                return [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


@dataclass
class SimConfig:
    nodes: int = 2
    zones: int = 1
    seed: int = 1
    speed: float = 1.0
    weather: str = "hot"
    faults: list[FaultSpec] = field(default_factory=list)
    directory: Path = Path("var/sim")
    state_file: Path | None = None  # default: <directory>/state.json
    board: str = "unix-sim"
    heapsize: str | None = None
    fresh: bool = False
    # Mesh between the nodes (UDP on loopback; canopy_host.mesh_sim, docs/mesh.md), None = off.
    mesh: Any = None
    # Mesh master key: each node gets canopy_key.json (strict). None = unauthenticated dev mode.
    master_key: bytes | None = None
    # Where that key came from: recorded in the state file so `canopy monitor --sim-state`
    # (and the other tools that follow a sim) verify tags without being told again.
    master_key_file: Path | None = None
    # Record the ground truth of each node's serial line in <node folder>/delivery.jsonl
    # (DeliveryLog below): every frame line forwarded or dropped, every injected fault.
    delivery_log: bool = False

    def validate(self) -> None:
        if not 1 <= self.nodes <= 999:
            raise CanopyError(f"--nodes must be 1..999, not {self.nodes}")
        if not 1 <= self.zones <= self.nodes:
            raise CanopyError(f"--zones must be 1..{self.nodes} (at most one zone per node), not {self.zones}")
        if not 0 <= self.seed < 1 << 62:
            raise CanopyError(f"--seed must be a non-negative integer, not {self.seed}")
        if self.speed < 0:
            raise CanopyError(f"--speed must be >= 0 (simulated seconds per wall second), not {self.speed}")
        kinds = weather_kinds()
        if kinds and self.weather not in kinds:
            raise CanopyError(f"unknown --weather {self.weather!r} (one of {', '.join(kinds)})")
        if self.heapsize and not re.fullmatch(r"\d+[kKmM]?", self.heapsize):
            raise CanopyError(f"--heapsize {self.heapsize!r} should look like 64k or 2M")
        ids = {node_id(i, self.nodes) for i in range(1, self.nodes + 1)}
        if self.mesh is not None:
            self.mesh.validate(sorted(ids))
        for f in self.faults:
            if f.node != "all" and f.node not in ids:
                raise CanopyError(f"--fault names node {f.node!r}, but the nodes are {node_id(1, self.nodes)}..{node_id(self.nodes, self.nodes)}")

    @property
    def state_path(self) -> Path:
        return self.state_file or self.directory / "state.json"

    def wall_s(self, sim_s: float) -> float:
        """Wall seconds for simulated seconds (speed 0 = "as fast as possible": taken as wall time)."""
        return sim_s / self.speed if self.speed > 0 else sim_s


def _configure_inner_tty(fd: int) -> None:
    # Like a UART into the chip: no echo, no line editing, no CR/LF mangling, but
    # Ctrl-C still raises SIGINT (KeyboardInterrupt in a running main.py). Quit and
    # suspend characters are disabled: a stray 0x1c/0x1a must not kill or stop the node.
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON | termios.IXOFF
                  | termios.ISTRIP | termios.BRKINT | termios.PARMRK)
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
    attrs[3] |= termios.ISIG
    cc = attrs[6]
    cc[termios.VINTR] = 3
    cc[termios.VQUIT] = 0
    cc[termios.VSUSP] = 0
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _become_tty_session() -> None:
    # Runs in the child between fork and exec: own session, stdin's pty as the
    # controlling terminal, so Ctrl-C typed into it becomes SIGINT for this node only.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


_LONE_LF = re.compile(rb"(?<!\r)\n")

DELIVERY_LOG_NAME = "delivery.jsonl"
FRAME_MARKER = b"@CNP"
SPLICE_AT = 8  # garbage_inline goes this many bytes into a frame line: after "@CNP1 n0", before its CRC
LINE_KEEP = 512  # longer node lines are never frames (250-byte limit); keep only their start


class DeliveryLog:
    """Append-only ground truth of one node's host-bound serial line (docs/simulation.md).

    The relay tells it what it tried to write (node output, banners, injected garbage)
    and how many of those bytes reached the public pty. It only looks for line ends and,
    per completed line that holds a frame marker, writes one JSON line saying whether
    every byte of that frame got out untouched (`delivered`), some byte was dropped
    (`dropped`: unplugged, nobody had the port open, or the reader's buffer was full),
    garbage landed inside it (`damaged`), or the process died before its newline (`cut`).
    Fault injections, process starts/exits and port attach/detach are logged too, with
    wall-clock times (`time.time()`, the clock `canopy monitor` stamps frames with).
    """

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        self._f = path.open("w", encoding="ascii")
        self._line = bytearray()
        self._line_t = 0.0
        self._lost = False
        self._garbage: list[dict[str, Any]] = []  # injections inside the current line

    def close(self) -> None:
        self.cut()
        self._f.close()

    def event(self, ev: str, **fields: Any) -> None:
        self._write({"t": round(time.time(), 4), "ev": ev, **fields})

    def _write(self, rec: dict[str, Any]) -> None:
        if not self._f.closed:
            self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._f.flush()  # a reader may look while the node runs

    def output(self, data: bytes, written: int) -> None:
        """Node bytes: `data[:written]` reached the pty, the rest was dropped."""
        t = time.time()
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            if not self._line:
                self._line_t = t
            if len(self._line) < LINE_KEEP:
                self._line += data[pos:end]
            if end > written:
                self._lost = True
            if nl < 0:
                return
            self._finish("complete")
            pos = end

    def garbage(self, size: int, written: int, kind: str) -> None:
        rec = {"t": round(time.time(), 4), "ev": "garbage", "kind": kind, "bytes": size, "delivered": written,
               "position": "inside" if self._line else "between"}
        if self._line:
            self._garbage.append(rec)  # written with the frame it damaged, once that line ends
        else:
            self._write(rec)

    def cut(self) -> None:
        """The process died (or the run ended) before the current line's newline."""
        if self._line:
            self._finish("cut")

    def _finish(self, how: str) -> None:
        line = bytes(self._line).rstrip(b"\r\n")
        at = line.find(FRAME_MARKER)
        frame: dict[str, Any] | None = None
        if at >= 0:
            tokens = line[at:].split(b" ")
            try:
                frame = {"node": tokens[1].decode("ascii", "replace"), "boot": int(tokens[2]),
                         "seq": int(tokens[3]), "type": tokens[4].decode("ascii", "replace")}
            except (IndexError, ValueError):
                frame = {"raw": line[at:at + 40].decode("ascii", "replace")}
            crc = tokens[-1]
            if crc.startswith(b"*"):
                frame["crc"] = crc[1:].decode("ascii", "replace")
        for rec in self._garbage:
            rec["damaged"] = {k: frame[k] for k in ("node", "boot", "seq") if k in frame} if frame else None
            self._write(rec)
        if frame is not None:
            status = ("cut" if how == "cut" else "dropped" if self._lost
                      else "damaged" if self._garbage else "delivered")
            self._write({"t": round(self._line_t, 4), "t_end": round(time.time(), 4), "ev": "frame",
                         **frame, "status": status})
        self._line = bytearray()
        self._lost = False
        self._garbage = []



class VirtualNode:
    """One virtual node: its process, its two ptys and the relay thread between them."""

    def __init__(self, sup: Supervisor, nid: str, zone: str, folder: Path, sim: dict[str, Any],
                 faults: list[FaultSpec]) -> None:
        self.sup = sup
        self.node_id = nid
        self.zone = zone
        self.folder = folder
        self.sim = sim
        self.serial_number = usb_serial_number(nid)
        # Like udev's /dev/serial/by-id links: a stable name that follows the device
        # across unplug/replug, whatever /dev/pts number it gets.
        self.by_id = (sup.cfg.directory / "by-id" / f"usb-Canopy_Virtual_Node_{self.serial_number}-if00").absolute()
        self.port: str | None = None
        self.pid: int | None = None
        self.state = "starting"
        self.boots = 0
        self.reboots: list[str] = []  # why each restart happened, for tests and the log
        self._faults = faults
        self._rng = random.Random(f"canopy-sim:{sup.cfg.seed}:{nid}:serial")
        self._pub = -1
        self._inner = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_started = 0.0
        self._quick_exits = 0
        self._mode = "friendly"  # REPL mode, tracked from the node's output
        self._tail = b""
        self._last = b""
        self._restart_at: float | None = None
        self._next_boot = ("hard", b"")
        self._kill_reason: tuple[str, float] | None = None
        self._pending = b""
        self._events: list[tuple[float, str, float, float]] = []
        self.delivery_log: DeliveryLog | None = (
            DeliveryLog(folder / DELIVERY_LOG_NAME, nid) if sup.cfg.delivery_log else None)
        self._attached = False
        self._splice: list[bytes] = []  # garbage_inline waiting for the next frame line
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-{nid}", daemon=True)

    # -- public ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def info(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "zone": self.zone,
            "port": self.port,
            "by_id": str(self.by_id) if self.port else None,
            "serial_number": self.serial_number,
            "pid": self.pid,
            "state": self.state,
            "boots": self.boots,
            "folder": str(self.folder),
            "board": self.sim.get("board"),
            "auth": self.sim.get("auth", "strict"),
            "mesh": self.sim.get("mesh"),
            "delivery_log": str(self.delivery_log.path) if self.delivery_log else None,
        }

    # -- relay thread ---------------------------------------------------------------------

    def _run(self) -> None:
        t0 = time.monotonic()
        for f in self._faults:
            dur = f.duration_s if f.duration_s is not None else DEFAULT_DURATION_S[f.kind]
            value = f.value if f.value is not None else DEFAULT_VALUE.get(f.kind, 0)
            self._events.append((t0 + self.sup.cfg.wall_s(f.at_s), f.kind, self.sup.cfg.wall_s(dur), float(value)))
        self._events.sort()
        try:
            self._open_public()
            self._start_process("hard", b"")
            self._ready.set()
            while not self._stop.is_set():
                self._loop_once()
        except Exception as exc:  # never leave a half-dead node without saying why
            self.sup.message(f"{self.node_id}: relay failed: {exc!r}")
            self.state = "failed"
        finally:
            self._ready.set()
            self._shutdown()

    def _loop_once(self) -> None:
        now = time.monotonic()
        while self._events and self._events[0][0] <= now:
            _, kind, dur, value = self._events.pop(0)
            self._fault(kind, dur, value, now)
        if self._proc is None and self._restart_at is not None and now >= self._restart_at:
            mode, banner = self._next_boot
            self._restart_at = None
            self._start_process(mode, banner)
        poller = select.poll()
        if self._inner >= 0:
            poller.register(self._inner, select.POLLIN)
        connected = self._client_connected()
        if connected:
            poller.register(self._pub, select.POLLIN)
        if connected != self._attached:
            self._attached = connected
            if self.delivery_log is not None:
                self.delivery_log.event("attach" if connected else "detach", port=self.port)
        for fd, _ in poller.poll(POLL_MS):
            if fd == self._inner:
                self._from_node()
            elif fd == self._pub:
                self._from_host()

    def _client_connected(self) -> bool:
        # The master side of a pty reports POLLHUP while no one has the device open;
        # output written then is dropped, like a board printing into an unplugged USB port.
        if self._pub < 0:
            return False
        p = select.poll()
        p.register(self._pub, select.POLLIN)
        return not any(ev & select.POLLHUP for _, ev in p.poll(0))

    def _from_node(self) -> None:
        try:
            data = os.read(self._inner, 4096)
        except OSError:  # EIO: the process closed its terminal, i.e. exited
            data = b""
        if not data:
            self._process_exited()
            return
        data = self._translate(data)
        if self._splice:
            at = data.find(FRAME_MARKER)
            if at >= 0:
                cut = min(len(data), at + SPLICE_AT)
                self._to_host(data[:cut])
                self._garbage(self._splice.pop(0), "garbage_inline")
                data = data[cut:]
        self._to_host(data)

    def _translate(self, data: bytes) -> bytes:
        buf = self._tail + data
        raw_at, friendly_at = buf.rfind(RAW_PROMPT), buf.rfind(FRIENDLY_BANNER)
        start_mode = self._mode
        if raw_at > friendly_at:
            self._mode = "raw"
        elif friendly_at > raw_at:
            self._mode = "friendly"
        self._tail = buf[-64:]
        if start_mode == "friendly":
            # The unix port prints "\n" where the chip prints "\r\n"; the raw REPL is
            # left byte-exact (raw-paste window sizes and mpremote's mount protocol are binary).
            prefix = b"\r" if self._last == b"\r" else b""
            data = _LONE_LF.sub(b"\r\n", prefix + data)[len(prefix):]
        self._last = data[-1:]
        return data

    def _to_host(self, data: bytes) -> None:
        written = self._write_host(data)
        if self.delivery_log is not None and data:
            self.delivery_log.output(data, written)

    def _garbage(self, data: bytes, kind: str) -> None:
        written = self._write_host(data)
        if self.delivery_log is not None:
            self.delivery_log.garbage(len(data), written, kind)

    def _write_host(self, data: bytes) -> int:
        """Write to the public pty; returns how many leading bytes got there."""
        if not data or not self._client_connected():
            return 0
        view = memoryview(data)
        done = 0
        while view:
            try:
                n = os.write(self._pub, view)
            except (BlockingIOError, OSError):
                break  # host not reading: drop, as a UART would
            view = view[n:]
            done += n
        return done

    def _from_host(self) -> None:
        try:
            data = os.read(self._pub, 4096)
        except OSError:
            return
        if not data:
            return
        if self._inner < 0:
            # Held for the restarted process, like bytes waiting in a UART FIFO while
            # the chip soft-resets (mpremote may type ahead); dropped on a power cut.
            self._pending = (self._pending + data)[-PENDING_MAX:]
            return
        self._write_node(data)

    def _write_node(self, data: bytes) -> None:
        deadline = time.monotonic() + 2.0
        view = memoryview(data)
        while view and time.monotonic() < deadline:
            try:
                view = view[os.write(self._inner, view):]
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                return

    # -- process lifecycle ----------------------------------------------------------------

    def _start_process(self, mode: str, banner: bytes) -> None:
        if banner:
            self._to_host(banner)
        master, slave = os.openpty()
        try:
            _configure_inner_tty(slave)
            cfg = self.sup.cfg
            cmd = list(micropython_command())
            if cfg.heapsize:
                cmd += ["-X", f"heapsize={cfg.heapsize}"]
            cmd += ["-i", str(BOOT_SHIM)]
            env = dict(os.environ)
            # Precompiled firmware first (no compiler peak on a small heap), the sources
            # after it for main.py; files deployed into the node folder win over both.
            env["MICROPYPATH"] = ":".join([str(self.folder)] + firmware_path())
            env["CANOPY_SIM_BOOT"] = mode
            self._proc = subprocess.Popen(
                cmd, stdin=slave, stdout=slave, stderr=slave, cwd=self.folder, env=env,
                close_fds=True, preexec_fn=_become_tty_session,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        if mode == "raw":
            # Queued before the REPL starts, so it comes up in the raw REPL (mpremote's
            # soft reset waits for "raw REPL; CTRL-B to exit" without sending anything).
            os.write(master, b"\x01")
        self._inner = master
        pending, self._pending = self._pending, b""
        if pending:
            self._write_node(pending)
        self._mode = "raw" if mode == "raw" else "friendly"
        self._tail = self._last = b""  # the old process's prompts say nothing about this one
        self._proc_started = time.monotonic()
        self.pid = self._proc.pid
        self.boots += 1
        if self.delivery_log is not None:
            self.delivery_log.event("start", mode=mode, pid=self.pid, starts=self.boots)
        self.state = "running" if self._pub >= 0 else "disconnected"
        self.sup.node_changed(self)

    def _process_exited(self) -> None:
        if self.delivery_log is not None:
            self.delivery_log.cut()
        if self._inner >= 0:
            os.close(self._inner)
            self._inner = -1
        proc, self._proc = self._proc, None
        rc = self._reap(proc)
        self.pid = None
        if self._stop.is_set():
            return
        now = time.monotonic()
        quick = now - self._proc_started < 1.0 and rc != 0 and self._kill_reason is None
        self._quick_exits = self._quick_exits + 1 if quick else 0
        # A node that crashes straight after boot would otherwise spin the CPU (a boot loop);
        # soft reboots (Ctrl-D) restart at once because mpremote is waiting for them.
        delay = min(5.0, 0.5 * self._quick_exits)
        if self._kill_reason is not None:
            why, downtime = self._kill_reason
            self._kill_reason = None
            self._pending = b""
            self._next_boot = ("hard", b"\r\nrst:0x1 (POWERON_RESET) virtual node %s: %s\r\n" % (self.node_id.encode(), why.encode()))
            delay = max(delay, downtime)
            self.reboots.append(why)
        elif rc == 0 or rc == -signal.SIGUSR2:
            # Ctrl-D in a REPL, or sys.exit() out of main.py (the boot shim's SIGUSR2).
            self._next_boot = ("raw" if self._mode == "raw" else "soft", SOFT_REBOOT)
            self.reboots.append("soft-raw" if self._mode == "raw" else "soft")
        else:
            reset = rc in (RESET_STATUS, -signal.SIGUSR1)
            cause = "reset" if reset else f"crash, exit status {rc}"
            self._next_boot = ("hard", b"\r\nrst:0xc (SW_CPU_RESET) virtual node %s: %s\r\n" % (self.node_id.encode(), cause.encode()))
            self.reboots.append("reset" if reset else f"crash:{rc}")
            if not reset:
                self.sup.message(f"{self.node_id}: process died (exit status {rc}); restarting in {delay:.1f} s")
        if self.delivery_log is not None:
            self.delivery_log.event("exit", status=rc, why=self.reboots[-1], restart_in=round(delay, 3))
        del self.reboots[:-REBOOT_HISTORY]
        self._restart_at = now + delay
        self.state = "rebooting"
        self.sup.node_changed(self)

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes] | None) -> int | None:
        if proc is None:
            return None
        try:
            return proc.wait(2)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            return proc.wait()

    def _kill(self, why: str, downtime: float) -> None:
        if self._proc is None:
            return
        self._kill_reason = (why, downtime)
        _kill_group(self._proc.pid, signal.SIGKILL)

    # -- public pty and serial faults -----------------------------------------------------

    def _open_public(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        self.port = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(master, False)
        self._pub = master
        self.by_id.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.by_id.with_name(self.by_id.name + ".tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.port)
        os.replace(tmp, self.by_id)

    def _close_public(self) -> None:
        if self._pub >= 0:
            os.close(self._pub)  # the /dev/pts entry disappears; open handles get EIO
            self._pub = -1
        self.port = None
        try:
            self.by_id.unlink()
        except OSError:
            pass

    def _fault(self, kind: str, dur: float, value: float, now: float) -> None:
        if self.delivery_log is not None and kind not in ("garbage", "garbage_inline"):
            self.delivery_log.event(kind, duration=round(dur, 3), port=self.port)
        if kind == "disconnect":
            # Publish first: whoever sees the port fail then already reads the new state.
            self.state, self.port = "disconnected", None
            self.sup.node_changed(self, f"{self.node_id}: unplugged (back in {dur:.1f} s)")
            self._close_public()
            self._events.append((now + dur, "reconnect", 0.0, 0.0))
            self._events.sort()
        elif kind == "reconnect":
            self._open_public()
            self.state = "running" if self._proc is not None else "rebooting"
            self.sup.node_changed(self, f"{self.node_id}: plugged in again at {self.port}")
        elif kind == "reboot":
            self.sup.message(f"{self.node_id}: reboot (fault injection)")
            self._kill("reboot fault", dur)
        elif kind in ("garbage", "garbage_inline"):
            noise = self._rng.randbytes(max(1, int(value)))
            if kind == "garbage":
                self._garbage(noise, kind)
            else:
                # Spliced into the next frame line the node prints (_from_node), so it
                # always damages a frame; plain garbage lands wherever the stream is.
                self._splice.append(noise)
            if dur > 0:
                # Repeats until the window closes; the remaining window travels with the event.
                if dur > GARBAGE_REPEAT_S:
                    self._events.append((now + GARBAGE_REPEAT_S, kind, dur - GARBAGE_REPEAT_S, value))
                    self._events.sort()

    def _shutdown(self) -> None:
        if self._proc is not None:
            _kill_group(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(1.0)
            except subprocess.TimeoutExpired:
                _kill_group(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            self._proc = None
        if self._inner >= 0:
            os.close(self._inner)
            self._inner = -1
        self._close_public()
        if self.delivery_log is not None:
            self.delivery_log.event("stop")
            self.delivery_log.close()
        self.pid = None
        if self.state != "failed":
            self.state = "stopped"
        self.sup.node_changed(self)


def _kill_group(pid: int, sig: int) -> None:
    # Each node is its own session and process group (pgid == pid), so this reaches
    # anything it spawned and nothing else.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Supervisor:
    """Starts, restarts and stops the virtual nodes; keeps the state file current."""

    def __init__(self, cfg: SimConfig, on_message: Callable[[str], None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.nodes: list[VirtualNode] = []
        self._on_message = on_message
        self._lock = threading.Lock()
        self._started = False

    def message(self, text: str) -> None:
        if self._on_message:
            self._on_message(text)

    def node(self, nid: str) -> VirtualNode:
        for n in self.nodes:
            if n.node_id == nid:
                return n
        raise KeyError(nid)

    def start(self) -> None:
        micropython_command()  # fail early, with the install hint, if the unix port is missing
        self._check_not_running()
        try:
            self._prepare_nodes()
        except OSError as exc:
            raise CanopyError(f"cannot set up the node folders under {self.cfg.directory}: {exc}") from exc
        self._started = True
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_ready()
        self.write_state()

    def _prepare_nodes(self) -> None:
        cfg = self.cfg
        cfg.directory.mkdir(parents=True, exist_ok=True)
        from . import mesh_sim

        ids = [node_id(i, cfg.nodes) for i in range(1, cfg.nodes + 1)]
        meshes = (mesh_sim.mesh_sections(ids, cfg.mesh, {n: derived_seed(cfg.seed, "mesh", n) for n in ids})
                  if cfg.mesh is not None else {})
        for i in range(1, cfg.nodes + 1):
            nid = node_id(i, cfg.nodes)
            zone = zone_name((i - 1) % cfg.zones)
            folder = (cfg.directory / nid).resolve()
            if cfg.fresh and folder.is_dir():
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            mine = [f for f in cfg.faults if f.node in (nid, "all")]
            sim = {
                "node_id": nid,
                "zone": zone,
                "seed": derived_seed(cfg.seed, "node", nid),
                "zone_seed": derived_seed(cfg.seed, "zone", zone),
                "speed": cfg.speed,
                "weather": cfg.weather,
                "board": cfg.board,
                "serial_number": usb_serial_number(nid),
                "faults": [f.sim_json() for f in mine if f.kind in SENSOR_FAULTS],
            }
            if mesh_sim.provision_virtual(folder, nid, cfg.master_key) == "dev":
                sim["auth"] = "dev"  # no key: the node says UNAUTHENTICATED DEV MODE (docs/security.md)
            if nid in meshes:
                sim["mesh"] = meshes[nid]
                mesh_sim.write_control(folder, down=None, blocked=None)  # a fresh start heals
            (folder / "sim.json").write_text(json.dumps(sim, indent=1) + "\n")
            self.nodes.append(VirtualNode(self, nid, zone, folder, sim,
                                          [f for f in mine if f.kind in SERIAL_FAULTS]))

    def stop(self) -> None:
        for n in self.nodes:
            n._stop.set()
        for n in self.nodes:
            n.stop()
        if self._started:
            self.write_state(running=False)
            self._started = False

    def __enter__(self) -> Supervisor:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def node_changed(self, node: VirtualNode, text: str | None = None) -> None:
        if self._started:
            self.write_state()
        if text:
            self.message(text)

    def state(self, running: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "version": 1,
            "supervisor_pid": os.getpid() if running else None,
            "running": running,
            "directory": str(cfg.directory.resolve()),
            "seed": cfg.seed,
            "speed": cfg.speed,
            "weather": cfg.weather,
            "zones": cfg.zones,
            "master_key_file": str(cfg.master_key_file.resolve()) if cfg.master_key_file else None,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "nodes": [n.info() for n in self.nodes],
        }

    def write_state(self, running: bool = True) -> None:
        path = self.cfg.state_path
        with self._lock:
            data = json.dumps(self.state(running), indent=1) + "\n"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(data)
            os.replace(tmp, path)  # readers never see a half-written file

    def _check_not_running(self) -> None:
        try:
            old = json.loads(self.cfg.state_path.read_text())
            pid = int(old.get("supervisor_pid") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            return
        if pid and pid != os.getpid() and old.get("running"):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            raise CanopyError(
                f"another `canopy sim` (pid {pid}) is already running in {self.cfg.directory}; "
                "stop it first or use a different --dir"
            )

    def run(self, duration: float | None = None) -> None:
        """Block until `duration` wall seconds pass (None: until KeyboardInterrupt)."""
        end = None if duration is None else time.monotonic() + duration
        while end is None or time.monotonic() < end:
            time.sleep(0.2 if end is None else max(0.0, min(0.2, end - time.monotonic())))
            if all(n.state == "failed" for n in self.nodes):
                raise CanopyError("every virtual node's relay failed; see the messages above")
