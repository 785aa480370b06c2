"""The ingest shortcuts (collector fast path, compact readings, frame_row's common case)
change nothing.

References: a collector with FAST_PATH off takes the general tracker for every frame and
is fed full Frames (`FrameParser.feed`); the monitor's path (`Collector.feed`: compact
readings, shortcut within and across reads) must give the same node and port state, the
same link events and node upserts, and the same STORED rows (compared after SQLite has
stored them: compact rows carry decimal text that the INTEGER columns convert).
`frame_row` of a reading whose dict is in another key order takes the general path, the
reference for the wire-ordered dict.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import zlib
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from canopy_host import protocol
from canopy_host.monitor import Collector, PortSpec
from canopy_host.protocol import READING_KEYS, Frame, FrameParser, encode_frame
from canopy_host.security import HostAuth, derive_node_key, tag_bytes
from canopy_host.store import _FRAME_SQL, FRAME_ROW_HEAD, READING_COLUMNS, SCHEMA, frame_row


class RecordingStore:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_frame_rows(self, rows):
        self.calls.extend(("frame", r) for r in rows)

    def add_event(self, *a, **kw):
        self.calls.append(("event", a, sorted(kw.items())))

    def upsert_node(self, *a, **kw):
        self.calls.append(("node", a, sorted(kw.items())))


def _reading(node: str, boot: int, seq: int) -> Frame:
    fields = dict(zip(READING_KEYS, range(seq, seq + len(READING_KEYS))))
    return Frame("reading", node, boot, seq, fields, b"")


step = st.one_of(
    st.just(("next", None)), st.just(("next", None)), st.just(("next", None)),
    st.tuples(st.just("jump"), st.integers(-3, 5)),
    st.tuples(st.just("reboot"), st.integers(0, 3)),
    st.tuples(st.just("node"), st.sampled_from(["n01", "n02"])),
    st.tuples(st.just("hello"), st.none()),
    st.tuples(st.just("wrap"), st.none()),
)


def _frames(steps) -> list[Frame]:
    node, boot, seq = "n01", 5, 0
    out = []
    for op, arg in steps:
        if op == "jump":
            seq = max(0, seq + arg)
        elif op == "reboot":
            boot, seq = boot + 1, arg
        elif op == "node":
            node = arg
        elif op == "wrap":
            seq = 0x3FFFFFFF
        if op == "hello":
            out.append(Frame("hello", node, boot, seq, {"board": "x", "fw_version": "1"}, b""))
        else:
            out.append(_reading(node, boot, seq))
        seq += 1
    return out


def _state(c: Collector) -> tuple:
    nodes, ports = c.snapshot()
    return (c.total_frames, [dataclasses.asdict(n) for n in nodes],
            [(p.node, p.counters) for p in ports])


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=40), st.integers(1, 8))
def test_collector_batched_equals_one_by_one(steps, chunk):
    frames = _frames(steps)
    results = []
    for size, fast in ((1, False), (chunk, True)):
        store = RecordingStore()
        c = Collector(store, clock=lambda: 100.0)  # type: ignore[arg-type]
        c.FAST_PATH = fast
        ps = c.add_port(PortSpec(label="p", path="/dev/p"))
        parser = FrameParser()
        for k in range(0, len(frames), size):
            c.ingest(ps, parser, frames[k:k + size], 100.0)
        # frames, events and node upserts go to different tables: only the order
        # within each kind matters (rows are handed over once per ingest call anyway)
        by_kind = {kind: [x for x in store.calls if x[0] == kind] for kind in ("frame", "event", "node")}
        results.append((_state(c), by_kind))
    assert results[0] == results[1]


def test_parsed_reading_row_equals_general_path_row():
    line = encode_frame("reading", "n07", 3, 9, dict(zip(READING_KEYS, range(-7, 8))))
    (f,) = FrameParser().feed(line)
    shuffled = dataclasses.replace(f, fields=dict(reversed(list(f.fields.items()))))
    assert frame_row(1.5, "/dev/x", f) == frame_row(1.5, "/dev/x", shuffled)
    # stored where it belongs: every column holds its own key's value
    con = sqlite3.connect(":memory:")
    con.executescript(SCHEMA)
    con.execute(_FRAME_SQL, frame_row(1.5, "/dev/x", f))
    row = con.execute(f"SELECT {', '.join(READING_COLUMNS)}, extra FROM frames").fetchone()
    assert dict(zip(READING_COLUMNS, row[:-1])) == f.fields and row[-1] is None


def test_wire_ordered_reading_with_a_bool_or_text_still_goes_to_extra():
    fields = dict(zip(READING_KEYS, range(15)))
    fields["faults"] = True
    fields["tick"] = "7"
    row = frame_row(0.0, "p", Frame("reading", "n", 1, 2, fields, b""))
    shuffled = frame_row(0.0, "p", Frame("reading", "n", 1, 2, dict(reversed(list(fields.items()))), b""))
    extra = FRAME_ROW_HEAD.index("extra")
    assert row[:extra] + row[extra + 1:] == shuffled[:extra] + shuffled[extra + 1:]
    assert json.loads(row[extra]) == json.loads(shuffled[extra])
    assert row[extra] is not None and '"faults":true' in row[extra] and '"tick":"7"' in row[extra]


# -- the monitor's whole path: bytes -> Collector.feed -> stored rows ------------------

def _body_line(body: bytes) -> bytes:
    return body + b" *%08x\n" % zlib.crc32(body)


def _wire(node: str, boot: int, seq: int, op: str) -> bytes:
    vals = ",".join(str((seq * 7919 + k * 104729) % 2000003 - 10**6) for k in range(15))
    body = f"@CNP1 {node} {boot} {seq} R {vals}".encode()
    if op == "hello":
        return _body_line(f"@CNP1 {node} {boot} {seq} H board=esp32 fw_version=1.{seq % 2}".encode())
    if op == "extra":
        return _body_line(body + b",5")
    if op == "tag":
        return _body_line(body + b" !" + b"%032x" % seq)
    line = _body_line(body)
    if op == "crc":
        line = line.replace(b"*", b"*f", 1)[:-2] + b"\n"
    return line


stream_op = st.one_of(
    st.tuples(st.just("next"), st.integers(1, 6)),
    st.tuples(st.just("jump"), st.integers(-3, 5)),
    st.tuples(st.just("reboot"), st.integers(0, 3)),
    st.tuples(st.just("node"), st.sampled_from(["n01", "n02", "n03"])),
    st.tuples(st.sampled_from(["hello", "wrap", "text", "crc", "extra", "tag"]), st.just(0)),
)


def _walk(ops, node: str):
    """(op, node, boot, seq) of each line a list of stream ops sends; seq is None for
    the lines that are not frames of the walk ('text', 'replay')."""
    boot, seq = 5, 0
    for op, arg in ops:
        if op == "jump":
            seq = max(0, seq + arg)
        elif op == "reboot":
            boot, seq = boot + 1, arg
        elif op == "node":
            node = arg
        elif op == "wrap":
            seq = 0x3FFFFFFF
        elif op in ("text", "replay"):
            yield op, node, boot, None
            continue
        for _ in range(arg if op == "next" else 1):
            yield op, node, boot, seq
            seq = (seq + 1) & 0x3FFFFFFF


TEXT_LINE = b"Traceback @ line 3\r\n"


def _stream(ops, node: str) -> bytes:
    return b"".join(TEXT_LINE if op == "text" else
                    _wire(node_, boot, seq, op if op in ("hello", "crc", "extra", "tag") else "reading")
                    for op, node_, boot, seq in _walk(ops, node))


def _stored(rows) -> list:
    con = sqlite3.connect(":memory:")
    con.executescript(SCHEMA)
    con.executemany(_FRAME_SQL, rows)
    cols = [r[1] for r in con.execute("PRAGMA table_info(frames)")]
    return con.execute(f"SELECT {', '.join(f'{c}, typeof({c})' for c in cols)} FROM frames ORDER BY id").fetchall()


def _monitor_run(streams: list[bytes], schedule: list[tuple[int, int, int]], reference: bool,
                 on_frame: bool, auth: HostAuth | None = None) -> tuple:
    store = RecordingStore()
    seen: list = []
    c = Collector(store, clock=lambda: 100.0,  # type: ignore[arg-type]
                  on_frame=(lambda rx, port, f: seen.append((rx, port, f))) if on_frame else None, auth=auth)
    c.FAST_PATH = not reference
    ports = [c.add_port(PortSpec(label=f"p{i}", path=f"/dev/p{i}")) for i in range(len(streams))]
    parsers = [FrameParser() for _ in streams]
    pos = [0] * len(streams)
    rx = 100.0
    for i, size, link in schedule + [(i, 10**6, 0) for i in range(len(streams))]:
        i %= len(streams)
        data = streams[i][pos[i]:pos[i] + size]
        pos[i] += size
        rx += 0.25
        if link in (1, 2):  # the link drops (and comes back at once, or only with this read)
            c.link_lost(ports[i], "gone")
        if link == 1:
            c.link_connected(ports[i], f"/dev/p{i}")
        elif link == 3:
            c.port_lent(ports[i], "repair")
        if reference:
            c.ingest(ports[i], parsers[i], parsers[i].feed(data), rx)
        else:
            c.feed(ports[i], parsers[i], data, rx)
    rows = [x[1] for x in store.calls if x[0] == "frame"]
    others = [x for x in store.calls if x[0] != "frame"]
    verdicts = dict(auth.verifier.counts) if auth is not None else None
    return _state(c), others, _stored(rows), seen, verdicts, c.sec_rejects


# (port, bytes to read, link event: 0 none, 1 drop + reconnect, 2 drop, 3 lent) per read
schedules = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 700), st.integers(0, 12).map(lambda d: max(0, d - 9))),
                     max_size=40)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.lists(stream_op, max_size=25), min_size=1, max_size=3),
    schedules,
    st.booleans(),
    st.booleans(),
)
def test_monitor_path_equals_general_path(ops_per_port, schedule, on_frame, twin):
    # ports start on different nodes but may switch to the same one (a node moving ports);
    # `twin`: the run scanner's Python twin instead of the compiled one
    streams = [_stream(ops, f"n0{k + 1}") for k, ops in enumerate(ops_per_port)]
    with mock.patch.object(protocol, "scan_readings", protocol.scan_readings_py if twin else protocol.scan_readings):
        fast = _monitor_run(streams, schedule, False, on_frame)
    assert fast == _monitor_run(streams, schedule, True, on_frame)


MASTER = bytes(range(32))

keyed_op = st.one_of(
    st.tuples(st.just("next"), st.integers(1, 6)),
    st.tuples(st.just("jump"), st.integers(-3, 5)),
    st.tuples(st.just("reboot"), st.integers(0, 3)),
    st.tuples(st.just("node"), st.sampled_from(["n01", "n02", "n03"])),
    st.tuples(st.sampled_from(["forged", "cross", "untagged", "replay", "text", "crc", "hello"]), st.just(0)),
)


def _keyed_stream(ops, node: str) -> bytes:
    """Readings tagged under the node's key (a keyed mesh), with forgeries, another
    node's tags, untagged frames, exact replays of an earlier line, text and CRC errors."""
    out: list[bytes] = []
    sent: list[bytes] = []
    for op, node_, boot, seq in _walk(ops, node):
        if op == "text":
            out.append(TEXT_LINE)
            continue
        if op == "replay":
            if sent:
                out.append(sent[len(sent) // 2])
            continue
        line = _wire(node_, boot, seq, "hello" if op == "hello" else "reading")
        body = line.rpartition(b" *")[0]
        if op != "untagged":
            signer = "n09" if op == "cross" else node_
            tag = bytes(16) if op == "forged" else tag_bytes(derive_node_key(MASTER, signer), body)
            body += b" !" + tag.hex().encode()
        line = _body_line(body)
        if op == "crc":
            line = line.replace(b"*", b"*f", 1)[:-2] + b"\n"
        out.append(line)
        sent.append(line)
    return b"".join(out)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.lists(keyed_op, max_size=25), min_size=1, max_size=3),
    schedules,
    st.booleans(),
)
def test_keyed_monitor_path_equals_general_path(tmp_path_factory, ops_per_port, schedule, twin):
    # --master-key: the run scanner's batch verification (HostAuth.verify_run) must give
    # the same verdicts, rejects, events and rows as verifying every Frame
    streams = [_keyed_stream(ops, f"n0{k + 1}") for k, ops in enumerate(ops_per_port)]
    tmp = tmp_path_factory.mktemp("keyed")
    runs = []
    for reference in (False, True):
        auth = HostAuth(MASTER, tmp / f"counter{reference}.json")
        auth.key("n09")  # known to the verifier, as a captured node's key would be
        with mock.patch.object(protocol, "scan_readings",
                               protocol.scan_readings_py if twin else protocol.scan_readings):
            runs.append(_monitor_run(streams, schedule, reference, False, auth))
    assert runs[0] == runs[1]


