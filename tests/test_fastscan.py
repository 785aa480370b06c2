"""The run scanner (protocol.scan_readings): compiled C and its Python twin agree, and
FrameParser.feed_run gives exactly what feed_compact gives.

`_fastscan.scan_readings` is C that parses untrusted bytes, so it is held to its Python
twin `scan_readings_py` (regex + zlib, the reference) on hand-built reading lines with
random byte edits, with and without a recomputed CRC, at random offsets and with right
and wrong expectations (node, boot, seq). The twin itself is held to the general parser:
every row it returns must be a reading that `FrameParser.feed` also returns, with the
same values, and `feed_run` must leave the parser exactly where `feed_compact` does.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canopy_host import protocol
from canopy_host.protocol import READING_KEYS, FrameParser, compact_frame, scan_readings_py

from test_protocol_fastpath import COUNTERS, _apply, _line, _reseal, edits

HEAD = (1.5, "/dev/p0", "reading", None)


def _can_build_extensions(tmp_path) -> bool:
    """A compiler that finds Python.h and zlib.h: what setup.py needs."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return False
    probe = tmp_path / "probe.c"
    probe.write_text("#include <Python.h>\n#include <zlib.h>\nint main(void) { return 0; }\n")
    cmd = [cc, "-fsyntax-only", f"-I{sysconfig.get_paths()['include']}", str(probe)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_the_compiled_scanner_is_built_where_it_can_be(tmp_path):
    # dev.sh installs host_tools with its C extension; without a compiler or the headers
    # the build skips it (setup.py, optional=True) and the Python twin runs instead.
    if not _can_build_extensions(tmp_path):
        pytest.skip("cannot build C extensions here: the Python twin is in use")
    assert protocol.FAST_SCAN == "compiled"


compiled = pytest.mark.skipif(protocol._scan_readings_c is None, reason="_fastscan not built (no C compiler)")

run_nodes = st.sampled_from(["n01", "n02", "node_with-16chr", "x"])
good_values = st.lists(st.integers(min_value=-(10**11) + 1, max_value=10**11 - 1), min_size=15, max_size=15)
odd_values = st.lists(st.integers(min_value=-(10**11) - 5, max_value=10**11 + 5), min_size=14, max_size=16)


@st.composite
def streams(draw):
    """A run of reading lines of one node, mostly well-formed; some edited or off-run."""
    node = draw(run_nodes)
    boot = draw(st.sampled_from([0, 7, 10**10 - 1, 10**10]))
    seq = draw(st.sampled_from([0, 5, 10**10 - 3]))
    tagged = draw(st.booleans())  # the run's good lines carry a tag (a keyed mesh)
    out = b""
    for k in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 3)) > 0:  # a good line of the run
            line = _line(node, boot, seq + k, draw(good_values))
            if tagged:
                line = _reseal(line[:-10] + b" !" + draw(st.binary(min_size=16, max_size=16)).hex().encode()
                               + b" *00000000")
            out += line + draw(st.sampled_from([b"\n", b"\r\n"]))
            continue
        line = _line(draw(st.one_of(st.just(node), run_nodes)), boot, seq + k + draw(st.sampled_from([0, 1, -1])),
                     draw(st.one_of(good_values, odd_values)))
        line = _apply(line, draw(edits))
        if draw(st.booleans()):
            line = _reseal(line)
        if draw(st.integers(0, 4)) == 0:  # a tag (the untagged scanner stops there)
            line = _reseal(line[:-10] + b" !" + draw(st.sampled_from([b"ab" * 16, b"AB" * 16, b"ab" * 15, b"g" * 32]))
                           + b" *00000000")
        out += line + draw(st.sampled_from([b"\n", b"\r\n", b"\r\r\n", b""]))
    expect = (node, boot, seq)
    if draw(st.integers(0, 3)) == 0:
        expect = (draw(run_nodes), boot + draw(st.sampled_from([0, 1])), seq + draw(st.sampled_from([0, 1])))
    return out, expect


@compiled
@settings(max_examples=1000, deadline=None)
@given(streams(), st.integers(0, 40), st.integers(0, 300))
def test_compiled_scanner_equals_python_twin(stream, pos, cut):
    data, (node, boot, seq) = stream
    for buf in (data, data[:cut], bytearray(data)):
        p = min(pos, len(buf))
        for tagged in (False, True):
            want = scan_readings_py(buf, p, node, boot, seq, HEAD, tagged)
            assert protocol._scan_readings_c(buf, p, node, boot, seq, HEAD, tagged) == want


