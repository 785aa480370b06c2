"""The ingest shortcuts (collector fast path, frame_row's common case) change nothing.

References: the collector fed one frame per `ingest` call never takes its fast path (it
needs a previous frame of the same call), so it is the reference for the same frames
fed in one call; `frame_row` of a reading whose dict is in another key order takes the
general path, the reference for the wire-ordered dict.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from canopy_host.monitor import Collector, PortSpec
from canopy_host.protocol import READING_KEYS, Frame, FrameParser, encode_frame
from canopy_host.store import _FRAME_SQL, READING_COLUMNS, SCHEMA, frame_row


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
    for size in (1, chunk):
        store = RecordingStore()
        c = Collector(store, clock=lambda: 100.0)  # type: ignore[arg-type]
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
    assert row[:-1] == shuffled[:-1] and json.loads(row[-1]) == json.loads(shuffled[-1])
    assert row[-1] is not None and '"faults":true' in row[-1] and '"tick":"7"' in row[-1]