def test_keyed_runs_take_the_scanner_and_stop_at_a_forgery(tmp_path):
    good = _keyed_stream([("next", 12)], "n01")
    lines = good.splitlines(keepends=True)
    forged = _body_line(_wire("n01", 5, 6, "reading").rpartition(b" *")[0] + b" !" + b"00" * 16)
    stream = b"".join(lines[:6]) + forged + b"".join(lines[7:])  # seq 6 forged, the rest good
    verified = []
    auth = HostAuth(MASTER, tmp_path / "c.json")
    real = auth.verify_run

    def spy(*a):
        good_n = real(*a)
        verified.append((len(a[3]), good_n))
        return good_n

    auth.verify_run = spy  # type: ignore[method-assign]
    store = RecordingStore()
    c = Collector(store, clock=lambda: 100.0, auth=auth)  # type: ignore[arg-type]
    ps = c.add_port(PortSpec(label="p0", path="/dev/p0"))
    parser = FrameParser()
    size = len(lines[0]) * 2 + 5
    for k in range(0, len(stream), size):
        c.feed(ps, parser, stream[k:k + size], 100.0)
    rows = [x[1] for x in store.calls if x[0] == "frame"]
    assert [r[6] for r in rows] == [s for s in range(12) if s != 6]
    assert c.sec_rejects == 1 and auth.verifier.counts["forged"] == 1 and auth.verifier.counts["ok"] == 11
    assert any(n > good_n for n, good_n in verified)  # the run stopped at the forgery
    assert sum(good_n for _, good_n in verified) >= 7  # most frames went the batch way


