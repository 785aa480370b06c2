"""Frame authentication: HMAC against CPython's hmac, node-side rejects, host-side verifier."""

from __future__ import annotations

import ast
import hashlib
import hmac
import inspect
import json
import os
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canopy_host import security as hs
from canopy_host.protocol import Frame
from canopy_host.security import FrameVerifier, ReplayWindow, derive_node_key, tag_bytes
from canopy_host.paths import FIRMWARE_DIR
from canopy_host.protocol import FrameParser, encode_command
from canopy_host.unixport import call_batch
from conftest import MPY_TEST_DIR

EXTRA = [MPY_TEST_DIR]
MASTER = bytes(range(32))


def mpy(func, cases):
    return call_batch("mesh_harness", func, cases, extra_path=EXTRA)


def test_hmac_matches_cpython_hmac() -> None:
    rng = random.Random(7)
    cases = []
    for klen in (0, 1, 16, 32, 63, 64, 65, 100):
        for dlen in (0, 1, 55, 56, 64, 200):
            cases.append([rng.randbytes(klen).hex(), rng.randbytes(dlen).hex()])
    got = mpy("hmac_hex", cases)
    want = [hmac.new(bytes.fromhex(k), bytes.fromhex(d), hashlib.sha256).hexdigest() for k, d in cases]
    assert got == want


def test_derive_node_key_is_the_documented_hmac() -> None:
    k1 = hs.derive_node_key(MASTER, "n01")
    assert k1 == hmac.new(MASTER, b"canopy/node-key/v1/n01", hashlib.sha256).digest()
    assert k1 != hs.derive_node_key(MASTER, "n02")
    with pytest.raises(hs.SecurityError):
        hs.derive_node_key(b"short", "n01")


def test_tag_compare_is_constant_time_by_construction() -> None:
    """ct_equal_hex visits every digit and only accumulates: no early exit, no branch
    on the comparison inside the loop, one test of the accumulated value at the end."""
    src = (FIRMWARE_DIR / "canopy" / "security.py").read_text()
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "ct_equal_hex")
    loops = [n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While))]
    assert len(loops) == 1 and isinstance(loops[0], ast.For)
    assert ast.unparse(loops[0].iter) == "range(TAG_HEX)"
    for n in ast.walk(loops[0]):
        assert not isinstance(n, (ast.Return, ast.Break, ast.Continue, ast.If, ast.IfExp, ast.Compare,
                                  ast.BoolOp)), ast.unparse(n)
    rets = [n for n in ast.walk(fn) if isinstance(n, ast.Return)]
    assert [ast.unparse(r.value) for r in rets] == ["diff == 0"]
    # and it gives the right answers, upper-case hex included
    a = "0123456789abcdef" * 2
    cases = [[a, a], [a, a.upper()], [a, "f" + a[1:]], [a, a[:-1] + "0"], [a, "0" * 32]]
    assert mpy("ct_equal", cases) == [True, True, False, False, False]


def _frames(hexout: str):
    p = FrameParser()
    frames = p.feed(bytes.fromhex(hexout))
    p.flush_text()
    return frames, p.text_lines


