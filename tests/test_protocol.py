"""Host side of the wire protocol: parser robustness (hypothesis), encoders, spec examples.

The CRC reference is zlib.crc32; the frame layout reference is docs/protocol.md.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canopy_host.errors import CanopyError
from canopy_host.protocol import (
    MAX_FRAME,
    READING_KEYS,
    Frame,
    FrameParser,
    SeqStatus,
    SeqTracker,
    encode_command,
    encode_frame,
    parse_line,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

node_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=16)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
u30 = st.integers(min_value=0, max_value=2**30 - 1)
safe_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="@*"), max_size=40)
keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=16)


def _frame(node: str, boot: int, seq: int, letter: str, payload: str) -> bytes:
    """A frame built by hand from the spec (independent of the module's encoders)."""
    body = f"@CNP1 {node} {boot} {seq} {letter} {payload}".encode()
    return body + b" *%08x\n" % zlib.crc32(body)


@st.composite
def readings(draw):
    return {k: draw(int32) for k in READING_KEYS}


@st.composite
def valid_frames(draw) -> tuple[bytes, dict]:
    node, boot, seq = draw(node_ids), draw(u30), draw(u30)
    kind = draw(st.sampled_from(["reading", "event", "reply", "error", "hello"]))
    if kind == "reading":
        fields = draw(readings())
    elif kind == "event":
        fields = {"code": draw(st.sampled_from(["fault", "failsafe", "recovered", "boot"])), "arg": draw(int32)}
    elif kind == "reply":
        fields = {"re": draw(u30), "cmd": "status", "ok": 1, "tick": draw(u30)}
    elif kind == "error":
        fields = {"re": draw(u30), "err": draw(st.sampled_from(["crc", "bad_args", "boot"]))}
    else:
        fields = {"board": "esp32-devkitc", "fw_version": "0.1.0", "fw_hash": draw(st.text("0123456789abcdef", min_size=1, max_size=16)),
                  "cfg_version": draw(u30), "cfg_digest": draw(st.text("0123456789abcdef", min_size=64, max_size=64))}
    return encode_frame(kind, node, boot, seq, fields), {"kind": kind, "node": node, "boot": boot, "seq": seq, "fields": fields}


def _feed_split(parser: FrameParser, data: bytes, cuts: list[int]) -> list[Frame]:
    out: list[Frame] = []
    last = 0
    for c in sorted(set(c % (len(data) + 1) for c in cuts)):
        out += parser.feed(data[last:c])
        last = c
    out += parser.feed(data[last:])
    return out


# ---------------------------------------------------------------- parser robustness

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    p = FrameParser()
    _feed_split(p, data, cuts)
    for name in ("crc_errors", "malformed", "oversize", "garbage_bytes", "unsupported"):
        assert getattr(p, name) >= 0
    # nothing accepted from noise unless the noise happened to hold a whole valid frame
    assert all(isinstance(t, str) for t in p.text_lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    garbage=st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from([b"@", b"@C", b"@CN", b"@CNP", b"@CNP1 ", b"@CNP1 x 1 2 R 1,2", b"@CNP9 a 1 1 E *00000000",
                             b"\r\n", b"Traceback (most recent call last):\n", b"*", b"@CNP1" + b"x" * 400]),
        ),
        max_size=6,
    ),
    frames=st.lists(valid_frames(), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=10),
)
def test_valid_frames_after_garbage_are_received(garbage, frames, cuts) -> None:
    stream = b""
    for i, (raw, _exp) in enumerate(frames):
        stream += b"".join(garbage[i:]) + raw
    p = FrameParser()
    got = _feed_split(p, stream, cuts)
    assert [(f.kind, f.node, f.boot, f.seq, f.fields) for f in got] == [
        (e["kind"], e["node"], e["boot"], e["seq"], e["fields"]) for _raw, e in frames
    ]