def test_monitor_path_really_takes_the_shortcuts(monkeypatch):
    # Two ports, reads of ~3 frames. A port's first read: its first frame takes the
    # general tracker, the rest stay compact (values as decimal text); from its second
    # read on, every reading comes from the run scanner, already as a row.
    streams = [_stream([("next", 30)], "n01"), _stream([("next", 30)], "n02")]
    schedule = [(k % 2, 400, False) for k in range(40)]
    scanned = []
    real = protocol.scan_readings

    def spy(*a):
        rows, end = real(*a)
        scanned.extend(rows)
        return rows, end

    monkeypatch.setattr(protocol, "scan_readings", spy)
    store = RecordingStore()
    c = Collector(store, clock=lambda: 100.0)  # type: ignore[arg-type]
    ports = [c.add_port(PortSpec(label=f"p{i}", path=f"/dev/p{i}")) for i in range(2)]
    parsers = [FrameParser(), FrameParser()]
    pos = [0, 0]
    for i, size, _ in schedule:
        c.feed(ports[i], parsers[i], streams[i][pos[i]:pos[i] + size], 100.0)
        pos[i] += size
    rows = [x[1] for x in store.calls if x[0] == "frame"]
    first_read = [s[:400].count(b"\n") for s in streams]
    assert len(rows) == 60 and first_read == [2, 2]
    compact = [r for r in rows if type(r[-1]) is str]
    assert len(compact) == sum(first_read) - 2  # all of the first reads but each node's first frame
    assert len(scanned) == 60 - sum(first_read) and all(any(r is x for x in rows) for r in scanned)
    assert c.nodes["n02"].last_reading == FrameParser().feed(_wire("n02", 5, 29, "reading"))[0].fields