def _check_rows_against_general_parser(buf: bytes, node: str, boot: int, seq: int, tagged: bool = False) -> int:
    if tagged:
        rows, ends, bodies, tags = scan_readings_py(buf, 0, node, boot, seq, HEAD, True)
        end = ends[-1] if ends else 0
    else:
        rows, end = scan_readings_py(buf, 0, node, boot, seq, HEAD)
    frames = FrameParser().feed(buf[:end])
    assert len(frames) == len(rows)  # every consumed line is exactly one good frame
    for k, (row, f) in enumerate(zip(rows, frames)):
        assert row[:4] == HEAD
        assert (f.kind, f.node, f.boot, f.seq) == ("reading", node, boot, seq + k)
        assert row[4:] == (node, boot, seq + k, *f.fields.values()) and tuple(f.fields) == READING_KEYS
        assert all(type(v) is int for v in row[5:])
        if tagged:  # what the verifier signs and checks (security.FrameVerifier)
            assert bodies[k] == f.raw[:f.raw.rfind(b" !")] and tags[k] == bytes.fromhex(f.tag)
            assert buf[:ends[k]].rstrip(b"\r\n").endswith(f.raw)
        else:
            assert f.tag is None
    return len(rows)


@settings(max_examples=800, deadline=None)
@given(streams(), st.booleans())
def test_python_twin_takes_only_what_the_general_parser_accepts(stream, tagged):
    data, (node, boot, seq) = stream
    _check_rows_against_general_parser(data, node, boot, seq, tagged)


def test_scanner_edges():
    good = [_line("n01", 7, s, list(range(s, s + 15))) + b"\n" for s in range(3, 6)]
    big, short = -(10**11) + 1, -(10**10) + 1
    at_limit = _line("n" * 16, 10**10 - 1, 10**10 - 1, [short] * 2 + [big] * 13) + b"\n"  # 249 + LF
    over = _line("n" * 16, 10**10 - 1, 10**10 - 1, [short] + [big] * 14) + b"\n"
    assert len(at_limit) == protocol.MAX_FRAME and len(over) == protocol.MAX_FRAME + 1
    leading = _reseal(_line("n01", 7, 3, list(range(15))).replace(b" R 0,1,", b" R -0,001,")[:-10] + b" *0")
    cases = [
        (b"".join(good), ("n01", 7, 3), 3),
        (b"".join(good), ("n01", 7, 4), 0),  # not the next seq: the general path decides
        (b"".join(good), ("n02", 7, 3), 0),
        (good[0] + good[2], ("n01", 7, 3), 1),  # a gap ends the run
        (good[0] + good[1][:-1], ("n01", 7, 3), 1),  # incomplete line: wait for it
        (good[0].replace(b"\n", b"\r\n") + good[1], ("n01", 7, 3), 2),
        (good[0] + b"text\n" + good[1], ("n01", 7, 3), 1),
        (at_limit, ("n" * 16, 10**10 - 1, 10**10 - 1), 1),
        (over, ("n" * 16, 10**10 - 1, 10**10 - 1), 0),
        (leading + b"\n", ("n01", 7, 3), 1),  # leading zeros and -0 are still decimals
        (good[0].replace(b"*", b"*A", 1)[:-2] + b"\n", ("n01", 7, 3), 0),
        (_reseal(_line("n01", 7, 3, list(range(16)))) + b"\n", ("n01", 7, 3), 0),  # 16 values
        (_reseal(_line("n01", 7, 3, list(range(14)))) + b"\n", ("n01", 7, 3), 0),  # 14 values
        (good[0].upper().replace(b"@CNP1 N01", b"@CNP1 n01").replace(b" r ", b" R "), ("n01", 7, 3), 1),
    ]
    scanners = [scan_readings_py] + ([protocol._scan_readings_c] if protocol._scan_readings_c else [])
    for buf, (node, boot, seq), n in cases:
        assert _check_rows_against_general_parser(buf, node, boot, seq) == n, buf
        for scan in scanners:
            rows, end = scan(buf, 0, node, boot, seq, HEAD)
            assert len(rows) == n and end == sum(len(x) for x in buf.splitlines(keepends=True)[:n]), (scan, buf)
    row = scan_readings_py(leading + b"\n", 0, "n01", 7, 3, ())[0][0]
    assert row[3:6] == (0, 1, 2)


@compiled
def test_compiled_scanner_rejects_bad_arguments():
    c = protocol._scan_readings_c
    with pytest.raises(TypeError):
        c(b"", 0, "n01", 1, 2)
    with pytest.raises(TypeError):
        c(b"", 0, b"n01", 1, 2, ())
    with pytest.raises(ValueError):
        c(b"abc", 4, "n01", 1, 2, ())
    with pytest.raises(TypeError):
        c("text", 0, "n01", 1, 2, ())


def _norm(item) -> tuple:
    # a run row and a reading Frame compare as (node, boot, seq, values, tag)
    if type(item) is tuple and len(item) == len(HEAD) + 3 + len(READING_KEYS):
        return item[4:7] + (item[7:], None)
    f = compact_frame(item) if type(item) is tuple else item
    if f.kind == "reading":
        return (f.node, f.boot, f.seq, tuple(f.fields.values()), f.tag)
    return (f,)


def _feed_both(data: bytes, cuts: list[int], expect) -> list[tuple]:
    out = []
    for mode in ("run", "compact"):
        p = FrameParser()
        got: list = []
        prev = 0
        for c in sorted(set(cuts)) + [len(data)]:
            piece = data[prev:c]
            prev = c
            if mode == "run":
                rows, rest = p.feed_run(piece, *expect, HEAD)
                assert all(r[:4] == HEAD for r in rows)
                got += map(_norm, rows + (rest if rest is not None else []))
            else:
                got += map(_norm, p.feed_compact(piece))
        p.flush_text()
        out.append((got, {k: getattr(p, k) for k in COUNTERS}, p.text_lines, bytes(p._buf)))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams(), cuts=st.lists(st.integers(0, 900), max_size=4), twin=st.booleans())