@settings(max_examples=200, deadline=None)
@given(valid_frames(), st.data())
def test_any_single_byte_corruption_is_rejected(frame, data) -> None:
    raw, _ = frame
    i = data.draw(st.integers(min_value=0, max_value=len(raw) - 2))  # keep the LF
    star = raw.rindex(b"*")
    # The spec accepts the CRC's hex digits in either case, so a case-only change
    # there is the same frame, not damage.
    same = {raw[i]} | ({ord(chr(raw[i]).swapcase())} if i > star else set())
    new = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b not in same))
    bad = raw[:i] + bytes([new]) + raw[i + 1:]
    p = FrameParser()
    got = p.feed(bad)
    assert got == []
    assert p.frames == 0
    assert p.crc_errors + p.malformed + p.oversize + p.unsupported >= 1 or b"@CNP" not in bad


def test_counters_for_each_kind_of_damage() -> None:
    good = _frame("n01", 5, 1, "E", "code=boot arg=5")
    bad_crc = good[:-3] + (b"00" if good[-3:-1] != b"00" else b"11") + b"\n"
    no_crc = b"@CNP1 n01 5 2 E code=boot arg=5\n"
    v9 = b"@CNP9 n01 5 3 E code=boot *00000000\n"
    long = _frame("n01", 5, 4, "E", "msg=" + "x" * 300)
    p = FrameParser()
    got = p.feed(b"hello\r\n" + bad_crc + no_crc + v9 + long + good)
    assert [f.seq for f in got] == [1]
    assert (p.crc_errors, p.malformed, p.unsupported, p.oversize) == (1, 1, 1, 1)
    assert p.text_lines == ["hello"]
    assert p.garbage_bytes == len(b"hello\r\n" + bad_crc + no_crc + v9 + long)


def test_oversize_without_newline_is_dropped_and_bounded() -> None:
    p = FrameParser()
    p.feed(b"@CNP1 " + b"x" * 100_000)
    assert p.oversize == 1
    assert len(p._buf) <= MAX_FRAME + 2
    got = p.feed(b"yyy\n" + _frame("n01", 1, 9, "E", "code=boot arg=1"))
    assert [f.seq for f in got] == [9]


def test_text_lines_and_frame_mid_line() -> None:
    p = FrameParser()
    frame = _frame("n01", 1, 0, "E", "code=fault arg=4")
    got = p.feed(b">>> print(1)\r\n1\r\n>>> " + frame + b"MemoryError: x\n")
    assert [f.fields for f in got] == [{"code": "fault", "arg": 4}]
    assert p.text_lines == [">>> print(1)", "1", ">>> ", "MemoryError: x"]


def test_crlf_from_the_usb_console_is_accepted() -> None:
    frame = _frame("n01", 1, 0, "E", "code=boot arg=1").replace(b"\n", b"\r\n")
    assert len(FrameParser().feed(frame)) == 1


def test_string_keys_stay_strings_and_extra_reading_values_are_ignored() -> None:
    hello = _frame("n01", 1, 0, "H", "board=x fw_version=1 fw_hash=1234 cfg_version=3 cfg_digest=00ff")
    values = ",".join(str(i) for i in range(len(READING_KEYS) + 2))
    reading = _frame("n01", 1, 1, "R", values)
    h, r = FrameParser().feed(hello + reading)
    assert h.fields == {"board": "x", "fw_version": "1", "fw_hash": "1234", "cfg_version": 3, "cfg_digest": "00ff"}
    assert list(r.fields) == list(READING_KEYS)
    assert r.fields["i_fan"] == len(READING_KEYS) - 1


def test_short_reading_is_malformed() -> None:
    p = FrameParser()
    assert p.feed(_frame("n01", 1, 1, "R", "1,2,3")) == []
    assert p.malformed == 1


# ---------------------------------------------------------------- encoders

@settings(max_examples=200, deadline=None)
@given(st.one_of(node_ids, st.just("*")), u30, st.sampled_from(["status", "set", "identify", "calibrate", "reboot"]),
       st.dictionaries(keys, st.one_of(int32, safe_text), max_size=5))