def test_node_moving_between_ports_and_link_events_between_its_reads():
    # One node's single stream read alternately through two ports (a node moved, or a
    # hub renumbered): each port's shortcut must not survive the other port's frames,
    # nor link events of its own port.
    one = b"".join(_wire("n01", 5, seq, "reading") for seq in range(24))
    size = len(_wire("n01", 5, 0, "reading")) * 3
    pieces = [one[k:k + size] for k in range(0, len(one), size)]
    runs = []
    for reference in (True, False):
        store = RecordingStore()
        c = Collector(store, clock=lambda: 100.0)  # type: ignore[arg-type]
        c.FAST_PATH = not reference
        ports = [c.add_port(PortSpec(label=f"p{i}", path=f"/dev/p{i}")) for i in range(2)]
        parsers = [FrameParser(), FrameParser()]
        states = []
        for k, piece in enumerate(pieces):
            i = (k // 2) % 2  # p0, p0, p1, p1, p0, p0...
            if k == 3:  # p0 (still n01's port as far as p0 knows) drops while p1 has n01
                c.link_lost(ports[0], "gone")
            if k == 5:
                c.link_lost(ports[i], "gone")
            if k == 7:
                c.port_lent(ports[i], "repair")
            if reference:
                c.ingest(ports[i], parsers[i], parsers[i].feed(piece), 100.0 + k)
            else:
                c.feed(ports[i], parsers[i], piece, 100.0 + k)
            states.append(_state(c))
        runs.append((states, [x for x in store.calls if x[0] != "frame"],
                     _stored([x[1] for x in store.calls if x[0] == "frame"])))
    assert runs[0] == runs[1]
    ports_seen = [n["port"] for st_ in runs[0][0] for n in st_[1]]
    assert "/dev/p0" in ports_seen and "/dev/p1" in ports_seen


# -- a gateway's port: several nodes' frames interleaved on one port ---------------------

def _interleave(streams: list[bytes], seed: int) -> bytes:
    """Merge line streams as a gateway relays them: each keeps its order."""
    import random

    rng = random.Random(seed)
    lines = [s.splitlines(keepends=True) for s in streams]
    out = []
    while any(lines):
        pick = rng.choice([k for k, ls in enumerate(lines) if ls])
        out.append(lines[pick].pop(0))
    return b"".join(out)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(stream_op, max_size=12), min_size=2, max_size=3),
    st.integers(0, 2**16),
    schedules,
    st.booleans(),
)
def test_gateway_port_path_equals_general_path(ops_per_node, seed, schedule, twin):
    # one port (index 0) carries every node, a second one sometimes a copy of one node
    merged = _interleave([_stream(ops, f"n0{k + 1}") for k, ops in enumerate(ops_per_node)], seed)
    streams = [merged, _stream(ops_per_node[0], "n01")]
    with mock.patch.object(protocol, "scan_gateway", protocol.scan_gateway_py if twin else protocol.scan_gateway):
        fast = _monitor_run(streams, schedule, False, False)
    assert fast == _monitor_run(streams, schedule, True, False)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(keyed_op, max_size=12), min_size=2, max_size=3),
    st.integers(0, 2**16),
    schedules,
)
def test_keyed_gateway_port_path_equals_general_path(tmp_path_factory, ops_per_node, seed, schedule):
    merged = _interleave([_keyed_stream(ops, f"n0{k + 1}") for k, ops in enumerate(ops_per_node)], seed)
    tmp = tmp_path_factory.mktemp("gw")
    runs = []
    for reference in (False, True):
        auth = HostAuth(MASTER, tmp / f"c{reference}.json")
        auth.key("n09")
        runs.append(_monitor_run([merged], schedule, reference, False, auth))
    assert runs[0] == runs[1]


def test_a_gateway_port_takes_the_gateway_scanner(monkeypatch):
    taken = []
    real = protocol.scan_gateway

    def spy(*a):
        out = real(*a)
        taken.extend(out[0])
        return out

    monkeypatch.setattr(protocol, "scan_gateway", spy)
    merged = _interleave([_stream([("next", 40)], n) for n in ("n01", "n02", "n03")], 7)
    store = RecordingStore()
    c = Collector(store, clock=lambda: 100.0)  # type: ignore[arg-type]
    gw = c.add_port(PortSpec(label="gw", path="/dev/gw"))
    parser = FrameParser()
    for k in range(0, len(merged), 512):
        c.feed(gw, parser, merged[k:k + 512], 100.0)
    rows = [x[1] for x in store.calls if x[0] == "frame"]
    assert len(rows) == 120 and len(taken) > 100  # after each node's first frames, the scanner
    assert all(c.nodes[n].frames == 40 and c.nodes[n].gaps == 0 for n in ("n01", "n02", "n03"))