def test_feed_run_leaves_the_parser_where_feed_compact_does(stream, cuts, twin, monkeypatch):
    # same readings and frames in the same order, same counters, text and buffered tail
    data, expect = stream
    with monkeypatch.context() as m:
        if twin:
            m.setattr(protocol, "scan_readings", scan_readings_py)
        run, compact = _feed_both(data, cuts, expect)
    assert run == compact


def test_feed_run_only_scans_from_a_line_start():
    good = [_line("n01", 7, s, list(range(15))) + b"\n" for s in range(3)]
    p = FrameParser()
    rows, rest = p.feed_run(b"noise " + good[0] + good[1], "n01", 7, 0, HEAD)
    assert rows == [] and len(rest) == 2 and p.text_lines == ["noise "]
    rows, rest = p.feed_run(good[2], "n01", 7, 2, HEAD)
    assert [r[6] for r in rows] == [2] and rest is None and p.frames == 3


# -- a gateway's port: several nodes interleaved (scan_gateway) --------------------------

@st.composite
def gateway_streams(draw):
    """Several nodes' readings interleaved as a mesh gateway relays them, mostly each
    continuing its node; some edited, off-run, tagged differently or from unknown nodes."""
    tagged = draw(st.booleans())
    names = ["n01", "n02", "node_with-16chr"]
    seqs = {n: draw(st.sampled_from([0, 5, 10**10 - 3])) for n in names}
    boot = draw(st.sampled_from([7, 10**10 - 1]))
    expect = {n: [boot, s] for n, s in seqs.items() if draw(st.integers(0, 4))}
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        node = draw(st.sampled_from(names + ["n09"]))
        seq = seqs.get(node, 0)
        line = _line(node, boot, seq, draw(good_values))
        if tagged:
            line = _reseal(line[:-10] + b" !" + draw(st.binary(min_size=16, max_size=16)).hex().encode() + b" *00000000")
        if draw(st.integers(0, 5)) == 0:
            line = _apply(line, draw(edits))
            if draw(st.booleans()):
                line = _reseal(line)
        out += line + draw(st.sampled_from([b"\n", b"\r\n"]))
        seqs[node] = seq + draw(st.sampled_from([1, 1, 1, 1, 0, 2]))
    return out, expect


@compiled
@settings(max_examples=800, deadline=None)
@given(gateway_streams(), st.integers(0, 300))
def test_compiled_gateway_scanner_equals_python_twin(stream, cut):
    data, expect = stream
    for buf in (data, data[:cut]):
        for tagged in (False, True):
            want_expect = {k: list(v) for k, v in expect.items()}
            got_expect = {k: list(v) for k, v in expect.items()}
            want = protocol.scan_gateway_py(buf, 0, want_expect, HEAD, tagged)
            assert protocol._scan_gateway_c(buf, 0, got_expect, HEAD, tagged) == want
            assert got_expect == want_expect  # the next seqs advanced alike


@settings(max_examples=400, deadline=None)
@given(gateway_streams())
def test_gateway_twin_takes_only_what_the_general_parser_accepts(stream):
    data, expect = stream
    before = {k: list(v) for k, v in expect.items()}
    rows, end = protocol.scan_gateway_py(data, 0, expect, HEAD)
    frames = FrameParser().feed(data[:end])
    assert len(frames) == len(rows)
    nxt = {k: v[1] for k, v in before.items()}
    for row, f in zip(rows, frames):
        assert (f.kind, f.tag) == ("reading", None) and f.node in before and f.boot == before[f.node][0]
        assert f.seq == nxt[f.node] and row[4:] == (f.node, f.boot, f.seq, *f.fields.values())
        nxt[f.node] += 1
    assert {k: v[1] for k, v in expect.items()} == nxt


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=gateway_streams(), cuts=st.lists(st.integers(0, 900), max_size=4), twin=st.booleans())
def test_feed_gateway_leaves_the_parser_where_feed_compact_does(stream, cuts, twin, monkeypatch):
    data, expect = stream
    with monkeypatch.context() as m:
        if twin:
            m.setattr(protocol, "scan_gateway", protocol.scan_gateway_py)
        out = []
        for mode in ("gateway", "compact"):
            p = FrameParser()
            got: list = []
            prev = 0
            for c in sorted(set(cuts)) + [len(data)]:
                piece, prev = data[prev:c], c
                if mode == "gateway":
                    rows, rest = p.feed_gateway(piece, expect, HEAD)
                    got += map(_norm, rows + (rest if rest is not None else []))
                else:
                    got += map(_norm, p.feed_compact(piece))
            p.flush_text()
            out.append((got, {k: getattr(p, k) for k in COUNTERS}, p.text_lines, bytes(p._buf)))
    assert out[0] == out[1]
