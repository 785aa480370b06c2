"""Planning and journaling without nodes: consensus findings in, steps out; frame sizes;
the journal refuses illegal moves; the audit filters."""

from __future__ import annotations

import json
import zlib

import pytest

from canopy_host.errors import CanopyError
from canopy_host.faults import Action, Finding
from canopy_host.repair import (Journal, Step, audit_entries, config_chunks, encode_repair_command, plan)
from canopy_host.repair_cmd import read_findings
from canopy_host.shadow import Actual, Shadow, firmware_config, load_shadow
from test_repair_support import canonical_digest

DEFAULTS = firmware_config().DEFAULT_CONFIG


def finding(node: str, kind: str, actionable: bool = True, quantity: str = "t", offset: float | None = None):
    return Finding(node, "A", quantity, 0.0, "drift" if kind == "recalibrate" else "stuck", True, actionable,
                   Action(kind, node, quantity, offset, "test"), {})


def at(version: int, **over: object) -> Actual:
    return Actual(version, canonical_digest(dict(DEFAULTS, version=version, **over)))


def test_desired_digest_matches_an_independent_canonical_json():
    sh = Shadow({"version": 7, "t_setpoint": 2450}, {"n01": {"config": {"safe_fan": 100}}})
    want = sh.desired("n01")
    assert want.digest == canonical_digest(dict(DEFAULTS, version=7, t_setpoint=2450, safe_fan=100))
    assert json.loads(want.canonical()) == dict(DEFAULTS, version=7, t_setpoint=2450, safe_fan=100)


def test_plan_stale_tampered_newer_and_matching_nodes():
    sh = Shadow({"version": 3}, {n: {} for n in ("a", "b", "c", "d")})
    p = plan(sh, {"a": at(2), "b": at(3, t_setpoint=9), "c": at(4), "d": at(3)})
    steps = {s.node: s for s in p.steps}
    assert set(steps) == {"a", "b"}
    assert "stale" in steps["a"].reason and "tampered" in steps["b"].reason
    assert p.skipped == [("c", "runs config v4, newer than desired v3: never rolled back")]


def test_findings_from_consensus_objects_and_no_quorum():
    sh = Shadow({}, {n: {} for n in ("a", "b", "c")})
    have = {n: at(1) for n in ("a", "b", "c")}
    p = plan(sh, have, [finding("a", "recalibrate", offset=0.35), finding("b", "quarantine", actionable=False),
                        finding("c", "recalibrate", quantity="h", offset=-2.0)])
    got = [(s.node, s.action, s.target) for s in p.steps]
    assert ("a", "recalibrate", {"channel": "t", "offset": -35}) in got
    assert ("c", "recalibrate", {"channel": "h", "offset": 2048}) in got
    assert not any(s.node == "b" for s in p.steps) and p.skipped[0][0] == "b"
    # a node already quarantined that agrees again is released
    sh.set_quarantine("b", True)
    have["b"] = Actual(1, have["b"].cfg_digest, quarantine=True)
    p = plan(sh, have, [finding("b", "release")])
    assert [(s.node, s.action) for s in p.steps if s.node == "b"] == [("b", "release")]


def test_read_findings_accepts_consensus_verdict_lines(tmp_path):
    ok = {"zone": "A", "quantity": "t", "status": "OK",
          "faults": {"n01": finding("n01", "recalibrate", offset=0.5).to_json(),
                     "n02": finding("n02", "none").to_json()}}
    nq = {"zone": "B", "quantity": "t", "status": "NO_QUORUM",
          "faults": {"n03": finding("n03", "quarantine").to_json()}}
    f = tmp_path / "v.jsonl"
    f.write_text(json.dumps(ok) + "\n\n" + json.dumps(nq) + "\n")
    rows = read_findings(str(f))
    by = {r["node"]: r for r in rows}
    assert by["n01"]["actionable"] and by["n01"]["action"]["offset"] == 0.5
    assert by["n03"]["actionable"] is False  # NO_QUORUM wins over the finding's own flag
    sh = Shadow({}, {"n01": {}, "n02": {}, "n03": {}})
    p = plan(sh, {n: at(1) for n in sh.nodes}, rows)
    assert [(s.node, s.action) for s in p.steps] == [("n01", "recalibrate")]
    f.write_text('{"zone": "A"}\n')
    with pytest.raises(CanopyError, match="v.jsonl:1"):
        read_findings(str(f))


