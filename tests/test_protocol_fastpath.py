"""FrameParser's fast path for reading lines must be invisible: same frames, same counters.

The reference is the same parser with the fast path switched off (every line then goes
through parse_line, whose rules tests/test_protocol.py checks against docs/protocol.md).
Inputs are hand-built reading lines (not encode_frame) with random byte edits, with and
without a recomputed CRC, cut into random read sizes. `feed_compact` (the monitor's
entry) must give the same frames once its compact readings are expanded by
`compact_frame`, the same counters and text.
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


def _expand(items: list) -> list:
    for x in items:  # compact readings are plain tuples; anything else a Frame
        assert type(x) is tuple or isinstance(x, protocol.Frame)
    return [protocol.compact_frame(x) if type(x) is tuple else x for x in items]


def _run(data: bytes, cuts: list[int], fast: bool | str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(protocol, "_FAST_READING_RE", NEVER)
        p = FrameParser()
        frames = []
        prev = 0
        for c in sorted(set(cuts)) + [len(data)]:
            if fast == "compact":
                frames += _expand(p.feed_compact(data[prev:c]))
            else:
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
    reference = _run(data, cuts, False, monkeypatch)
    assert _run(data, cuts, True, monkeypatch) == reference
    assert _run(data, cuts, "compact", monkeypatch) == reference


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


def _mixed_stream() -> bytes:
    good = [_line("n01", 7, s, list(range(s, s + 15))) for s in range(3)]
    tagged = _line("n01", 7, 3, list(range(15)))[:-10] + b" !" + b"ab" * 16 + b" *00000000"
    return b"".join([
        good[0], b"\r\n", b"boot text @ not a frame\n", good[1], b"\n",
        _reseal(tagged) + b"\n",  # a tag: compact too, raw and tag kept
        _line("n01", 7, 4, list(range(16))) + b"\n",  # an extra field: a Frame
        _line("n01", 7, 5, list(range(14))) + b"\n",  # one field short: malformed
        good[2].replace(b" R 2", b" R 3") + b"\n",  # CRC mismatch
        b"@CNP1 n01 7 6 H board=x fw_version=1" + b"\n",  # no CRC: malformed
        _reseal(b"@CNP1 n01 7 7 H board=x fw_version=1 *0") + b"\n",
        good[2] + b"\n", b"tail without newline",
    ])


def test_compact_equals_feed_at_every_split(monkeypatch):
    data = _mixed_stream()
    reference = _run(data, [], False, monkeypatch)
    assert len(reference[0]) == 6 and reference[1]["crc_errors"] == 1 and reference[0][2].tag == "ab" * 16
    for cut in range(len(data) + 1):
        assert _run(data, [cut], "compact", monkeypatch) == reference, cut
    for cut in range(0, len(data) + 1, 7):  # three reads: every pair of cuts 7 bytes apart
        assert _run(data, [cut, cut + 7], "compact", monkeypatch) == reference, cut


def test_compact_readings_are_tuples_only_for_exact_v1_readings():
    items = FrameParser().feed_compact(_mixed_stream())
    kinds = [type(x).__name__ for x in items]
    assert kinds == ["tuple", "tuple", "tuple", "Frame", "Frame", "tuple"]
    node, boot, seq, values, raw, tag = items[2]
    assert (node, boot, seq, tag) == ("n01", 7, 3, "ab" * 16) and values == [str(v) for v in range(15)]
    assert raw.startswith(b"@CNP1 n01 7 3 R 0,1,") and raw.endswith(b" *%08x" % zlib.crc32(raw[:-10]))
