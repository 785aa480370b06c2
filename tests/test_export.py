"""`canopy export` (CSV) and `canopy plot` (PNG) over a store the test fills itself."""

from __future__ import annotations

import calendar
import csv
import io
import struct
from dataclasses import dataclass, field

import pytest

from canopy_host.cli import main
from canopy_host.export_cmd import parse_time
from canopy_host.store import Store

T0 = calendar.timegm((2026, 11, 25, 20, 0, 0))  # 2026-11-25T20:00:00Z, computed independently


@dataclass
class F:
    kind: str
    node: str
    boot: int
    seq: int
    fields: dict = field(default_factory=dict)


def fields_for(node_index: int, seq: int) -> dict:
    return {"t_raw": 500000 + seq, "p_raw": 400000, "h_raw": 30000, "t": 2400 + 10 * seq + node_index,
            "p": 100000 + seq, "h": 40960 + seq, "shade": 100 * seq, "mist": 0, "fan": 5000, "faults": 0,
            "failsafe": 0, "tick": seq, "i_shade": -7 * seq, "i_mist": 0, "i_fan": 3}


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "m.db"
    with Store(path) as store:
        for i, (node, zone) in enumerate((("n01", "A"), ("n02", "A"), ("n03", "B"))):
            store.upsert_node(node, seen=T0, zone=zone)
            store.add_frame(T0, "p", F("hello", node, 1, 0, {"board": "unix-sim"}))
            for seq in range(1, 61):  # one reading a minute for an hour
                store.add_frame(T0 + 60 * seq, f"/dev/pts/{i}", F("reading", node, 1, seq, fields_for(i, seq)))
    return path


def export(capsys, *args: str) -> tuple[int, list[dict[str, str]], str]:
    code = main(["export", *args])
    out, err = capsys.readouterr()
    return code, list(csv.DictReader(io.StringIO(out))), err


def test_export_all_readings_default_columns(capsys, db):
    code, rows, _ = export(capsys, "--db", str(db))
    assert code == 0
    assert len(rows) == 180  # readings only, no hello frames
    assert list(rows[0]) == ["time", "rx_time", "node", "boot", "seq", "t", "p", "h", "shade", "mist", "fan",
                             "faults", "failsafe"]
    by_key = {(r["node"], int(r["seq"])): r for r in rows}
    for i, node in enumerate(("n01", "n02", "n03")):
        for seq in range(1, 61):
            r = by_key[(node, seq)]
            want = fields_for(i, seq)
            assert [int(r[q]) for q in ("t", "p", "h", "shade", "fan")] == [want[q] for q in ("t", "p", "h", "shade", "fan")]
            assert float(r["rx_time"]) == T0 + 60 * seq
    first = by_key[("n01", 1)]["time"]
    assert first == "2026-11-25T20:01:00.000Z"


def test_export_node_time_window_and_quantities(capsys, db):
    code, rows, _ = export(capsys, "--db", str(db), "--node", "n02", "--since", "2026-11-25T20:10:00Z",
                           "--until", "2026-11-25T20:20:00+00:00", "--quantity", "t,i_shade")
    assert code == 0
    assert [int(r["seq"]) for r in rows] == list(range(10, 21))  # both ends inclusive
    assert {r["node"] for r in rows} == {"n02"}
    assert list(rows[0])[5:] == ["t", "i_shade"]
    assert [int(r["i_shade"]) for r in rows] == [-7 * s for s in range(10, 21)]  # from the JSON fields


def test_export_to_file(tmp_path, capsys, db):
    out = tmp_path / "x.csv"
    assert main(["export", "--db", str(db), "--node", "n03", "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60 and rows[-1]["t"] == str(fields_for(2, 60)["t"])


@pytest.mark.parametrize("args, message", [
    (["--node", "n09"], "n09 not in the database"),
    (["--since", "yesterday-ish"], "--since 'yesterday-ish'"),
    (["--quantity", "t,bogus"], "bogus"),
    (["--quantity", "t;drop"], "not a field name"),
    (["--since", "1h", "--until", "2h"], "before --since"),
])
def test_export_user_mistakes_are_clear(capsys, db, args, message):
    code, rows, err = export(capsys, "--db", str(db), *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert rows == []  # nothing half-written


def test_export_missing_db_is_clear(capsys, tmp_path):
    code, _, err = export(capsys, "--db", str(tmp_path / "nope.db"))
    assert code == 2 and "does not exist" in err


def test_parse_time_relative_and_iso():
    now = 1_800_000_000.0
    assert parse_time("90s", now=now) == now - 90
    assert parse_time("10m", now=now) == now - 600
    assert parse_time("-2h", now=now) == now - 7200
    assert parse_time("1.5d", now=now) == now - 1.5 * 86400
    assert parse_time("2026-11-25T20:00:00Z") == T0
    assert parse_time("2026-11-25T21:00:00+01:00") == T0


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_node_and_zone(tmp_path, capsys, db):
    import matplotlib.image

    out = tmp_path / "n01.png"
    assert main(["plot", "--db", str(db), "--node", "n01", "-o", str(out)]) == 0
    w, h = png_size(out)
    assert w > 300 and h > 150
    assert matplotlib.image.imread(out).shape[:2] == (h, w)  # decodes as a real image

    zone = tmp_path / "zone.png"
    assert main(["plot", "--db", str(db), "--zone", "A", "--quantity", "t,h", "-o", str(zone)]) == 0
    assert "240 points, 2 node(s)" in capsys.readouterr().err  # 60 readings x 2 quantities x n01, n02
    zw, zh = png_size(zone)
    assert zh > h  # two panels are taller than one


def test_plot_counts_points_per_zone(tmp_path, capsys, db):
    out = tmp_path / "z.png"
    assert main(["plot", "--db", str(db), "--zone", "B", "--quantity", "t,h", "-o", str(out)]) == 0
    assert "120 points, 1 node(s)" in capsys.readouterr().err  # 60 readings x 2 quantities, n03 only


@pytest.mark.parametrize("args, message", [
    (["--zone", "Z"], "no node in zone 'Z' (zones: A, B)"),
    (["--node", "n07"], "n07 not in the database"),
    (["--node", "n01", "--since", "2030-01-01T00:00"], "nothing to plot"),
])
def test_plot_user_mistakes_are_clear(tmp_path, capsys, db, args, message):
    out = tmp_path / "x.png"
    code = main(["plot", "--db", str(db), *args, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not out.exists()