def test_every_repair_frame_fits_250_bytes_with_the_tag_budget():
    cfg = dict(DEFAULTS, version=1000, **{k: -(1 << 20) for k in ("t_min", "p_min", "h_min")})
    data = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    node = "abcdefghijklmnop"
    lines = [encode_repair_command(node, 9_999_999_999, "cfg_chunk", a) for a in config_chunks(data)]
    lines.append(encode_repair_command(node, 9_999_999_999, "cfg_stage",
                                       {"ver": 1000, "size": len(data), "digest": "f" * 64}))
    lines.append(encode_repair_command(node, 9_999_999_999, "cfg_activate", {"digest": "f" * 64}))
    for line in lines:
        assert len(line) + 34 <= 250  # 34 bytes stay free for the security tag
        body, crc = line.rstrip(b"\n").rsplit(b" *", 1)
        assert int(crc, 16) == zlib.crc32(body)
    # the chunks carry exactly the data, in order
    joined = b"".join(bytes.fromhex(a["a"][1:] + a.get("b", "x")[1:]) for a in config_chunks(data))
    assert joined == data


def test_journal_refuses_illegal_moves_and_audit_filters(tmp_path):
    t = [100.0]
    j = Journal(tmp_path / "j.db", clock=lambda: t[0])
    job = j.add(Step("n01", "push_config", {"version": 2, "digest": "0" * 64}, "stale"))
    with pytest.raises(CanopyError, match="illegal"):
        j.move(job, "ROLLED_BACK")
    t[0] = 200.0
    j.move(job, "STAGED")
    other = j.add(Step("n02", "quarantine", {"on": 1}, "q"))
    t[0] = 300.0
    j.move(other, "ACTIVATED")
    assert [e["event"] for e in audit_entries(j.con, node="n01")] == ["planned", "state"]
    assert {e["node"] for e in audit_entries(j.con, since=250)} == {"n02"}
    assert [e["time"] for e in audit_entries(j.con, until=150)] == [100.0]
    j.close()


def test_bad_shadow_files(tmp_path):
    p = tmp_path / "s.json"
    p.write_text("[1]")
    with pytest.raises(CanopyError, match="expected"):
        load_shadow(p)
    p.write_text(json.dumps({"nodes": {"n01": {"cal": {"x": 1}}}}))
    with pytest.raises(CanopyError, match="cal"):
        load_shadow(p)
    p.write_text(json.dumps({"config": {"bogus": 1}, "nodes": {"n01": {}}}))
    with pytest.raises(CanopyError, match="bogus"):
        load_shadow(p)


def test_a_schema_2_monitor_database_is_upgraded_in_place(tmp_path):
    import sqlite3

    from canopy_host.store import open_db

    db = tmp_path / "old.db"
    open_db(db).close()
    con = sqlite3.connect(db)  # schema 2 = today's schema without the repair tables
    con.executescript("DROP TABLE repair_jobs; DROP TABLE repair_audit;"
                      "UPDATE meta SET value='2' WHERE key='schema_version';"
                      "INSERT INTO frames (rx_time, port, node, boot, seq, kind) VALUES (1, 'p', 'n01', 1, 0, 'hello');")
    con.commit()
    con.close()
    con = open_db(db, create=False)
    assert con.execute("SELECT value FROM meta").fetchone()[0] == "3"
    assert con.execute("SELECT node FROM frames").fetchall() == [("n01",)]  # data kept
    assert con.execute("SELECT COUNT(*) FROM repair_audit").fetchone()[0] == 0
    con.close()
