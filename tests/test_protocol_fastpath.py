"""FrameParser's fast path for reading lines must be invisible: same frames, same counters.

The reference is the same parser with the fast path switched off (every line then goes
through parse_line, whose rules tests/test_protocol.py checks against docs/protocol.md).
Inputs are hand-built reading lines (not encode_frame) with random byte edits, with and
without a recomputed CRC, cut into random read sizes.
"""

from __future__ import annotations

import re
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canopy_host import protocol
from canopy_host.protocol import FrameParser

NEVER = re.compile(rb"(?!)")
COUNTERS = ("frames", "crc_errors", "malformed", "oversize", "unsupported", "garbage_bytes")


def _line(node: str, boot: int, seq: int, values: list[int]) -> bytes:
    body = f"@CNP1 {node} {boot} {seq} R {','.join(map(str, values))}".encode()
    return body + b" *%08x" % zlib.crc32(body)


def _reseal(line: bytes) -> bytes:
    body, star, _ = line.rpartition(b" *")
    return body + b" *%08x" % zlib.crc32(body) if star else line


def _run(data: bytes, cuts: list[int], fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(protocol, "_FAST_READING_RE", NEVER)
        p = FrameParser()
        frames = []
        prev = 0
        for c in sorted(set(cuts)) + [len(data)]:
            frames += p.feed(data[prev:c])
            prev = c
        p.flush_text()
    return frames, {k: getattr(p, k) for k in COUNTERS}, p.text_lines


nodes = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=18)
values = st.lists(st.integers(min_value=-(10**12) + 1, max_value=10**12 - 1), min_size=13, max_size=18)
edit_bytes = st.sampled_from(b"0123456789abcdefABCDEF,- *R@\r\n\x00\x7f\xff=.+_")
edits = st.lists(
    st.tuples(st.sampled_from("rid"), st.integers(min_value=0, max_value=300), edit_bytes), max_size=3
)


def _apply(line: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(line)
    for op, at, byte in ops:
        at %= len(b) + 1
        if op == "i":
            b.insert(at, byte)
        elif at < len(b):
            if op == "r":
                b[at] = byte
            else:
                del b[at]
    return bytes(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(
        st.tuples(nodes, st.integers(0, 10**10), st.integers(0, 10**10), values, edits, st.booleans(),
                  st.sampled_from([b"\n", b"\r\n", b"\r\r\n", b""])),
        min_size=1, max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_fast_path_matches_general_path(lines, cuts, monkeypatch):
    data = b""
    for node, boot, seq, vals, ops, reseal, ending in lines:
        line = _apply(_line(node, boot, seq, vals), ops)
        data += (_reseal(line) if reseal else line) + ending
    assert _run(data, cuts, True, monkeypatch) == _run(data, cuts, False, monkeypatch)


def test_fast_path_is_taken_and_checks_everything(monkeypatch):
    good = _line("n01", 7, 3, list(range(-7, 8))) + b"\r\n"
    bad_crc = good.replace(b"R -7", b"R -8")
    big, short = -(10**11) + 1, -(10**10) + 1
    long_ok = _line("n" * 16, 10**10 - 1, 10**10 - 1, [short] * 2 + [big] * 13)  # 249 + LF = the limit
    too_long = _line("n" * 16, 10**10 - 1, 10**10 - 1, [short] + [big] * 14)
    data = good + bad_crc + long_ok + b"\n" + too_long + b"\n" + good
    calls = []
    real = protocol._FAST_READING_RE

    class Spy:
        def match(self, *a):
            m = real.match(*a)
            calls.append(m is not None)
            return m

    monkeypatch.setattr(protocol, "_FAST_READING_RE", Spy())
    frames, counters, text = _run(data, [], True, monkeypatch)
    assert len(long_ok) + 1 == protocol.MAX_FRAME
    assert [f.fields["t_raw"] for f in frames] == [-7, short, -7]
    assert counters["crc_errors"] == 1 and counters["oversize"] == 1 and counters["frames"] == 3
    assert calls.count(True) >= 3  # the good lines went the fast way
    assert (frames, counters, text) == _run(data, [], False, monkeypatch)
