"""The monitor's SQLite store: every received frame and every link event, in one file.

One `Store` per database file. All writes go through ONE writer thread that drains a
queue and inserts in batches (one transaction per batch), because SQLite allows one
writer at a time and a commit per frame would cap ingest at a few hundred frames per
second. Readers (export, plot, tests) open their own connections: WAL mode lets them
read while the monitor writes.

Durability: `PRAGMA journal_mode=WAL` + `synchronous=NORMAL` survives a crash of the
monitor process without losing committed batches (a power loss may lose the last
batches, which is the documented WAL/NORMAL trade-off). `flush()` blocks until every
row queued before it is committed; `close()` flushes, so a Ctrl-C that reaches the
monitor's shutdown path loses nothing that was received.

The schema is documented in docs/monitor.md; keep the two in step (SCHEMA_VERSION).

    store = Store("canopy.db")
    store.add_frame(rx_time, "/dev/ttyUSB0", frame)
    store.add_event(rx_time, "/dev/ttyUSB0", "n01", "gap", boot=7, seq_from=12, seq_to=14)
    store.close()
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import CanopyError
from .protocol import READING_KEYS

SCHEMA_VERSION = 3  # 3: repair journal (repair_jobs, repair_audit), docs/repair.md

# A reading's quantities each get an INTEGER column (the protocol's READING_KEYS):
# indexed queries, cheap export/plot, and no JSON to build per reading. Any other
# field (a newer firmware's extra key, a non-integer value) goes to `extra` as JSON.
# Non-reading frames (hello, event, reply, error) keep all their fields in `extra`.
READING_COLUMNS = (
    "t", "p", "h", "t_raw", "p_raw", "h_raw", "shade", "mist", "fan",
    "faults", "failsafe", "tick", "i_shade", "i_mist", "i_fan",
)
_COLSET = frozenset(READING_COLUMNS)
# INSERT lists the reading columns in wire order (protocol.READING_KEYS), the order the
# parser builds a reading's dict in: the common row is then just its values.
_ROW_KEYS = READING_KEYS
assert frozenset(_ROW_KEYS) == _COLSET and len(_ROW_KEYS) == len(READING_COLUMNS)
_INT_ONLY = {int}
_INT_OR_NONE = frozenset({int, type(None)})

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS frames (
    id      INTEGER PRIMARY KEY,
    rx_time REAL    NOT NULL,   -- host receive time, Unix seconds (UTC)
    port    TEXT    NOT NULL,   -- port path/URL the frame arrived on
    node    TEXT    NOT NULL,
    boot    INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    kind    TEXT    NOT NULL,   -- hello | reading | event | reply | error
    {", ".join(f"{c} INTEGER" for c in READING_COLUMNS)},
    extra   TEXT                -- JSON object: fields not in a column (see below), or NULL
);
CREATE INDEX IF NOT EXISTS frames_node_time ON frames (node, rx_time);
CREATE INDEX IF NOT EXISTS frames_kind_time ON frames (kind, rx_time);
CREATE TABLE IF NOT EXISTS link_events (
    id       INTEGER PRIMARY KEY,
    rx_time  REAL    NOT NULL,
    port     TEXT    NOT NULL,
    node     TEXT,              -- NULL while the port's node is still unknown
    kind     TEXT    NOT NULL,  -- see EVENT_KINDS
    boot     INTEGER,
    seq_from INTEGER,           -- gap: first missing seq; duplicate: the repeated seq
    seq_to   INTEGER,           -- gap: last missing seq (inclusive)
    count    INTEGER,           -- crc_error/malformed/oversize: frames; garbage: bytes
    detail   TEXT               -- human-readable text (free-text line, error message...)
);
CREATE INDEX IF NOT EXISTS link_events_node_time ON link_events (node, rx_time);
CREATE TABLE IF NOT EXISTS nodes (
    node       TEXT PRIMARY KEY,
    zone       TEXT,
    usb_serial TEXT,
    board      TEXT,
    fw_version TEXT,
    port       TEXT,            -- last port the node was seen on
    first_seen REAL,
    last_seen  REAL
);
CREATE TABLE IF NOT EXISTS repair_jobs (      -- canopy repair's journal, docs/repair.md
    id        INTEGER PRIMARY KEY,
    created   REAL    NOT NULL,
    updated   REAL    NOT NULL,
    node      TEXT    NOT NULL,
    action    TEXT    NOT NULL,   -- push_config | recalibrate | quarantine | release
    target    TEXT    NOT NULL,   -- JSON: what the node must end up with
    state     TEXT    NOT NULL,   -- PENDING STAGED ACTIVATED VERIFIED ROLLED_BACK SUPERSEDED FAILED
    attempts  INTEGER NOT NULL DEFAULT 0,
    next_try  REAL    NOT NULL DEFAULT 0,
    reason    TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS repair_jobs_state ON repair_jobs (state, next_try);
CREATE TABLE IF NOT EXISTS repair_audit (
    id      INTEGER PRIMARY KEY,
    time    REAL    NOT NULL,
    node    TEXT    NOT NULL,
    job     INTEGER,              -- repair_jobs.id (NULL for plan-level entries)
    action  TEXT    NOT NULL,
    event   TEXT    NOT NULL,     -- planned | state | retry | refused | skipped
    state   TEXT,
    detail  TEXT                  -- JSON object
);
CREATE INDEX IF NOT EXISTS repair_audit_node_time ON repair_audit (node, time);
"""