def test_node_rejects_replayed_forged_cross_node_unauthenticated_and_rollback(tmp_path: Path) -> None:
    key = hs.derive_node_key(MASTER, "n01")
    other = hs.derive_node_key(MASTER, "n02")
    good5 = hs.tag_command(key, "n01", 5, "identify", {"seconds": 3})
    forged = bytearray(good5)
    i = forged.index(b"!") + 5
    forged[i] = ord("0") if forged[i] != ord("0") else ord("1")
    body = bytes(forged[: forged.rindex(b" *")])
    forged = body + b" *%08x\n" % zlib.crc32(body)  # a valid CRC: only the tag is wrong
    cross = hs.tag_command(other, "n01", 6, "identify", {"seconds": 4})  # n02's key speaking for n01
    untagged = encode_command("n01", 7, "identify", {"seconds": 5})
    broadcast = encode_command("*", 8, "status", {}, tag=hs.tag_bytes(key, b"@CNP1 * 0 8 C status"))
    ok9 = hs.tag_command(key, "n01", 9, "identify", {"seconds": 9})
    rollback = hs.tag_command(key, "n01", 4, "identify", {"seconds": 1})
    ok10 = hs.tag_command(key, "n01", 10, "status", {})
    session1 = [good5, good5, forged, cross, untagged, broadcast, ok9]
    session2 = [good5, rollback, ok10]  # after a reboot: the counter was kept in flash
    out, calls, rejects = mpy("link_session", [[
        "n01", key.hex(), str(tmp_path / "ctr"), "strict",
        [[x.hex() for x in session1], [x.hex() for x in session2]],
    ]])[0]
    assert calls == [["identify", 3], ["identify", 9]]
    f1, text1 = _frames(out[0])
    f2, _ = _frames(out[1])
    errs = [(f.fields.get("re"), f.fields["msg"]) for f in f1 + f2 if f.kind == "error" and f.fields["err"] == "auth"]
    assert errs == [(5, "replay"), (5, "forged"), (6, "forged"), (7, "unauth"), (8, "cross_node"),
                    (5, "replay"), (4, "replay")]
    events = [f.fields["arg"] for f in f1 + f2 if f.kind == "event" and f.fields["code"] == "security"]
    assert events == [3, 2, 2, 1, 4, 3, 3]
    assert rejects == [0, 0, 0, 2, 0, 0]  # per reason code, counted since the (second) boot
    status = [f for f in f2 if f.kind == "reply" and f.fields["cmd"] == "status"]
    assert status and status[0].fields["auth"] == "strict" and status[0].fields["sec_rejects"] == 2
    assert (tmp_path / "ctr").read_text() == "10"
    # every frame the node sent is tagged and verifies on the host, none is a replay
    ver = hs.FrameVerifier({"n01": key})
    assert all(f.tag for f in f1 + f2)
    assert [ver.verify(f) for f in f1] == ["ok"] * len(f1)
    # the second boot reuses boot id 77 in this harness: its seqs restart, which the
    # window reports as replays, exactly what a replayed capture would look like
    assert set(ver.verify(f) for f in f2) == {"replay"}
    assert not any("DEV MODE" in t for t in text1)


def test_malformed_tag_is_a_security_event(tmp_path: Path) -> None:
    line = b"@CNP1 n01 0 3 C status !xyz"
    line = line + b" *%08x\n" % zlib.crc32(line)
    out, calls, rejects = mpy("link_session", [["n01", "11" * 32, str(tmp_path / "c"), "strict", [[line.hex()]]]])[0]
    frames, _ = _frames(out[0])
    assert [(f.fields["err"], f.fields.get("msg")) for f in frames if f.kind == "error"] == [
        ("malformed", "tag"), ("auth", "malformed")]
    assert rejects[5] == 1 and calls == []


def test_without_key_locked_unless_dev_mode_is_enabled(tmp_path: Path) -> None:
    cmd = encode_command("n01", 1, "identify", {"seconds": 2})
    res = mpy("link_session", [
        ["n01", None, str(tmp_path / "a"), "locked", [[cmd.hex()]]],
        ["n01", None, str(tmp_path / "b"), "dev", [[cmd.hex()]]],
    ])
    (out_l, calls_l, _), (out_d, calls_d, _) = res
    fl, text_l = _frames(out_l[0])
    fd, text_d = _frames(out_d[0])
    assert calls_l == [] and [f.fields["msg"] for f in fl if f.kind == "error"] == ["unauth"]
    assert any("refused" in t for t in text_l)
    assert calls_d == [["identify", 2]] and any("UNAUTHENTICATED DEV MODE" in t for t in text_d)
    assert not any(f.tag for f in fd)


def test_key_file_loading(tmp_path: Path) -> None:
    good = tmp_path / "good"
    wrong = tmp_path / "wrong"
    bad = tmp_path / "bad"
    none = tmp_path / "none"
    for d in (good, wrong, bad, none):
        d.mkdir()
    key = hs.derive_node_key(MASTER, "n01")
    (good / "canopy_key.json").write_text(hs.key_file_text(key, "n01"))
    (wrong / "canopy_key.json").write_text(hs.key_file_text(key, "n02"))
    (bad / "canopy_key.json").write_text("{not json")
    assert hs.read_key_file(good / "canopy_key.json") == ("n01", key)
    res = mpy("load_auth", [[str(good), "n01", False], [str(wrong), "n01", False], [str(bad), "n01", True],
                            [str(none), "n01", False], [str(none), "n01", True]])
    assert res[0] == ["strict", None, True]
    assert res[1][0] == "locked" and "n02" in res[1][1]
    assert res[2][0] == "dev" and res[2][1] == "not JSON"
    assert res[3] == ["locked", None, False] and res[4] == ["dev", None, False]
    with pytest.raises(hs.SecurityError):
        hs.read_key_file(bad / "canopy_key.json")


