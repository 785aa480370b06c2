"""The collector behind `canopy monitor`: one reader thread per port, one shared tracker.

Each `PortReader` owns one port: it opens it (through `transport.open_port`, so a
physical `/dev/ttyUSB0`, a virtual node's pty and a `socket://` URL take the same path),
feeds the bytes to its own `protocol.FrameParser` and hands the frames to the
`Collector`. When the port dies (unplug, pty gone, I/O error) the reader records a
disconnect and reopens it with exponential backoff. Before each reopen it asks its
`PortSpec` where the node is NOW: a USB node is found again by its USB serial number
(replugging may change ttyUSB0 into ttyUSB1), a virtual node by re-reading the sim
state file (a replugged virtual node gets a new pty).

The `Collector` keys everything by node id (from the frames), not by port: it detects
per node gaps (exact missing seq ranges within one boot), duplicates and reboots (a new
boot id), counts CRC errors/garbage reported by the parser, and sends every frame and
every link event to the `Store`.

With a `HostAuth` (the mesh master key, docs/security.md) every frame's tag and replay
window are checked first: a frame that fails is never treated as data (no reading, no
seq tracking, not in `frames`) but stored as a `security` link event with its verdict
and raw bytes, and counted per node (docs/monitor.md "Authentication").

A tool that needs one node's port to itself while the others stay monitored (the
repair loop, `canopy_host.repair_loop`) borrows it: `with reader.lend(): ...` closes
the port, records a `lent` link event (not a disconnect) and reopens it afterwards.

    collector = Collector(store)
    readers = [PortReader(spec, collector) for spec in specs]
    for r in readers: r.start()
    ...
    for r in readers: r.stop()
    store.close()
"""

from __future__ import annotations

import json
import operator
import threading
import time
from collections import deque
from itertools import repeat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CanopyError
from .paths import BOARDS_DIR
from .protocol import READING_KEYS, compact_frame
from .store import FRAME_ROW_HEAD, Store, frame_row

# docs/protocol.md: the per-boot seq starts at 0 and wraps from 0x3FFFFFFF back to 0
# (it stays a small int on the ESP32). FIRST_SEQ lets us report frames lost right
# after a reboot.
FIRST_SEQ = 0
SEQ_MODULUS = 0x40000000
RATE_WINDOW_S = 10.0
MAX_TEXT_LINE = 500
MAX_GAP_RANGES = 1000  # kept in memory per node for the summary
# frames behind a node's newest: an authentic copy arriving through a second port within
# this is the mesh relaying it (Collector._relayed_copy); the host replay window's size
RELAY_WINDOW = 64
# where a run row (FrameParser.feed_run) keeps its node, seq and values
_row_node = operator.itemgetter(len(FRAME_ROW_HEAD))
_ROW_SEQ = len(FRAME_ROW_HEAD) + 2
_ROW_VALUES = len(FRAME_ROW_HEAD) + 3


# -- where ports come from ------------------------------------------------------------


@dataclass
class PortSpec:
    """A port to follow and how to find it again after a replug."""

    label: str  # what the dashboard shows before the node id is known
    path: str | None  # last known path/URL
    node_hint: str | None = None
    usb_serial: str | None = None
    zone: str | None = None
    resolver: Callable[[], str | None] | None = None  # re-locates the port (replug)
    must_exist: bool = False  # a typed-in path that does not exist is a user mistake
    # USB: if the serial-number lookup finds nothing, retry the last path (lookups can
    # fail where sysfs is missing). Sim: "no port" is authoritative; the old pty
    # number may already belong to another process.
    keep_last_path: bool = True

    def resolve(self) -> str | None:
        if self.resolver is not None:
            try:
                found = self.resolver()
            except Exception:  # an unreadable state file etc.: try again later
                found = None
            if found:
                self.path = found
            elif not self.keep_last_path:
                return None
        return self.path


def _is_url(port: str) -> bool:
    return "://" in port


def explicit_specs(ports: Iterable[str]) -> list[PortSpec]:
    """Specs for ports named on the command line; USB ones are re-found by serial number."""
    usb = {p.device: p for p in _comports()}
    specs = []
    for port in ports:
        if port.startswith("sim:"):  # a virtual node by id, found via the sim state file
            specs.append(PortSpec(label=port[4:], path=None, node_hint=port[4:], resolver=_sim_id_resolver(port),
                                  keep_last_path=False))
            continue
        info = usb.get(port)
        serial_no = getattr(info, "serial_number", None) if info else None
        spec = PortSpec(label=port, path=port, usb_serial=serial_no, must_exist=not _is_url(port))
        if serial_no:
            spec.resolver = _usb_resolver(serial_no, getattr(info, "vid", None), getattr(info, "pid", None))
        specs.append(spec)
    return specs


def _sim_id_resolver(port: str) -> Callable[[], str | None]:
    def resolve() -> str | None:
        from .transport import resolve_port  # $CANOPY_SIM_STATE or var/sim/state.json

        try:
            return resolve_port(port)
        except CanopyError:
            return None

    return resolve