def test_command_round_trip_through_host_parser(node, counter, cmd, args) -> None:
    try:
        line = encode_command(node, counter, cmd, args)
    except CanopyError as exc:
        assert "limit is 250" in str(exc)  # with valid names and values only the size can fail
        return
    assert len(line) <= MAX_FRAME and line.endswith(b"\n") and line.count(b"\n") == 1
    (f,) = FrameParser().feed(line)
    assert (f.kind, f.node, f.seq, f.fields["cmd"]) == ("command", node, counter, cmd)
    expect = {k: (int(v) if isinstance(v, str) and re.fullmatch(r"-?[0-9]{1,11}", v) else v) for k, v in args.items()}
    assert f.fields["args"] == expect


def test_command_crc_matches_zlib() -> None:
    line = encode_command("n01", 42, "identify", {"seconds": 5})
    body, _, crc = line.rstrip(b"\n").rpartition(b" *")
    assert body == b"@CNP1 n01 0 42 C identify seconds=5"
    assert int(crc, 16) == zlib.crc32(body)


@pytest.mark.parametrize(
    "args, message",
    [
        (("n01", 1, "format", {}), "unknown command"),
        (("bad id!", 1, "status", {}), "node id"),
        (("n01", -1, "status", {}), "counter"),
        (("n01", 1, "set", {"T": 1}), "argument name"),
        (("n01", 1, "set", {"a": "two words"}), "text values"),
        (("n01", 1, "set", {"a": 1.5}), "only int and str"),
        (("n01", 1, "set", {f"k{i}": "v" * 60 for i in range(5)}), "limit is 250"),
    ],
)
def test_encode_command_rejects_bad_input_clearly(args, message) -> None:
    with pytest.raises(CanopyError, match=message):
        encode_command(*args)


def test_tag_is_reserved_and_carried() -> None:
    line = encode_command("n01", 3, "reboot", {}, tag=bytes(range(16)))
    (f,) = FrameParser().feed(line)
    assert f.fields["tag"] == bytes(range(16)).hex()


# ---------------------------------------------------------------- sequence tracking

def _ev(boot: int, seq: int, node: str = "n01") -> Frame:
    return parse_line(_frame(node, boot, seq, "E", "code=x arg=0").rstrip(b"\n"))


def test_seq_tracker_gaps_duplicates_reboots() -> None:
    t = SeqTracker()
    assert t.observe(_ev(1, 0)).new_boot
    assert t.observe(_ev(1, 1)) == SeqStatus()  # in order: nothing to report
    assert t.observe(_ev(1, 2)) == SeqStatus()
    assert t.observe(_ev(1, 6)).gap == (3, 5)
    assert t.observe(_ev(1, 6)).duplicate
    assert t.observe(_ev(1, 4)).duplicate
    assert t.observe(_ev(2, 0)).new_boot
    assert t.observe(_ev(1, 0, node="n02")).new_boot
    assert t.observe(_ev(2, 1)) == SeqStatus()
    # the node's sequence wraps after 2**30 - 1
    assert t.observe(_ev(3, 0x3FFFFFFF)).new_boot
    assert t.observe(_ev(3, 0)) == SeqStatus()
    assert t.observe(_ev(3, 3)).gap == (1, 2)


# ---------------------------------------------------------------- the spec

def _doc_examples() -> list[bytes]:
    text = DOC.read_text()
    # lines with <placeholders> are the grammar, not examples
    return [line.encode() for line in text.splitlines() if line.startswith("@CNP1 ") and "<" not in line]


def test_every_spec_example_parses() -> None:
    examples = _doc_examples()
    assert len(examples) >= 20
    kinds = set()
    for ex in examples:
        f = parse_line(ex)
        kinds.add(f.kind)
        assert len(ex) + 1 <= MAX_FRAME
    assert kinds == {"hello", "reading", "event", "reply", "error", "command"}


def test_free_text_without_newline_is_bounded() -> None:
    p = FrameParser()
    p.feed(b"z" * 5000)
    assert len(p._text) <= 1024 + 1
    assert sum(map(len, p.text_lines)) + len(p._text) == 5000
    assert p.garbage_bytes == 5000