def test_host_verifier_window_rollback_forged_cross_node() -> None:
    from canopy_host.protocol import parse_line

    keys = {n: hs.derive_node_key(MASTER, n) for n in ("n01", "n02")}

    def frame(node: str, boot: int, seq: int, key: bytes | None, tamper: bool = False):
        body = b"@CNP1 %s %d %d E code=boot arg=1" % (node.encode(), boot, seq)
        if key is not None:
            t = hs.tag_bytes(key, body)
            if tamper:
                t = bytes([t[0] ^ 1]) + t[1:]
            body += b" !" + t.hex().encode()
        return parse_line(body + b" *%08x" % zlib.crc32(body))

    v = hs.FrameVerifier(dict(keys))
    k1 = keys["n01"]
    seq = [v.verify(frame("n01", 3, s, k1)) for s in (0, 1, 5, 3, 3, 2)]
    assert seq == ["ok", "ok", "ok", "ok", "replay", "ok"]
    assert v.verify(frame("n01", 3, 5 + 64, k1)) == "ok"
    assert v.verify(frame("n01", 3, 5, k1)) == "replay"  # fell out of the 64-frame window
    assert v.verify(frame("n01", 2, 99, k1)) == "rollback"
    assert v.verify(frame("n01", 4, 0, k1)) == "ok"  # a reboot
    assert v.verify(frame("n01", 4, 1, k1, tamper=True)) == "forged"
    assert v.verify(frame("n01", 4, 1, keys["n02"])) == "cross_node"
    assert v.verify(frame("n01", 4, 1, None)) == "unauth"
    assert v.verify(frame("n09", 1, 1, k1)) == "unknown_node"
    assert v.verify(frame("n01", 4, 1, k1)) == "ok"
    assert v.counts["forged"] == 1 and v.counts["cross_node"] == 1 and v.counts["rollback"] == 1
    assert ("n01", "rollback", 2, 99) in v.events


def test_command_counter_persists_and_never_repeats(tmp_path: Path) -> None:
    path = tmp_path / "sec" / "counter.json"
    a = hs.CommandCounter(path)
    first = [a.next() for _ in range(3)]
    b = hs.CommandCounter(path)  # another run of the tool
    assert first == [1, 2, 3] and b.next() == 4 and json.loads(path.read_text())["counter"] == 4
    path.write_text("garbage")
    with pytest.raises(hs.SecurityError):
        b.next()
    with pytest.raises(hs.SecurityError):
        hs.tag_command(b"k" * 32, "*", 1, "status")


def test_tagged_frames_fit_250_bytes_and_parse_fast_path() -> None:
    """Tagged readings parse (fast path) and verify; the worst-case tagged hello fits."""
    hello = bytes.fromhex(mpy("worst_hello", [["x" * 16, "22" * 32]])[0])
    assert len(hello) <= 250 and hello.endswith(b"\n")
    f = FrameParser().feed(hello)
    assert len(f) == 1 and f[0].kind == "hello" and f[0].tag
    assert hs.FrameVerifier({"x" * 16: bytes.fromhex("22" * 32)}).verify(f[0]) == "ok"
    key = hs.derive_node_key(MASTER, "n01")
    short = b"@CNP1 n01 1 2 R 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"
    tagged = short + b" !" + hs.tag_bytes(key, short).hex().encode()
    full = tagged + b" *%08x\n" % zlib.crc32(tagged)
    frames = FrameParser().feed(full * 3)
    assert len(frames) == 3 and frames[0].tag and frames[0].fields["i_fan"] == 15
    assert hs.FrameVerifier({"n01": key}).verify(frames[0]) == "ok"


_REAL_NODE = """
from canopy import board, config, hal
from canopy.link import from_flash
from canopy.node import Node
import main
hw = hal.open(board.load("unix-sim"), {"node_id": "n07", "seed": 1, "speed": 0})
node = Node(hw, config.merged(), boot_id=5)
main.loop(node, from_flash(node, repair=False), 8000)
"""