def _comports() -> list[Any]:
    try:
        from serial.tools import list_ports

        return list(list_ports.comports())
    except Exception:  # no sysfs (containers) etc.: nothing to discover
        return []


def _usb_resolver(serial_no: str, vid: int | None, pid: int | None) -> Callable[[], str | None]:
    def resolve() -> str | None:
        for p in _comports():
            if p.serial_number == serial_no and (vid is None or p.vid == vid) and (pid is None or p.pid == pid):
                return str(p.device)
        return None

    return resolve


def board_usb_ids(boards_dir: Path = BOARDS_DIR) -> dict[tuple[int, int], str]:
    """(VID, PID) -> 'bridge (board, board...)' from the usb hints in boards/*.json."""
    ids: dict[tuple[int, int], list[str]] = {}
    for path in sorted(boards_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            for hint in data.get("usb", []):
                key = (int(str(hint["vid"]), 16), int(str(hint["pid"]), 16))
                ids.setdefault(key, []).append(f"{hint.get('bridge', '?')}:{data.get('name', path.stem)}")
        except (ValueError, KeyError, TypeError, OSError):
            continue  # a broken board file must not stop the monitor
    return {k: ", ".join(v) for k, v in ids.items()}


def discover_usb_specs(boards_dir: Path = BOARDS_DIR) -> list[PortSpec]:
    """Ports whose USB VID:PID matches a known board's bridge."""
    ids = board_usb_ids(boards_dir)
    specs = []
    for p in _comports():
        if p.vid is None or (p.vid, p.pid) not in ids:
            continue
        serial_no = p.serial_number
        spec = PortSpec(label=str(p.device), path=str(p.device), usb_serial=serial_no)
        # Cheap CP2102s all report serial "0001": re-finding by serial would be ambiguous.
        if serial_no and sum(1 for q in _comports() if q.serial_number == serial_no) == 1:
            spec.resolver = _usb_resolver(serial_no, p.vid, p.pid)
        specs.append(spec)
    return specs


def read_sim_state(path: str | Path) -> list[dict[str, Any]]:
    """The node entries of a `canopy sim` state file, normalised to
    {'node', 'zone', 'path', 'usb_serial'} (tolerates a list, {'nodes': [...]} or
    {'nodes': {id: {...}}})."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CanopyError(f"sim state file {str(path)!r} not found (start virtual nodes with `canopy sim`)") from None
    except (OSError, ValueError) as exc:
        raise CanopyError(f"cannot read sim state file {str(path)!r}: {exc}") from None
    entries: Any = data.get("nodes", data) if isinstance(data, dict) else data
    if isinstance(entries, dict):
        entries = [dict(v, node_id=v.get("node_id", k)) if isinstance(v, dict) else {} for k, v in entries.items()]
    if not isinstance(entries, list):
        raise CanopyError(f"{str(path)!r} does not look like a canopy sim state file")
    out = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        node = e.get("node_id") or e.get("node") or e.get("id")
        port = e.get("pty") or e.get("path") or e.get("port") or e.get("device")
        if not node:
            continue
        out.append(
            {
                "node": str(node),
                "zone": None if e.get("zone") is None else str(e.get("zone")),
                "path": None if not port else str(port),
                "usb_serial": e.get("usb_serial") or e.get("serial_number") or e.get("serial"),
                # A disconnected virtual node may be listed without a usable path.
                "connected": e.get("connected", True),
            }
        )
    return out


def sim_specs(state_file: str | Path) -> list[PortSpec]:
    specs = []
    for entry in read_sim_state(state_file):
        node = entry["node"]

        def resolve(node: str = node) -> str | None:
            for e in read_sim_state(state_file):
                if e["node"] == node and e["path"] and e["connected"] is not False:
                    return str(e["path"])
            return None

        specs.append(
            PortSpec(
                label=node,
                path=entry["path"],
                node_hint=node,
                usb_serial=entry["usb_serial"],
                zone=entry["zone"],
                resolver=resolve,
                keep_last_path=False,
            )
        )
    if not specs:
        raise CanopyError(f"sim state file {str(state_file)!r} lists no nodes")
    return specs


# -- per-port and per-node state --------------------------------------------------------

# parser attribute -> link event kind. garbage_bytes counts every byte outside good
# frames (free text included, see protocol.FrameParser).
PARSER_COUNTERS = (
    ("crc_errors", "crc_error"),
    ("malformed", "malformed"),
    ("oversize", "oversize"),
    ("unsupported", "unsupported"),
    ("garbage_bytes", "garbage"),
)


_counters = operator.attrgetter(*(attr for attr, _ in PARSER_COUNTERS))


@dataclass
class PortState:
    spec: PortSpec
    path: str | None = None
    node: str | None = None
    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    open_failures: int = 0
    status: str = "waiting"
    counters: dict[str, int] = field(default_factory=lambda: {k: 0 for k, _ in PARSER_COUNTERS})
    seen: dict[str, int] = field(default_factory=lambda: {k: 0 for k, _ in PARSER_COUNTERS})
    # nodes whose frames came through this port since it (re)connected: one for a wired
    # node, several for a mesh gateway, which relays every node's frames (docs/mesh.md)
    nodes_here: set[str] = field(default_factory=set)
    # Collector._frames' shortcut across reads: the node state of this port's last frame,
    # dropped (Collector._unfast) when anything else touches that node or this port.
    fast: Any = field(default=None, repr=False, compare=False)
    # The same shortcut for a port that carries several nodes (a gateway): node ->
    # [boot, next seq] of each node tracked here, for FrameParser.feed_gateway.
    gateway: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class NodeState:
    node: str
    port: str | None = None
    zone: str | None = None
    usb_serial: str | None = None
    boot: int | None = None
    last_seq: int | None = None
    frames: int = 0
    readings: int = 0
    gaps: int = 0
    missing: int = 0
    gap_ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (boot, from, to)
    duplicates: int = 0
    reboots: int = 0
    crc_errors: int = 0
    malformed: int = 0
    oversize: int = 0
    unsupported: int = 0
    garbage_bytes: int = 0
    connects: int = 0
    disconnects: int = 0
    last_reading: dict[str, Any] = field(default_factory=dict)
    hello: dict[str, Any] = field(default_factory=dict)
    last_event: str = ""
    last_rx: float = 0.0
    recent: deque[float] = field(default_factory=deque)
    connected: bool = False
    # Frames this host refused (docs/security.md verdicts) and rejects the node reported
    # itself (its `E code=security` events: commands it refused).
    sec_rejects: int = 0
    security: dict[str, int] = field(default_factory=dict)
    node_sec_rejects: int = 0
    # Ports its accepted frames came through, and authentic copies of frames already
    # accepted that arrived through another one (a node followed both directly and
    # through the mesh gateway): counted, not stored, not a security alarm.
    paths: set[str] = field(default_factory=set)
    relayed: int = 0

    def rate(self, now: float) -> float:
        """Frames per second over the last RATE_WINDOW_S seconds."""
        while self.recent and self.recent[0] < now - RATE_WINDOW_S:
            self.recent.popleft()
        if len(self.recent) < 2:
            return 0.0
        span = max(now - self.recent[0], 1e-3)
        return len(self.recent) / min(max(span, 1.0), RATE_WINDOW_S)


class Collector:
    """Shared, thread-safe tracker: readers call `feed`/`ingest`/`link_*`; UI calls `snapshot`."""

    # False: every frame takes the general tracker (the tests' reference for the shortcuts)
    FAST_PATH = True

    def __init__(
        self,
        store: Store | None,
        *,
        on_frame: Callable[[float, str, Any], None] | None = None,
        clock: Callable[[], float] = time.time,
        auth: Any = None,
    ) -> None:
        self.store = store
        # canopy_host.security.HostAuth (or anything with verify(frame) -> verdict):
        # every frame is checked before it counts as data. None: frames are trusted.
        self.auth = auth
        self.sec_rejects = 0
        self.on_frame = on_frame
        self.clock = clock
        self.lock = threading.Lock()
        self.nodes: dict[str, NodeState] = {}
        self.ports: list[PortState] = []
        self.total_frames = 0
        self.started = clock()
        self.messages: deque[str] = deque(maxlen=20)  # user-facing notices (bad ports...)
        # node -> the port whose `fast` shortcut is that node (at most one port per node)
        self._fast_port: dict[str, PortState] = {}
        # node -> the port whose `gateway` expectations hold it (at most one)
        self._gateway_port: dict[str, PortState] = {}

    def add_port(self, spec: PortSpec) -> PortState:
        with self.lock:
            ps = PortState(spec=spec, path=spec.path)
            self.ports.append(ps)
            if spec.node_hint:
                self._unfast(spec.node_hint)
                self._node(spec.node_hint, ps)
            return ps

    # -- helpers (lock held) --

    def _node(self, node: str, ps: PortState | None) -> NodeState:
        st = self.nodes.get(node)
        if st is None:
            st = self.nodes[node] = NodeState(node=node)
        if ps is not None:
            st.zone = ps.spec.zone or st.zone
            st.usb_serial = ps.spec.usb_serial or st.usb_serial
            st.port = ps.path or st.port
        return st

    def _unfast(self, node: str) -> None:
        other = self._fast_port.pop(node, None)
        if other is not None:
            other.fast = None
        gw = self._gateway_port.pop(node, None)
        if gw is not None:
            gw.gateway.pop(node, None)

    def _unfast_port(self, ps: PortState) -> None:
        # link events change the port's node state (connected, port): no shortcut for it
        ps.fast = None
        name = ps.node or ps.spec.node_hint
        if name:
            self._unfast(name)
        for node in list(ps.gateway):
            self._unfast(node)

    def _event(self, rx: float, ps: PortState, kind: str, **kw: Any) -> None:
        if self.store is not None:
            self.store.add_event(rx, ps.path or ps.spec.label, ps.node or ps.spec.node_hint, kind, **kw)

    def _port_node(self, ps: PortState) -> NodeState | None:
        name = ps.node or ps.spec.node_hint
        return self.nodes.get(name) if name else None

    # -- called by readers --

    def link_connected(self, ps: PortState, path: str) -> None:
        rx = self.clock()
        with self.lock:
            self._unfast_port(ps)
            ps.path = path
            ps.connected = True
            ps.connects += 1
            ps.nodes_here = {ps.node} if ps.node else set()
            ps.status = "connected"
            self._event(rx, ps, "connect", detail=path)
            st = self._port_node(ps)
            if st is not None:
                st.connects += 1
                st.connected = True
                st.port = path
                st.last_event = f"connect {path}"

    def link_lost(self, ps: PortState, reason: str) -> None:
        rx = self.clock()
        with self.lock:
            self._unfast_port(ps)
            ps.connected = False
            ps.disconnects += 1
            ps.status = f"disconnected: {reason}"
            self._event(rx, ps, "disconnect", detail=reason)
            st = self._port_node(ps)
            if st is not None:
                st.disconnects += 1
                st.connected = False
                st.last_event = "disconnect"

    def port_lent(self, ps: PortState, why: str) -> None:
        """The reader closed the port on request (PortReader.lend): not a disconnect."""
        rx = self.clock()
        with self.lock:
            self._unfast_port(ps)
            was = ps.connected
            ps.connected = False
            ps.status = f"lent: {why}"
            self._event(rx, ps, "lent", detail=why)
            st = self._port_node(ps)
            if st is not None and was:
                st.connected = False
                st.last_event = f"port lent: {why}"

    def open_failed(self, ps: PortState, path: str | None, reason: str, *, first: bool) -> None:
        rx = self.clock()
        with self.lock:
            ps.open_failures += 1
            ps.status = f"cannot open: {reason}"
            if first:  # one event per outage, not one per retry
                self._event(rx, ps, "open_failed", detail=f"{path}: {reason}")
                self.messages.append(f"{path or ps.spec.label}: cannot open ({reason}); retrying")

    def feed(self, ps: PortState, parser: Any, data: bytes, rx: float | None = None) -> None:
        """Parse one serial read with `parser` and account for it (PortReader, per read).

        Uses the parser's compact readings when it has them (FrameParser.feed_compact)
        and, where nothing needs a Frame (no on_frame), its run of readings that continue
        the node this port is tracking (FrameParser.feed_run): those become store rows in
        one compiled call, the bulk of a busy monitor's traffic. With `auth`, the run's
        tags are checked in one batch (HostAuth.verify_run) and it ends before the first
        frame that fails, which the general path then rejects as usual."""
        run = getattr(parser, "feed_run", None)
        verify_run = getattr(self.auth, "verify_run", None) if self.auth is not None else None
        if run is None or not self.FAST_PATH or self.on_frame is not None or (self.auth is not None and verify_run is None):
            compact = getattr(parser, "feed_compact", None)
            self.ingest(ps, parser, compact(data) if compact is not None else parser.feed(data), rx)
            return
        if rx is None:
            rx = self.clock()
        with self.lock:
            st = ps.fast
            head = (rx, ps.path or ps.spec.label, "reading", None)
            if ps.gateway and hasattr(parser, "feed_gateway"):
                rows, frames = parser.feed_gateway(data, ps.gateway, head, verify_run)
                # in the order the general path takes a read: its counters and text (on
                # the port's node so far), then its frames, the run's first
                if frames is not None:
                    self._count(ps, parser, rx)
                if rows:
                    self._run_many(ps, rows, rx)
                if frames:
                    self._frames(ps, frames, rx)
                return
            elif st is None:
                frames = parser.feed_compact(data)
            else:
                rows, frames = run(data, st.node, st.boot, st.last_seq + 1, head, verify_run)
                if rows:
                    self._run(st, rows, rx)
            if frames is not None:
                self._ingest_locked(ps, parser, frames, rx)

    def _run(self, st: NodeState, rows: list[tuple[Any, ...]], rx: float) -> None:
        # rows are store rows: FRAME_ROW_HEAD + (node, boot, seq, *values), in sequence
        self._account(st, len(rows), rows[-1], rx)
        self.total_frames += len(rows)
        if self.store is not None:
            self.store.add_frame_rows(rows)

    def _run_many(self, ps: PortState, rows: list[tuple[Any, ...]], rx: float) -> None:
        # a gateway's run: several nodes' in-sequence readings, interleaved
        nodes = list(map(_row_node, rows))
        for node, last in dict(zip(nodes, rows)).items():
            self._account(self.nodes[node], nodes.count(node), last, rx)
        self.total_frames += len(rows)
        ps.node = nodes[-1]
        if self.store is not None:
            self.store.add_frame_rows(rows)

    @staticmethod
    def _account(st: NodeState, n: int, last: tuple[Any, ...], rx: float) -> None:
        st.last_seq = last[_ROW_SEQ]
        st.frames += n
        st.readings += n
        st.last_rx = rx
        recent = st.recent
        recent.extend(repeat(rx, n))
        cutoff = rx - RATE_WINDOW_S
        while recent[0] < cutoff:
            recent.popleft()
        st.last_reading = dict(zip(READING_KEYS, last[_ROW_VALUES:]))

    def ingest(self, ps: PortState, parser: Any, frames: list[Any], rx: float | None = None) -> None:
        """Account for one parser.feed() result: counters, free text, then frames."""
        if rx is None:
            rx = self.clock()
        with self.lock:
            self._ingest_locked(ps, parser, frames, rx)

    def _ingest_locked(self, ps: PortState, parser: Any, frames: list[Any], rx: float) -> None:
        self._count(ps, parser, rx)
        if frames:
            self._frames(ps, frames, rx)

    def _count(self, ps: PortState, parser: Any, rx: float) -> None:
        """The parser's counters and free-text lines since the last read, as events."""
        try:  # one C call per read in the common case: no counter moved
            moved = _counters(parser) != tuple(ps.seen.values())
        except AttributeError:  # a parser without some counters: check one by one
            moved = True
        st = self._port_node(ps) if moved else None
        for attr, kind in PARSER_COUNTERS if moved else ():
            now = int(getattr(parser, attr, 0))
            delta = now - ps.seen[attr]
            if delta > 0:
                ps.seen[attr] = now
                ps.counters[attr] += delta
                self._event(rx, ps, kind, count=delta)
                if st is not None:
                    setattr(st, attr, getattr(st, attr) + delta)
        lines = getattr(parser, "text_lines", None)
        if lines:
            for line in lines:
                text = line.decode("utf-8", "replace") if isinstance(line, (bytes, bytearray)) else str(line)
                self._event(rx, ps, "text", detail=text[:MAX_TEXT_LINE])
            del lines[:]

    def _frames(self, ps: PortState, frames: list[Any], rx: float) -> None:
        store = self.store
        on_frame = self.on_frame
        rows: list[tuple[Any, ...]] = []
        port = ps.path or ps.spec.label  # ps cannot change while the lock is held
        cutoff = rx - RATE_WINDOW_S
        # `fast` is the node whose previous frame was accounted for through _frame() on
        # this port (in this call, or in an earlier one if nothing has dropped ps.fast
        # since): port bookkeeping done, ps.node is this node, boot known. Its next in-sequence
        # reading then only needs the counters below; anything else (other node, reboot,
        # gap, duplicate, other kind, a frame to verify or to show) takes _frame().
        fast: NodeState | None = None
        if self.FAST_PATH:
            fast = ps.fast
        verify = self.auth.verify if self.auth is not None else None
        # compact readings (protocol.compact_frame) stay compact only where nothing
        # needs a Frame: no verification, no on_frame consumer
        keep_compact = verify is None and on_frame is None
        # the values of `fast`'s last compact reading: last_reading is converted from it
        # once per read, when `fast` changes or the read ends, not once per frame
        pending: list[str] | None = None
        # the nodes whose state this call leaves consistent on this port (a gateway's
        # expectations are refreshed for them at the end)
        touched = {fast.node} if fast is not None else set()
        for f in frames:
            if type(f) is tuple:
                st = fast
                if (keep_compact and st is not None and f[0] == st.node and f[1] == st.boot
                        and f[2] == st.last_seq + 1):  # type: ignore[operator]
                    node, boot, seq, values, _, _ = f
                    st.last_seq = seq
                    st.frames += 1
                    st.last_rx = rx
                    recent = st.recent
                    recent.append(rx)
                    while recent[0] < cutoff:
                        recent.popleft()
                    self.total_frames += 1
                    st.readings += 1
                    pending = values
                    if store is not None:
                        # decimal text: the INTEGER columns store it as the same integers
                        rows.append((rx, port, "reading", None, node, boot, seq, *values))
                    continue
                f = compact_frame(f)
            if verify is not None:
                verdict = verify(f)
                if verdict != "ok":
                    if pending is not None:
                        fast.last_reading, pending = dict(zip(READING_KEYS, map(int, pending))), None  # type: ignore[union-attr]
                    if verdict == "replay" and self._relayed_copy(ps, f):
                        continue
                    self._rejected(ps, f, verdict, rx)
                    fast = None
                    continue
            st = fast
            if (st is not None and f.kind == "reading" and f.node == st.node and f.boot == st.boot
                    and f.seq == st.last_seq + 1):  # type: ignore[operator]
                st.last_seq = f.seq
                st.frames += 1
                st.last_rx = rx
                recent = st.recent
                recent.append(rx)
                while recent[0] < cutoff:
                    recent.popleft()
                self.total_frames += 1
                st.readings += 1
                pending = None
                st.last_reading = f.fields  # the parser makes a new dict per frame
                if store is not None:
                    rows.append(frame_row(rx, port, f))
                if on_frame is not None:
                    on_frame(rx, port, f)
            else:
                if pending is not None:
                    fast.last_reading, pending = dict(zip(READING_KEYS, map(int, pending))), None  # type: ignore[union-attr]
                # another port's shortcut for this node would miss what _frame changes
                if self._fast_port.get(f.node) is not ps:
                    self._unfast(f.node)
                self._frame(ps, f, rx, rows)
                touched.add(f.node)
                fast = self.nodes[f.node] if self.FAST_PATH else None
        if pending is not None:
            fast.last_reading = dict(zip(READING_KEYS, map(int, pending)))  # type: ignore[union-attr]
        if ps.fast is not fast:
            if ps.fast is not None and self._fast_port.get(ps.fast.node) is ps:
                del self._fast_port[ps.fast.node]
            ps.fast = fast
            if fast is not None:
                self._unfast(fast.node)
                self._fast_port[fast.node] = ps
        if self.FAST_PATH and len(ps.nodes_here) > 1:
            for node in touched:
                self._claim_gateway(ps, self.nodes[node])
        if store is not None:
            store.add_frame_rows(rows)

    def _claim_gateway(self, ps: PortState, st: NodeState) -> None:
        """Expect `st`'s next reading on the gateway port `ps` (and on no other port)."""
        node = st.node
        if self._fast_port.get(node) not in (None, ps):
            self._unfast(node)
        other = self._gateway_port.get(node)
        if other is not None and other is not ps:
            other.gateway.pop(node, None)
        if st.boot is not None and st.last_seq is not None:
            ps.gateway[node] = [st.boot, st.last_seq + 1]
            self._gateway_port[node] = ps

    def _frame(self, ps: PortState, f: Any, rx: float, rows: list[tuple[Any, ...]]) -> None:
        if ps.node != f.node:
            # A gateway interleaves every node's frames: only a node new to this port since
            # it connected is news (another board on the cable, or one more mesh node).
            if ps.node is not None and f.node not in ps.nodes_here:
                self._event(rx, ps, "node_changed", detail=f"{ps.node} -> {f.node}")
            ps.node = f.node
        ps.nodes_here.add(f.node)
        st = self._node(f.node, ps)
        st.connected = True
        port = ps.path or ps.spec.label
        st.paths.add(port)
        if st.boot is None:
            st.boot = f.boot
            st.last_seq = f.seq
        elif f.boot != st.boot:
            st.reboots += 1
            self._event(rx, ps, "reboot", boot=f.boot, detail=f"boot {st.boot} -> {f.boot}")
            st.last_event = "reboot"
            st.boot = f.boot
            if f.seq > FIRST_SEQ:
                self._gap(ps, st, rx, FIRST_SEQ, f.seq - 1)
            st.last_seq = f.seq
        else:
            last = st.last_seq if st.last_seq is not None else f.seq - 1
            ahead = (f.seq - last) % SEQ_MODULUS
            if ahead == 1:
                st.last_seq = f.seq
            elif 1 < ahead < SEQ_MODULUS // 2:
                first = (last + 1) % SEQ_MODULUS
                end = (f.seq - 1) % SEQ_MODULUS
                if first <= end:
                    self._gap(ps, st, rx, first, end)
                else:  # the missing run straddles the counter's wrap to 0
                    self._gap(ps, st, rx, first, SEQ_MODULUS - 1)
                    self._gap(ps, st, rx, 0, end)
                st.last_seq = f.seq
            else:  # same seq again, or behind: a repeat, never a new frame
                st.duplicates += 1
                st.last_event = f"duplicate {f.seq}"
                self._event(rx, ps, "duplicate", boot=f.boot, seq_from=f.seq, detail=f"after seq {last}")
        st.frames += 1
        st.last_rx = rx
        recent = st.recent
        recent.append(rx)
        while recent[0] < rx - RATE_WINDOW_S:  # bounded even when no dashboard asks
            recent.popleft()
        self.total_frames += 1
        fields = f.fields
        if f.kind == "reading":
            st.readings += 1
            st.last_reading = fields  # the parser makes a new dict per frame
        elif f.kind == "hello":
            if fields != st.hello:  # nodes repeat hello periodically: only news is an event
                st.last_event = f"hello {fields.get('fw_version', '')}".strip()
            st.hello = dict(fields)
        elif f.kind == "event":
            st.last_event = f"{fields.get('code', '?')} {fields.get('arg', '')}".strip()
            if fields.get("code") == "security":  # the node refused a command
                st.node_sec_rejects += 1
        elif f.kind == "error":
            st.last_event = f"error {fields.get('code', fields.get('msg', ''))}".strip()
        if self.store is not None:
            rows.append(frame_row(rx, port, f))
            if st.frames == 1 or f.kind == "hello":
                self.store.upsert_node(
                    f.node,
                    seen=rx,
                    zone=st.zone,
                    usb_serial=st.usb_serial,
                    board=_opt_str(st.hello.get("board")),
                    fw_version=_opt_str(st.hello.get("fw_version")),
                    port=port,
                )
        if self.on_frame is not None:
            self.on_frame(rx, port, f)

    def _relayed_copy(self, ps: PortState, f: Any) -> bool:
        """An authentic frame the verifier has accepted already (verdict 'replay') that
        comes through a second port of its node, a few frames behind: the same frame over
        another path (its own cable and the gateway's), counted in `relayed`. A replay on
        the only port a node is followed on, or of an old frame, stays a security reject."""
        st = self.nodes.get(f.node)
        port = ps.path or ps.spec.label
        if (st is None or st.boot != f.boot or st.last_seq is None or not st.paths
                or st.paths == {port} or not 0 <= st.last_seq - f.seq < RELAY_WINDOW):
            return False
        st.relayed += 1
        return True

    def _rejected(self, ps: PortState, f: Any, verdict: str, rx: float) -> None:
        # Stored, never dropped: the raw line is the evidence (a forgery, a replay...).
        # Counted for the node it claims to be if we know that node, else for the port's.
        self.sec_rejects += 1
        st = self.nodes.get(f.node) or self._port_node(ps)
        if st is not None:
            st.sec_rejects += 1
            st.security[verdict] = st.security.get(verdict, 0) + 1
            st.last_event = f"rejected {verdict} seq {f.seq}"
        if self.store is not None:
            raw = f.raw.decode("ascii", "replace") if isinstance(f.raw, (bytes, bytearray)) else str(f.raw)
            self.store.add_event(rx, ps.path or ps.spec.label, f.node, "security", boot=f.boot, seq_from=f.seq,
                                 count=1, detail=f"{verdict} {raw}"[:MAX_TEXT_LINE])

    def _gap(self, ps: PortState, st: NodeState, rx: float, first: int, last: int) -> None:
        st.gaps += 1
        st.missing += last - first + 1
        if len(st.gap_ranges) < MAX_GAP_RANGES:  # the store keeps all of them
            st.gap_ranges.append((int(st.boot or 0), first, last))
        st.last_event = f"gap {first}..{last}" if first != last else f"gap {first}"
        self._event(rx, ps, "gap", boot=st.boot, seq_from=first, seq_to=last)

    # -- for the UI --

    def snapshot(self) -> tuple[list[NodeState], list[PortState]]:
        with self.lock:
            nodes = [_copy_node(s) for _, s in sorted(self.nodes.items())]
            ports = [
                PortState(spec=p.spec, path=p.path, node=p.node, connected=p.connected, connects=p.connects,
                          disconnects=p.disconnects, open_failures=p.open_failures, status=p.status,
                          counters=dict(p.counters))
                for p in self.ports
            ]
        return nodes, ports

    def summary(self) -> dict[str, Any]:
        now = self.clock()
        nodes, ports = self.snapshot()
        return {
            "duration_s": round(now - self.started, 3),
            "frames": sum(n.frames for n in nodes),
            "nodes": {
                n.node: {
                    "frames": n.frames,
                    "readings": n.readings,
                    "gaps": n.gaps,
                    "missing": n.missing,
                    "gap_ranges": [list(g) for g in n.gap_ranges[:50]],
                    "duplicates": n.duplicates,
                    "reboots": n.reboots,
                    "crc_errors": n.crc_errors,
                    "malformed": n.malformed,
                    "garbage_bytes": n.garbage_bytes,
                    "disconnects": n.disconnects,
                    "sec_rejects": n.sec_rejects,
                    "security": dict(n.security),
                    "node_sec_rejects": n.node_sec_rejects,
                    "relayed": n.relayed,
                }
                for n in nodes
            },
            "auth": self.auth is not None,
            "sec_rejects": sum(n.sec_rejects for n in nodes),
            "ports": {
                (p.path or p.spec.label): {
                    "node": p.node,
                    "connects": p.connects,
                    "disconnects": p.disconnects,
                    "open_failures": p.open_failures,
                    **p.counters,
                }
                for p in ports
            },
        }


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


def _copy_node(s: NodeState) -> NodeState:
    c = NodeState(**{k: getattr(s, k) for k in s.__dataclass_fields__
                     if k not in ("recent", "gap_ranges", "security", "paths")})
    c.recent = deque(s.recent)
    c.security = dict(s.security)
    c.paths = set(s.paths)
    c.gap_ranges = list(s.gap_ranges)
    return c


# -- the reader thread ------------------------------------------------------------------


def default_opener(path: str, baud: int) -> Any:
    # Exclusive (an advisory flock, as mpremote takes): two readers on one port would
    # each get half of the bytes, i.e. gaps and garbage that are not the node's fault.
    # It also keeps a second monitor off a pty number a restarted sim has reused.
    try:
        from .transport import open_port
    except ImportError:  # transport.py not installed: same call it would make
        import serial

        ser = serial.serial_for_url(path, baudrate=baud, timeout=0.1, exclusive=None if _is_url(path) else True)
    else:
        ser = open_port(path, baud, exclusive=True)
    ser.timeout = 0.1
    return ser


def _parser_factory() -> Any:
    from .protocol import FrameParser

    return FrameParser()


class PortReader(threading.Thread):
    """Follows one port forever (until stop()): read, parse, hand over, reconnect."""

    def __init__(
        self,
        ps: PortState,
        collector: Collector,
        *,
        baud: int = 115200,
        opener: Callable[[str, int], Any] = default_opener,
        parser_factory: Callable[[], Any] = _parser_factory,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        super().__init__(name=f"canopy-reader-{ps.spec.label}", daemon=True)
        self.ps = ps
        self.collector = collector
        self.baud = baud
        self.opener = opener
        self.parser_factory = parser_factory
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._stop_evt = threading.Event()
        self._ser: Any = None
        # Port lending (lend/give_back): `_wanted` asks the thread to let go, `_lent`
        # says it has (port closed, reader idle), both under `_cond`.
        self._cond = threading.Condition()
        self._wanted: str | None = None
        self._lent = False

    def stop(self) -> None:
        self._stop_evt.set()
        with self._cond:
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        ser = self._ser
        if ser is not None:
            try:
                ser.cancel_read()  # wake a blocking read at once
            except Exception:
                pass

    def lend(self, timeout: float = 5.0, why: str = "lent") -> PortLoan:
        """Close the port and keep it closed until the loan is given back (for a tool that
        needs the port to itself, e.g. a repair). Blocks until the port is closed; the
        reader then waits, and reopens it (a fresh parser, a `connect` event) on
        `give_back()`. Raises CanopyError if the reader does not let go within `timeout`."""
        with self._cond:
            if self._wanted is not None:
                raise CanopyError(f"{self.ps.spec.label}: the port is already lent ({self._wanted})")
            self._wanted = why
            self._cond.notify_all()
        self._wake()
        with self._cond:
            if not self._cond.wait_for(lambda: self._lent or not self.is_alive(), timeout):
                self._wanted = None
                self._cond.notify_all()
                raise CanopyError(f"{self.ps.spec.label}: the monitor did not let go of the port within {timeout:g} s")
        return PortLoan(self)

    def give_back(self) -> None:
        """End a loan: the reader reopens the port."""
        with self._cond:
            self._wanted = None
            self._cond.notify_all()

    def _hold(self) -> bool:
        """While a loan is wanted: say the port is closed, wait for its return. True if it waited."""
        with self._cond:
            if self._wanted is None or self._stop_evt.is_set():
                return False
            why = self._wanted
        self.collector.port_lent(self.ps, why)
        with self._cond:
            self._lent = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._wanted is None or self._stop_evt.is_set())
            self._lent = False
        return True

    def _pause(self, delay: float) -> None:
        # The reconnect backoff, cut short by stop() or by a loan request.
        with self._cond:
            self._cond.wait_for(lambda: self._wanted is not None or self._stop_evt.is_set(), delay)

    def run(self) -> None:
        delay = self.backoff_min
        failing = False
        while not self._stop_evt.is_set():
            if self._hold():
                delay = self.backoff_min  # back from a loan: reopen at once
                continue
            try:
                path = self.ps.spec.resolve()
                if not path:
                    self.collector.open_failed(self.ps, None, "node not present", first=not failing)
                    failing = True
                else:
                    try:
                        ser = self.opener(path, self.baud)
                    except Exception as exc:  # SerialException, OSError, ValueError (bad URL)
                        self.collector.open_failed(self.ps, path, _reason(exc), first=not failing)
                        failing = True
                    else:
                        failing = False
                        began = time.monotonic()
                        self._follow(ser, path)
                        # A link that held for a while starts the backoff afresh; one
                        # that dies at once (flapping cable) keeps backing off.
                        if time.monotonic() - began > 2 * self.backoff_max:
                            delay = self.backoff_min
            except Exception as exc:  # never let a reader die: record and retry
                self.collector.open_failed(self.ps, self.ps.path, f"internal error: {exc!r}", first=True)
            if self._wanted is not None:
                continue  # lent: no backoff wait before _hold()
            self._pause(delay)
            delay = min(delay * 2, self.backoff_max)

    def _follow(self, ser: Any, path: str) -> None:
        self._ser = ser
        self.collector.link_connected(self.ps, path)
        parser = self.parser_factory()
        for attr, _ in PARSER_COUNTERS:
            self.ps.seen[attr] = 0
        try:
            while not self._stop_evt.is_set() and self._wanted is None:
                n = ser.in_waiting
                data = ser.read(n if n > 0 else 1)
                if data:
                    rx = self.collector.clock()
                    self.collector.feed(self.ps, parser, data, rx)
        except Exception as exc:  # SerialException / OSError: the link is gone
            self._last_words(parser)
            if not self._stop_evt.is_set() and self._wanted is None:
                self.collector.link_lost(self.ps, _reason(exc))
        else:
            self._last_words(parser)
        finally:
            self._ser = None
            try:
                ser.close()
            except Exception:
                pass


    def _last_words(self, parser: Any) -> None:
        # A traceback's last line often has no newline before the board dies: log it.
        # (A partial FRAME is never logged as received: it has no CRC yet.)
        try:
            flush = getattr(parser, "flush_text", None)
            if flush is not None:
                flush()
            self.collector.ingest(self.ps, parser, [])
        except Exception:
            pass


class PortLoan:
    """A port lent by a PortReader (`reader.lend()`); `give_back()` or leave the `with`."""

    def __init__(self, reader: PortReader) -> None:
        self.reader = reader
        self._back = False

    def give_back(self) -> None:
        if not self._back:
            self._back = True
            self.reader.give_back()

    def __enter__(self) -> PortLoan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.give_back()


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
