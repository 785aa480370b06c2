"""The monitor's SQLite store: schema, WAL, batched writer thread, round trip."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field

import pytest

from canopy_host.errors import CanopyError
from canopy_host.store import (READING_COLUMNS, SCHEMA_VERSION, Store, decode_fields, iter_frames, nodes_in_zone,
                               open_db)


@dataclass
class F:  # the attributes the store reads from protocol.Frame
    kind: str
    node: str
    boot: int
    seq: int
    fields: dict = field(default_factory=dict)


def reading(node: str, boot: int, seq: int) -> F:
    return F("reading", node, boot, seq, {
        "t_raw": 519888 + seq, "p_raw": 415148, "h_raw": 30000, "t": 2508 + seq, "p": 100653, "h": 47445,
        "shade": seq % 10001, "mist": 0, "fan": 2500, "faults": 0, "failsafe": 0, "tick": seq, "i_shade": -123456,
        "i_mist": 0, "i_fan": 7 * seq,
    })


def test_schema_tables_wal_and_version(tmp_path):
    db = tmp_path / "m.db"
    store = Store(db)
    try:
        assert store._con.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        store.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"frames", "link_events", "nodes", "meta"} <= tables
    cols = [r[1] for r in con.execute("PRAGMA table_info(frames)")]
    assert cols[:7] == ["id", "rx_time", "port", "node", "boot", "seq", "kind"]
    assert set(READING_COLUMNS) <= set(cols) and "extra" in cols
    ev_cols = {r[1] for r in con.execute("PRAGMA table_info(link_events)")}
    assert {"rx_time", "port", "node", "kind", "boot", "seq_from", "seq_to", "count", "detail"} <= ev_cols
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_round_trip_from_many_threads(tmp_path):
    db = tmp_path / "m.db"
    store = Store(db, max_batch=64)
    sent: dict[tuple[str, int], F] = {}

    def produce(node: str) -> None:
        for seq in range(500):
            f = reading(node, 7, seq)
            store.add_frame(1700000000.0 + seq * 0.01, f"/dev/pts/{node}", f)
        store.add_event(1700000009.0, f"/dev/pts/{node}", node, "gap", boot=7, seq_from=3, seq_to=5)

    nodes = [f"n{i:02d}" for i in range(8)]
    for node in nodes:
        for seq in range(500):
            sent[(node, seq)] = reading(node, 7, seq)
    threads = [threading.Thread(target=produce, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert store.stats.batches > 1  # really batched, not one giant or per-row commit
    con = open_db(db, create=False)
    rows = list(iter_frames(con))
    assert len(rows) == len(sent)
    for row in rows:
        f = sent[(row["node"], row["seq"])]
        assert (row["boot"], row["kind"], row["port"]) == (7, "reading", f"/dev/pts/{row['node']}")
        assert decode_fields(row) == f.fields
        for c in READING_COLUMNS:
            assert row[c] == f.fields[c]
        assert row["extra"] is None  # a plain reading needs no JSON
    events = con.execute("SELECT node, kind, boot, seq_from, seq_to FROM link_events ORDER BY node").fetchall()
    assert events == [(n, "gap", 7, 3, 5) for n in nodes]


def test_flush_makes_rows_visible_to_other_readers_while_open(tmp_path):
    db = tmp_path / "m.db"
    store = Store(db, max_delay=10.0)  # would sit on the batch for 10 s without flush()
    for seq in range(10):
        store.add_frame(1.0 + seq, "p", reading("n01", 1, seq))
    store.flush()
    other = sqlite3.connect(db)
    assert other.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 10
    store.close()


def test_non_reading_frames_and_odd_values_are_kept_verbatim(tmp_path):
    db = tmp_path / "m.db"
    with Store(db) as store:
        store.add_frame(1.0, "p", F("hello", "n01", 3, 0, {"board": "unix-sim", "fw_version": "0.1", "cfg_digest": "ab"}))
        store.add_frame(2.0, "p", F("reading", "n01", 3, 1, {"t": "oops", "p": 1.5, "h": None}))
        store.add_frame(3.0, "p", F("reading", "n01", 3, 2, {"t": 2500, "newer_fw": 5, "failsafe": True}))
        store.upsert_node("n01", seen=1.0, zone="A", usb_serial="SIM-n01", board="unix-sim")
        store.upsert_node("n01", seen=5.0, port="/dev/pts/9")
    con = open_db(db, create=False)
    rows = list(iter_frames(con, kind=None))
    assert [r["kind"] for r in rows] == ["hello", "reading", "reading"]
    assert rows[2]["t"] == 2500 and rows[2]["failsafe"] is None  # True is not an integer reading
    assert decode_fields(rows[2]) == {"t": 2500, "newer_fw": 5, "failsafe": True}
    assert decode_fields(rows[0]) == {"board": "unix-sim", "fw_version": "0.1", "cfg_digest": "ab"}
    assert (rows[1]["t"], rows[1]["p"], rows[1]["h"]) == (None, None, None)  # non-ints stay out of INTEGER columns
    assert decode_fields(rows[1]) == {"t": "oops", "p": 1.5, "h": None}
    assert con.execute("SELECT zone, usb_serial, port, first_seen, last_seen FROM nodes").fetchone() == (
        "A", "SIM-n01", "/dev/pts/9", 1.0, 5.0)
    assert nodes_in_zone(con, "A") == ["n01"]


def test_open_errors_are_clear(tmp_path):
    with pytest.raises(CanopyError, match="does not exist"):
        open_db(tmp_path / "missing.db", create=False)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CanopyError, match="junk.db"):
        open_db(junk, create=False)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.commit()
    con.close()
    with pytest.raises(CanopyError, match="schema 1"):  # an older monitor's file: refuse, do not corrupt
        Store(other)
    with pytest.raises(CanopyError, match="directory"):
        Store(tmp_path / "no" / "such" / "dir.db")