EVENT_KINDS = (
    "connect",  # port opened
    "disconnect",  # port lost (unplug, pty gone, I/O error)
    "open_failed",  # could not open the port (detail says why); retried with backoff
    "reboot",  # new boot id for a known node (boot = new id, detail = old id)
    "gap",  # seq_from..seq_to (inclusive) never arrived within one boot
    "duplicate",  # seq_from arrived again (or went backwards) within one boot
    "crc_error",  # count frames failed their CRC
    "malformed",  # count marker lines that did not parse
    "oversize",  # count over-long frame lines dropped
    "unsupported",  # count frames of another protocol version
    "garbage",  # count bytes that were neither frames nor text lines
    "text",  # a free-text line (REPL output, traceback) in detail
    "node_changed",  # a node id new to the port since it connected (another board, or a node behind a gateway)
    "security",  # a frame that failed authentication (monitor --master-key): detail = "<verdict> <raw line>",
    #              boot/seq_from as the frame claims; it is NOT in `frames` (docs/monitor.md)
)

# Row order: what one read shares (rx_time, port, kind, extra) first, then what each
# frame has: the compiled scanner (protocol.scan_readings) builds a reading's row as a
# shared head tuple + (node, boot, seq, *values) without touching Python per frame.
FRAME_ROW_HEAD = ("rx_time", "port", "kind", "extra")
_FRAME_SQL = (
    f"INSERT INTO frames ({', '.join(FRAME_ROW_HEAD)}, node, boot, seq, {', '.join(_ROW_KEYS)}) "
    f"VALUES ({', '.join('?' * (7 + len(READING_COLUMNS)))})"
)
_EVENT_SQL = (
    "INSERT INTO link_events (rx_time, port, node, kind, boot, seq_from, seq_to, count, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_NODE_SQL = """
INSERT INTO nodes (node, zone, usb_serial, board, fw_version, port, first_seen, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(node) DO UPDATE SET
    zone       = COALESCE(excluded.zone, zone),
    usb_serial = COALESCE(excluded.usb_serial, usb_serial),
    board      = COALESCE(excluded.board, board),
    fw_version = COALESCE(excluded.fw_version, fw_version),
    port       = COALESCE(excluded.port, port),
    first_seen = MIN(COALESCE(first_seen, excluded.first_seen), excluded.first_seen),
    last_seen  = MAX(COALESCE(last_seen, excluded.last_seen), excluded.last_seen)
"""


class FrameLike(Protocol):
    kind: str
    node: str
    boot: int
    seq: int
    fields: Mapping[str, object]


_json = json.JSONEncoder(separators=(",", ":"), default=str).encode
_NO_COLUMNS = (None,) * len(READING_COLUMNS)


def frame_row(rx_time: float, port: str, frame: FrameLike) -> tuple[Any, ...]:
    """The `frames` row for one frame (also used by the ingest benchmark's baseline).

    This runs once per received frame, so the common case (a reading whose fields are
    exactly the integer columns) takes a short path without building any JSON."""
    fields = frame.fields
    kind = frame.kind
    if kind == "reading":
        # Exactly the wire keys, in wire order, all true ints: what the parser produces.
        if len(fields) == len(_ROW_KEYS) and tuple(fields) == _ROW_KEYS:
            values = tuple(fields.values())
            if set(map(type, values)) == _INT_ONLY:
                return (rx_time, port, kind, None, frame.node, frame.boot, frame.seq, *values)
        values = tuple(map(fields.get, _ROW_KEYS))
        if set(map(type, values)) <= _INT_OR_NONE and _COLSET.issuperset(fields):
            extra = None
        else:
            # bool is an int subclass; keep true ints in columns, everything else as JSON.
            values = tuple(v if type(v) is int else None for v in values)
            rest = {k: v for k, v in fields.items() if k not in _COLSET or type(v) is not int}
            extra = _json(rest) if rest else None
    else:
        values = _NO_COLUMNS
        extra = _json(fields) if fields else None
    return (rx_time, port, kind, extra, frame.node, frame.boot, frame.seq, *values)


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_db_file(path: str, *, writing: bool = False) -> None:
    """Refuse a database file that is not a canopy store BEFORE SQLite touches it.

    Opening a file through the store switches it to WAL mode (and, for writers, adds the
    canopy tables), so a mistyped --db naming another program's database, a directory or a
    random file must be caught here, read-only. A missing file is left to the store (it
    creates one for writers and names the problem for readers); `writing` also accepts an
    empty file or an SQLite file without tables, which the store initialises."""
    p = Path(path)
    if p.is_dir():
        raise CanopyError(f"{path!r} is a directory; name a database file, e.g. {p / 'canopy-monitor.db'}")
    if not p.exists():
        return
    try:
        with open(p, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise CanopyError(f"cannot read database {path!r}: {exc.strerror}") from None
    if not head:
        if writing:
            return
        raise CanopyError(f"{path!r} is an empty file, not a canopy monitor database (record one with "
                          "`canopy monitor --db FILE`)")
    if head != SQLITE_MAGIC:
        raise CanopyError(f"{path!r} is not a canopy monitor database (not an SQLite file at all)")
    try:
        con = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise CanopyError(f"cannot use database {path!r}: {exc}") from None
    if "meta" in tables or (writing and not tables):
        return  # the store checks the schema version itself
    if not tables:
        raise CanopyError(f"{path!r} holds no canopy data (an empty SQLite file); record with "
                          "`canopy monitor --db FILE`")
    raise CanopyError(f"{path!r} is another program's SQLite database (tables: {', '.join(sorted(tables)[:5])}), "
                      "not a canopy monitor database; name another --db file")


def open_db(path: str | Path, *, create: bool = True) -> sqlite3.Connection:
    """A connection to a store file with the schema in place (created if `create`).
    Anything that is not a canopy store is refused untouched (check_db_file)."""
    check_db_file(str(path), writing=create)
    p = Path(path)
    if not create and not p.is_file():
        raise CanopyError(f"database {str(path)!r} does not exist (record one with `canopy monitor --db FILE`)")
    if create and p.parent and not p.parent.exists():
        raise CanopyError(f"cannot create database {str(path)!r}: directory {str(p.parent)!r} does not exist")
    try:
        con = sqlite3.connect(str(p), check_same_thread=False, timeout=10.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        if create:
            con.executescript(SCHEMA)
            con.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            con.commit()
        row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and row[0] == "2":
            # 2 -> 3 only adds the repair journal tables: upgrade in place.
            con.executescript(SCHEMA)
            con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            con.commit()
            row = (str(SCHEMA_VERSION),)
        if row is None or row[0] != str(SCHEMA_VERSION):
            con.close()
            found = "no canopy schema" if row is None else f"schema {row[0]}"
            raise CanopyError(
                f"{str(path)!r} is not a canopy monitor database of schema {SCHEMA_VERSION} ({found}); "
                "use another --db file"
            )
    except sqlite3.DatabaseError as exc:
        raise CanopyError(f"cannot use database {str(path)!r}: {exc}") from None
    return con


@dataclass
class StoreStats:
    frames: int = 0
    events: int = 0
    batches: int = 0
    largest_batch: int = 0


class Store:
    """Batching SQLite writer. Thread-safe: any thread may call add_*.

    Producers append to pending lists under one lock and wake the writer only when
    it has something to start on (the first row after it went idle, a full batch, a
    flush, close): waking it for every serial read cost ~4 us per frame in thread
    switches on a one-core box (docs/performance.md, Ingest)."""

    def __init__(self, path: str | Path, *, max_batch: int = 5000, max_delay: float = 0.2) -> None:
        self.path = Path(path)
        self._con = open_db(self.path)
        self._cond = threading.Condition(threading.Lock())
        self._frames: list[tuple[Any, ...]] = []
        self._events: list[tuple[Any, ...]] = []
        self._nodes: list[tuple[Any, ...]] = []
        self._waiters: list[threading.Event] = []
        self._stop = False
        self._max_batch = max_batch
        self._max_delay = max_delay
        self.stats = StoreStats()
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="canopy-store", daemon=True)
        self._thread.start()

    # -- producers -----------------------------------------------------------------

    def _pending(self) -> int:
        return len(self._frames) + len(self._events) + len(self._nodes)

    def _put(self, target: list[Any], item: Any) -> None:
        with self._cond:
            idle = not (self._frames or self._events or self._nodes)
            target.append(item)
            if idle or self._pending() >= self._max_batch:
                self._cond.notify()

    def add_frame(self, rx_time: float, port: str, frame: FrameLike) -> None:
        self._put(self._frames, frame_row(rx_time, port, frame))

    def add_frame_row(self, row: tuple[Any, ...]) -> None:
        self._put(self._frames, row)

    def add_frame_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Several rows in one hand-over (one lock round per serial read, not per frame)."""
        if rows:
            with self._cond:
                idle = not (self._frames or self._events or self._nodes)
                self._frames += rows
                if idle or self._pending() >= self._max_batch:
                    self._cond.notify()

    def add_event(
        self,
        rx_time: float,
        port: str,
        node: str | None,
        kind: str,
        *,
        boot: int | None = None,
        seq_from: int | None = None,
        seq_to: int | None = None,
        count: int | None = None,
        detail: str | None = None,
    ) -> None:
        self._put(self._events, (rx_time, port, node, kind, boot, seq_from, seq_to, count, detail))

    def upsert_node(
        self,
        node: str,
        *,
        seen: float,
        zone: str | None = None,
        usb_serial: str | None = None,
        board: str | None = None,
        fw_version: str | None = None,
        port: str | None = None,
    ) -> None:
        self._put(self._nodes, (node, zone, usb_serial, board, fw_version, port, seen, seen))

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything queued before this call is committed."""
        if self._closed:
            return
        done = threading.Event()
        with self._cond:
            self._waiters.append(done)
            self._cond.notify()
        if not done.wait(timeout):
            raise CanopyError(f"the database writer did not finish within {timeout} s ({self.path})")
        if self.error is not None:
            raise CanopyError(f"writing {str(self.path)!r} failed: {self.error}")

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self._closed = True
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not (self._pending() or self._waiters or self._stop):
                    cond.wait()
                # Let a trickle grow into a batch, but never hold a row longer than
                # max_delay; a full batch, a flush or close ends the wait at once.
                deadline = time.monotonic() + self._max_delay
                while not (self._waiters or self._stop) and self._pending() < self._max_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
                frames, events, nodes, waiters = self._frames, self._events, self._nodes, self._waiters
                self._frames, self._events, self._nodes, self._waiters = [], [], [], []
                stop = self._stop
            step = self._max_batch
            # one transaction per max_batch rows: a backlog is still committed in steps
            for k in range(0, max(len(frames), len(events), len(nodes), 1), step):
                self._write(frames[k:k + step], events[k:k + step], nodes[k:k + step])
            for w in waiters:
                w.set()
            if stop and not self._pending():
                return

    def _write(self, frames: list[Any], events: list[Any], nodes: list[Any]) -> None:
        if not (frames or events or nodes):
            return
        try:
            with self._con:
                if frames:
                    self._con.executemany(_FRAME_SQL, frames)
                if events:
                    self._con.executemany(_EVENT_SQL, events)
                if nodes:
                    self._con.executemany(_NODE_SQL, nodes)
        except sqlite3.Error as exc:  # disk full, file removed...: report, keep draining
            self.error = exc
            return
        st = self.stats
        st.frames += len(frames)
        st.events += len(events)
        st.batches += 1
        st.largest_batch = max(st.largest_batch, len(frames) + len(events) + len(nodes))


# -- reading back (export, plot, tests) ---------------------------------------------


def iter_frames(
    con: sqlite3.Connection,
    *,
    nodes: list[str] | None = None,
    kind: str | None = "reading",
    since: float | None = None,
    until: float | None = None,
) -> Iterator[sqlite3.Row]:
    """Frames in receive order, filtered; rows support row['t']; decode_fields(row) gives all."""
    where: list[str] = []
    args: list[Any] = []
    if nodes:
        where.append(f"node IN ({', '.join('?' * len(nodes))})")
        args += nodes
    if kind:
        where.append("kind = ?")
        args.append(kind)
    if since is not None:
        where.append("rx_time >= ?")
        args.append(since)
    if until is not None:
        where.append("rx_time <= ?")
        args.append(until)
    sql = "SELECT * FROM frames"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY rx_time, id"
    cur = con.cursor()
    cur.row_factory = sqlite3.Row
    return cur.execute(sql, args)


def nodes_in_zone(con: sqlite3.Connection, zone: str) -> list[str]:
    return [r[0] for r in con.execute("SELECT node FROM nodes WHERE zone = ? ORDER BY node", (zone,))]


def known_nodes(con: sqlite3.Connection) -> list[str]:
    return [r[0] for r in con.execute("SELECT DISTINCT node FROM frames ORDER BY node")]


def decode_fields(row: sqlite3.Row) -> dict[str, Any]:
    """All fields of a stored frame: the reading columns that are set, plus `extra`."""
    out: dict[str, Any] = {}
    if row["kind"] == "reading":
        for c in READING_COLUMNS:
            v = row[c]
            if v is not None:
                out[c] = v
    if row["extra"]:
        value = json.loads(row["extra"])
        if isinstance(value, dict):
            out.update(value)
    return out