def test_real_node_from_flash_is_strict_with_a_key_file(tmp_path: Path) -> None:
    """The production path (Link built by canopy.link.from_flash) on the real Node."""
    from canopy_host.unixport import run_code

    key = hs.derive_node_key(MASTER, "n07")
    (tmp_path / "canopy_key.json").write_text(hs.key_file_text(key, "n07"))
    status = hs.tag_command(key, "n07", 1, "status", {})
    forged = hs.tag_command(hs.derive_node_key(MASTER, "n08"), "n07", 2, "set", {"t_setpoint": 2000})
    good = hs.tag_command(key, "n07", 3, "set", {"t_setpoint": 2400})
    stdin = status + forged + status + good
    proc = run_code(_REAL_NODE, stdin=stdin.decode(), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    p = FrameParser()
    frames = p.feed(proc.stdout.encode())
    answers = [(f.kind, f.fields.get("re"), f.fields.get("msg")) for f in frames if f.kind in ("reply", "error")]
    assert answers == [("reply", 1, None), ("error", 2, "forged"), ("error", 1, "replay"), ("reply", 3, None)]
    assert (tmp_path / "canopy_ctr").read_text() == "3"
    ver = hs.FrameVerifier({"n07": key})
    assert {ver.verify(f) for f in frames} == {"ok"} and len(frames) > 8
    status_reply = next(f for f in frames if f.kind == "reply")
    assert status_reply.fields["auth"] == "strict" and status_reply.fields["sec_rejects"] == 0


def test_host_auth_commands_use_fresh_persisted_counters(tmp_path: Path) -> None:
    from canopy_host.protocol import parse_line

    a = hs.HostAuth(MASTER, tmp_path / "ctr.json")
    l1 = parse_line(a.command("n01", "status").rstrip(b"\n"))
    l2 = parse_line(hs.HostAuth(MASTER, tmp_path / "ctr.json").command("n02", "identify", {"seconds": 1}).rstrip(b"\n"))
    assert (l1.seq, l2.seq) == (1, 2) and l1.tag and l2.tag
    body = l2.raw[: l2.raw.rindex(b" !")]
    assert bytes.fromhex(l2.tag) == hmac.new(hs.derive_node_key(MASTER, "n02"), body, hashlib.sha256).digest()[:16]


# -- batch verification (the monitor's run scanner, FrameVerifier.verify_run) ---------

@settings(max_examples=400, deadline=None)
@given(
    history=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 200)), max_size=30),
    boot=st.integers(0, 3), seq=st.integers(0, 300), n=st.integers(0, 80),
)
def test_check_run_equals_check_one_by_one(history, boot, seq, n):
    one, batch = ReplayWindow(), ReplayWindow()
    for b, s in history:
        one.check(b, s)
        batch.check(b, s)
    good = 0
    while good < n and one.check(boot, seq + good) == "ok":
        good += 1
    assert batch.check_run(boot, seq, n) == good
    assert (batch.boot, batch.top, batch.bits) == (one.boot, one.top, one.bits)


def test_check_run_after_a_long_silence_keeps_the_window_small():
    w = ReplayWindow()
    w.check(1, 5)
    assert w.check_run(1, 10**9, 3) == 3 and w.top == 10**9 + 2 and w.bits == 0b111
    assert w.check(1, 10**9) == "replay" and w.check(1, 5) == "replay"


def _frame(node: str, boot: int, seq: int, body: bytes, tag: bytes) -> Frame:
    raw = body + b" !" + tag.hex().encode()
    return Frame("reading", node, boot, seq, {}, raw + b" *%08x" % zlib.crc32(raw), tag.hex())


def test_verify_run_equals_verify_frame_by_frame():
    master = bytes(range(32))
    key = derive_node_key(master, "n01")
    other = derive_node_key(master, "n02")
    lines = []
    for s in range(10):
        body = b"@CNP1 n01 4 %d R 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15" % s
        tag = tag_bytes(other if s == 7 else key, body)  # seq 7 speaks with n02's key
        lines.append((s, body, tag))
    batch = FrameVerifier.from_master(master, ["n01", "n02"])
    one = FrameVerifier.from_master(master, ["n01", "n02"])
    good = batch.verify_run("n01", 4, 0, [b for _, b, _ in lines], [t for _, _, t in lines])
    verdicts = [one.verify(_frame("n01", 4, s, b, t)) for s, b, t in lines]
    assert good == 7 and verdicts[:7] == ["ok"] * 7 and verdicts[7] == "cross_node"
    # the frame the batch stopped at gets its verdict from verify(), as if never batched
    assert batch.verify(_frame("n01", 4, 7, lines[7][1], lines[7][2])) == "cross_node"
    assert batch.verify_run("n01", 4, 8, [lines[8][1]], [lines[8][2]]) == 1
    assert one.counts == {**batch.counts, "ok": batch.counts["ok"] + 1}  # `one` also took seq 9
    assert batch.verify_run("n01", 4, 3, [lines[3][1]], [lines[3][2]]) == 0  # a replay stops the batch
    assert batch.verify_run("n03", 4, 0, [lines[0][1]], [lines[0][2]]) == 0  # unknown node
