"""Canopy wire protocol, host side: frame parser, command encoder, sequence tracking.

The spec is docs/protocol.md; the node side is firmware/canopy/protocol.py. Frames
are single ASCII lines on the node's USB serial, mixed with REPL text and tracebacks::

    @CNP1 <node> <boot> <seq> <type> <payload...> *<crc32 8 hex>

`FrameParser.feed` never raises: bytes that are not a good frame become free text
(`text_lines`) or are counted (`crc_errors`, `malformed`, `oversize`, `unsupported`,
`garbage_bytes`), and parsing resumes at the next marker.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CanopyError

MARKER = b"@CNP"
VERSION = 1
MAX_FRAME = 250  # bytes per frame line including the LF (an extra CR is tolerated)
MAX_TEXT_LINE = 1024  # longer free-text runs are split, so memory stays bounded
MAX_NODE_ID = 16
MAX_STR = 64
TAG_BYTES = 16  # truncated HMAC-SHA256 tag (docs/security.md); verified by canopy_host.security
SEQ_WRAP = 0x3FFFFFFF  # the node's sequence number wraps to 0 after this value

KINDS = {
    b"H": "hello",
    b"R": "reading",
    b"E": "event",
    b"A": "reply",
    b"X": "error",
    b"C": "command",
}
KIND_LETTERS = {v: k.decode() for k, v in KINDS.items()}

READING_KEYS = (
    "t_raw", "p_raw", "h_raw", "t", "p", "h",
    "shade", "mist", "fan", "faults", "failsafe", "tick",
    "i_shade", "i_mist", "i_fan",
)
COMMANDS = ("status", "set", "identify", "calibrate", "reboot")
# Keys whose values are text even when they look like a number (e.g. a hex hash "1234").
STRING_KEYS = frozenset({"board", "fw_version", "fw_hash", "cfg_digest", "code", "err", "msg", "cmd"})

_NODE_RE = re.compile(rb"[A-Za-z0-9_-]{1,16}\Z")
_INT_RE = re.compile(rb"-?[0-9]{1,11}\Z")
_KEY_RE = re.compile(rb"[a-z0-9_]{1,16}\Z")
_HEX8_RE = re.compile(rb"[0-9a-fA-F]{8}\Z")
_TAG_RE = re.compile(rb"![0-9a-fA-F]{32}\Z")
_CMD_RE = re.compile(r"[a-z_]{1,16}\Z")
_PRINTABLE = bytes(range(0x20, 0x7F))
_HEAD_RE = re.compile(rb"@CNP1 ([A-Za-z0-9_-]{1,16}|\*) ([0-9]{1,10}) ([0-9]{1,10}) ([HREAXC])(?: (.*))?\Z", re.S)
_READING_RE = re.compile(rb"-?[0-9]{1,11}(?:,-?[0-9]{1,11}){%d,}\Z" % (len(READING_KEYS) - 1))
# The fast path of FrameParser: a whole well-formed reading line (the bulk of the
# traffic) in one match. Everything it accepts parse_line accepts too (same character
# classes, no '@' after the marker, printable only); anything else, including a CRC
# mismatch, takes the general path, so the counters and errors stay exactly the same.
_FAST_READING_RE = re.compile(
    rb"((@CNP1 ([A-Za-z0-9_-]{1,16}) ([0-9]{1,10}) ([0-9]{1,10}) R (-?[0-9]{1,11}(?:,-?[0-9]{1,11}){%d,})"
    rb"(?: !([0-9a-fA-F]{32}))?) \*([0-9a-fA-F]{8}))\r?\n" % (len(READING_KEYS) - 1)
)


@dataclass
class Frame:
    kind: str  # 'hello' | 'reading' | 'event' | 'reply' | 'error' | 'command'
    node: str
    boot: int  # for commands: the boot id targeted (0 = any)
    seq: int  # for commands: the host's command counter
    fields: dict[str, object]
    raw: bytes = field(repr=False)  # the frame line without its line ending
    tag: str | None = None  # the '!' token's 32 hex digits (docs/security.md), if any


class _Malformed(Exception):
    pass


def _value(key: str, v: bytes, string_keys: frozenset[str]) -> object:
    if key not in string_keys and _INT_RE.match(v):
        return int(v)
    return v.decode("ascii")


def _kv_fields(tokens: list[bytes], string_keys: frozenset[str] = STRING_KEYS) -> dict[str, object]:
    out: dict[str, object] = {}
    for t in tokens:
        k, eq, v = t.partition(b"=")
        if not eq or not _KEY_RE.match(k):
            raise _Malformed
        key = k.decode("ascii")
        if key in out:
            raise _Malformed
        out[key] = _value(key, v, string_keys)
    return out


def parse_line(line: bytes) -> Frame:
    """Parse one frame line (no line ending). Raises ValueError with the reason.

    The reason (first word of the message) is one of: version, crc, malformed, oversize.
    """
    if len(line) + 1 > MAX_FRAME:
        raise ValueError("oversize: frame line longer than 250 bytes")
    if not line.startswith(MARKER):
        raise ValueError("malformed: no @CNP marker")
    sp = line.find(b" ")
    ver = line[4:sp] if sp > 0 else b""
    if not ver.isdigit():
        raise ValueError("malformed: no protocol version after the marker")
    if int(ver) != VERSION:
        raise ValueError(f"version: protocol version {int(ver)} is not supported")
    body, star, crc = line.rpartition(b" *")
    if not star or not _HEX8_RE.match(crc):
        raise ValueError("malformed: no trailing ' *crc32'")
    if zlib.crc32(body) != int(crc, 16):
        raise ValueError("crc: CRC32 mismatch")
    if body.translate(None, _PRINTABLE):
        raise ValueError("malformed: non-printable byte in frame")
    m = _HEAD_RE.match(body)
    if m is None:
        raise ValueError("malformed: bad header (node, boot, seq, type)")
    node, boot, seq, letter, rest = m.groups()
    kind = KINDS[letter]
    if node == b"*" and kind != "command":
        raise ValueError("malformed: bad node id")
    payload = rest.split(b" ") if rest is not None else []
    if b"" in payload:
        raise ValueError("malformed: empty token")
    frame_tag = None
    if payload and payload[-1].startswith(b"!") and kind != "command":
        if not _TAG_RE.match(payload[-1]):
            raise ValueError(f"malformed: bad {kind} tag")
        frame_tag = payload.pop()[1:].decode("ascii")
    try:
        if kind == "reading":
            if len(payload) != 1 or not _READING_RE.match(payload[0]):
                raise _Malformed
            # extra trailing values come from a newer firmware; v1 readers ignore them
            fields: dict[str, object] = dict(zip(READING_KEYS, map(int, payload[0].split(b","))))
        elif kind == "command":
            if not payload:
                raise _Malformed
            cmd = payload[0].decode("ascii")
            if not _CMD_RE.match(cmd):
                raise _Malformed
            arg_toks = payload[1:]
            tag = None
            if arg_toks and arg_toks[-1].startswith(b"!"):
                if not _TAG_RE.match(arg_toks[-1]):
                    raise _Malformed
                tag = arg_toks.pop()[1:].decode("ascii")
            # command arguments are typed by their text alone, as the node parses them
            fields = {"cmd": cmd, "args": _kv_fields(arg_toks, frozenset())}
            if tag is not None:
                fields["tag"] = frame_tag = tag
        else:
            fields = _kv_fields(payload)
    except _Malformed:
        raise ValueError(f"malformed: bad {kind} payload") from None
    return Frame(kind, node.decode("ascii"), int(boot), int(seq), fields, bytes(line), frame_tag)


# A "compact reading": what FrameParser.feed_compact returns instead of a Frame for a
# well-formed reading with exactly the v1 fields, (node, boot, seq, values, raw, tag),
# `values` being the 15 decimal strings in READING_KEYS order, unconverted. Converting
# 15 ints costs more than the SQLite insert of the row; the store's INTEGER columns
# convert decimal text themselves (same stored values and types), so the monitor only
# converts what it looks at. compact_frame() gives the Frame that feed() would return.
_N_READING = len(READING_KEYS)


def compact_frame(c: tuple) -> Frame:
    node, boot, seq, values, raw, tag = c
    return Frame("reading", node, boot, seq, dict(zip(READING_KEYS, map(int, values))), raw, tag)


# The monitor's bulk path (Collector.feed): the run of readings that continues the node
# a port is already tracking, straight to store rows. A line belongs to the run if the
# fast path above would give it as a compact reading (15 values, no tag, good CRC, under
# MAX_FRAME) AND it is the expected node, boot and next seq; the first line that is not
# (or is incomplete) ends the run and the general parser takes it from there.
_RUN_VALUES = rb"@CNP1 ([A-Za-z0-9_-]{1,16}) ([0-9]{1,10}) ([0-9]{1,10}) R (-?[0-9]{1,11}(?:,-?[0-9]{1,11}){%d})" % (
    _N_READING - 1)
_RUN_RE = re.compile(_RUN_VALUES + rb"() \*([0-9a-fA-F]{8})\r?\n")
_TAGGED_RUN_RE = re.compile(_RUN_VALUES + rb" !([0-9a-fA-F]{32}) \*([0-9a-fA-F]{8})\r?\n")


def _run_line(buf: bytes | bytearray, pos: int, node: str, boot: int, seq: int,
              tagged: bool) -> tuple[re.Match[bytes], tuple[int, ...]] | None:
    """The line at buf[pos:] if it continues node/boot at seq (see scan_readings_py):
    its match and its values, else None."""
    m = (_TAGGED_RUN_RE if tagged else _RUN_RE).match(buf, pos)
    if m is None:
        return None
    node_b, boot_b, seq_b, values, _, crc = m.groups()
    if (node_b != node.encode("ascii", "replace") or int(boot_b) != boot or int(seq_b) != seq
            or m.end(6) - pos >= MAX_FRAME or zlib.crc32(buf[pos:m.start(6) - 2]) != int(crc, 16)):
        return None
    return m, tuple(map(int, values.split(b",")))


def _take(found: tuple[re.Match[bytes], tuple[int, ...]], buf: bytes | bytearray, pos: int, row: tuple,
          out: tuple[list, list, list, list], tagged: bool) -> int:
    m, values = found
    out[0].append(row + values)
    if tagged:
        out[1].append(m.end())
        out[2].append(bytes(buf[pos:m.start(5) - 2]))
        out[3].append(bytes.fromhex(m.group(5).decode("ascii")))
    return m.end()


def scan_readings_py(buf: bytes | bytearray, pos: int, node: str, boot: int, seq: int, head: tuple,
                     tagged: bool = False) -> tuple:
    """The run at buf[pos:]: (rows, end), each line as head + (node, boot, seq, *values).

    Tagged (every line must carry a tag, docs/security.md): (rows, ends, bodies, tags)
    with each line's end offset, signed part and 16 tag bytes, for the caller to verify.
    The reference for the compiled `_fastscan.scan_readings` (tests/test_fastscan.py)
    and what runs when it could not be built."""
    out: tuple[list, list, list, list] = ([], [], [], [])
    while (found := _run_line(buf, pos, node, boot, seq, tagged)) is not None:
        pos = _take(found, buf, pos, head + (node, boot, seq), out, tagged)
        seq += 1
    return out if tagged else (out[0], pos)


_NODE_TOKEN_RE = re.compile(rb"@CNP1 ([^ ]{1,16}) ")


def scan_gateway_py(buf: bytes | bytearray, pos: int, expect: dict[str, list[int]], head: tuple,
                    tagged: bool = False) -> tuple:
    """scan_readings_py for a port that carries several nodes (a mesh gateway): a line
    belongs to the run if its node is a key of `expect` (node -> [boot, next seq]) and
    it continues that node; each taken line advances its node's next seq in place.
    The reference for the compiled `_fastscan.scan_gateway`."""
    out: tuple[list, list, list, list] = ([], [], [], [])
    while (t := _NODE_TOKEN_RE.match(buf, pos)) is not None:
        node = t.group(1).decode("latin-1")
        want = expect.get(node)
        if want is None:
            break
        found = _run_line(buf, pos, node, want[0], want[1], tagged)
        if found is None:
            break
        pos = _take(found, buf, pos, head + (node, want[0], want[1]), out, tagged)
        want[1] += 1
    return out if tagged else (out[0], pos)


try:
    from ._fastscan import scan_gateway as _scan_gateway_c
    from ._fastscan import scan_readings as _scan_readings_c
except ImportError:  # built without a C compiler: same results, slower (docs/performance.md)
    _scan_readings_c = _scan_gateway_c = None
scan_readings = _scan_readings_c or scan_readings_py
scan_gateway = _scan_gateway_c or scan_gateway_py
FAST_SCAN = "compiled" if _scan_readings_c is not None else "python"


class FrameParser:
    """Incremental parser for a node's serial stream. `feed` never raises.

    Counters: `frames`, `crc_errors`, `malformed`, `oversize`, `unsupported`
    (another protocol version), `garbage_bytes` (bytes outside good frames: free
    text, noise and rejected frames). Free text lines accumulate in `text_lines`
    (decoded, line ending stripped); the caller may drain that list at will.
    """

    def __init__(self) -> None:
        self.frames = 0
        self.crc_errors = 0
        self.malformed = 0
        self.oversize = 0
        self.unsupported = 0
        self.garbage_bytes = 0
        self.text_lines: list[str] = []
        self._buf = bytearray()
        self._text = bytearray()  # pending partial free-text line
        self._skip = False  # dropping the rest of an oversize frame
        self._names: dict[bytes, str] = {}  # node id bytes -> str, decoded once per node

    def feed(self, data: bytes) -> list[Frame]:
        return self._guarded(data, out=[], compact=False)

    def feed_compact(self, data: bytes) -> list[Frame | tuple]:
        """As feed(), but common readings come as compact tuples (see compact_frame)."""
        return self._guarded(data, out=[], compact=True)

    def feed_run(self, data: bytes, node: str, boot: int, seq: int, head: tuple,
                 verify: Callable[[str, int, int, list[bytes], list[bytes]], int] | None = None,
                 ) -> tuple[list[tuple], list[Frame | tuple] | None]:
        """As feed_compact(), except that the readings at the front of the buffer that
        continue `node`/`boot` from `seq` on come first, as rows (see scan_readings):
        (rows, the rest as feed_compact gives it). The rest is None when what is left
        is at most the start of the next frame: no frame, text or counter moved.

        `verify` (a keyed mesh, security.HostAuth.verify_run): the run's frames must be
        tagged; verify(node, boot, seq, bodies, tags) says how many of them, from the
        first, are authentic and fresh, and the run ends before the first that is not
        (the general path then gives it as a frame, for the caller to reject)."""
        return self._scan_front(data, lambda tagged: scan_readings(self._buf, 0, node, boot, seq, head, tagged),
                                verify, len(head))

    def feed_gateway(self, data: bytes, expect: dict[str, list[int]], head: tuple,
                     verify: Callable[[str, int, int, list[bytes], list[bytes]], int] | None = None,
                     ) -> tuple[list[tuple], list[Frame | tuple] | None]:
        """feed_run() for a port that carries several nodes (a mesh gateway): the run
        takes every node of `expect` (node -> [boot, next seq], advanced in place for
        the frames taken; see scan_gateway). With `verify`, each stretch of one node's
        frames is verified in order and the run ends before the first frame that fails."""
        return self._scan_front(data, lambda tagged: scan_gateway(self._buf, 0, expect, head, tagged),
                                verify, len(head), expect)

    def _scan_front(self, data: bytes, scan: Callable[[bool], tuple],
                    verify: Callable[[str, int, int, list[bytes], list[bytes]], int] | None, h: int,
                    expect: dict[str, list[int]] | None = None) -> tuple[list[tuple], list[Frame | tuple] | None]:
        """Buffer `data`, take the run at the front with `scan` (rows carry node, boot and
        seq at h, h+1, h+2), verified stretch by stretch of one node when `verify` is
        given; frames not taken are expected again (`expect`)."""
        buf = self._buf
        buf += data
        rows: list[tuple] = []
        end = 0
        if not self._skip and buf.startswith(MARKER):
            if verify is None:
                rows, end = scan(False)
            else:
                rows, ends, bodies, tags = scan(True)
                good = i = 0
                while i < len(rows):
                    node, boot, seq = rows[i][h:h + 3]
                    j = i + 1
                    while j < len(rows) and rows[j][h] == node:
                        j += 1
                    k = verify(node, boot, seq, bodies[i:j], tags[i:j])
                    good += k
                    if k < j - i:
                        break
                    i = j
                if expect is not None:
                    for row in reversed(rows[good:]):
                        expect[row[h]][1] = row[h + 2]
                del rows[good:]
                end = ends[good - 1] if good else 0
        return rows, self._after_run(len(rows), end)

    def _after_run(self, taken: int, end: int) -> list[Frame | tuple] | None:
        buf = self._buf
        if end:
            del buf[:end]
            self.frames += taken
        if not buf or (buf.startswith(MARKER) and len(buf) <= MAX_FRAME + 1
                       and buf.find(b"\n") < 0 and buf.find(b"@", 1) < 0):
            return None  # nothing, or the start of the next frame: _feed would wait too
        return self._guarded(b"", out=[], compact=True)

    def _guarded(self, data: bytes, out: list, compact: bool) -> list:
        try:
            self._feed(bytes(data), out, compact)
        except Exception:  # pragma: no cover - defensive: the contract is "never raises"
            self.malformed += 1
            self.garbage_bytes += len(self._buf)
            self._buf.clear()
            self._skip = False
        return out

    def flush_text(self) -> None:
        """Move a pending partial text line (no newline yet) to `text_lines`."""
        if self._text:
            self._emit_text(self._text)
            self._text.clear()

    def _emit_text(self, raw: bytes | bytearray) -> None:
        line = bytes(raw).rstrip(b"\r")
        if line:
            self.text_lines.append(line.decode("utf-8", "replace"))

    def _text_bytes(self, chunk: bytes | bytearray, ends_line: bool) -> None:
        self.garbage_bytes += len(chunk) + (1 if ends_line else 0)
        self._text += chunk
        if ends_line:
            self._emit_text(self._text)
            self._text.clear()
        elif len(self._text) > MAX_TEXT_LINE:
            self._emit_text(self._text)
            self._text.clear()

    def _feed(self, data: bytes, out: list, compact: bool = False) -> None:
        buf = self._buf
        buf += data
        fast = _FAST_READING_RE.match
        crc32 = zlib.crc32
        names = self._names
        pos = 0
        end = len(buf)
        while pos < end:
            if self._skip:
                # Drop the tail of an oversize frame up to its newline or the next '@'.
                nl = buf.find(b"\n", pos)
                at = buf.find(b"@", pos)
                stop = min(x for x in (nl, at, end) if x >= 0)
                self.garbage_bytes += stop - pos + (1 if stop == nl else 0)
                pos = stop + 1 if stop == nl else stop
                if stop != end:
                    self._skip = False
                continue
            if buf.startswith(MARKER, pos):
                m = fast(buf, pos)
                if m is not None:
                    line, body, node, boot, seq, values, tag, crc = m.groups()
                    if len(line) < MAX_FRAME and crc32(body) == int(crc, 16):
                        name = names.get(node)
                        if name is None:
                            name = names[node] = node.decode("ascii")
                        tag_s = tag.decode("ascii") if tag is not None else None
                        if compact and len(vals := values.decode("ascii").split(",")) == _N_READING:
                            out.append((name, int(boot), int(seq), vals, line, tag_s))
                        else:
                            out.append(Frame("reading", name, int(boot), int(seq),
                                             dict(zip(READING_KEYS, map(int, values.split(b",")))), line, tag_s))
                        self.frames += 1
                        pos = m.end()
                        continue
                nl = buf.find(b"\n", pos)
                at = buf.find(b"@", pos + 1)
                if at >= 0 and (nl < 0 or at < nl):
                    # a new marker before the newline: this frame was cut short
                    self._reject(buf[pos:at], truncated=True)
                    pos = at
                    continue
                if nl < 0:
                    if end - pos > MAX_FRAME + 1:
                        self.oversize += 1
                        self.garbage_bytes += end - pos
                        self._skip = True
                        pos = end
                    break  # wait for the rest of the frame
                line = bytes(buf[pos:nl])
                if line.endswith(b"\r"):
                    line = line[:-1]
                pos = nl + 1
                try:
                    frame = parse_line(line)
                except ValueError as exc:
                    self._count(str(exc), len(line) + 1)
                else:
                    self.frames += 1
                    out.append(frame)
                continue
            # free text up to the newline or the next '@' that may start a marker
            nl = buf.find(b"\n", pos)
            at = buf.find(b"@", pos)
            if at >= 0 and (nl < 0 or at < nl):
                if end - at < len(MARKER) and MARKER.startswith(bytes(buf[at:end])):
                    # a marker may be split across reads: keep its beginning
                    self._text_bytes(buf[pos:at], False)
                    pos = at
                    break
                if buf.startswith(MARKER, at):
                    if at > pos:
                        self._text_bytes(buf[pos:at], False)
                    self.flush_text()  # the frame ends the text line before it
                    pos = at
                    continue
                self._text_bytes(buf[pos:at + 1], False)
                pos = at + 1
                continue
            if nl >= 0:
                self._text_bytes(buf[pos:nl], True)
                pos = nl + 1
            else:
                self._text_bytes(buf[pos:end], False)
                pos = end
        del buf[:pos]

    def _reject(self, line: bytes | bytearray, truncated: bool) -> None:
        self.garbage_bytes += len(line)
        if len(line) > MAX_FRAME:
            self.oversize += 1
        else:
            self.malformed += 1

    def _count(self, reason: str, nbytes: int) -> None:
        self.garbage_bytes += nbytes
        kind = reason.split(":", 1)[0]
        if kind == "crc":
            self.crc_errors += 1
        elif kind == "oversize":
            self.oversize += 1
        elif kind == "version":
            self.unsupported += 1
        else:
            self.malformed += 1


# ---------------------------------------------------------------- encoding

class CommandError(CanopyError, ValueError):
    """A command that cannot be encoded (bad name, argument or size)."""


def _enc_value(key: str, v: object) -> bytes:
    if isinstance(v, bool):
        return b"1" if v else b"0"
    if isinstance(v, int):
        if abs(v) >= 10**11:
            raise CommandError(f"argument {key}={v} is out of range (at most 11 digits)")
        return str(v).encode()
    if isinstance(v, str):
        b = v.encode("ascii", "replace")
        if len(b) > MAX_STR or b.translate(None, _PRINTABLE) or b" " in b or b"@" in b:
            raise CommandError(
                f"argument {key}={v!r}: text values must be at most {MAX_STR} printable "
                "ASCII characters without spaces or '@'"
            )
        return b
    raise CommandError(f"argument {key}: only int and str values can be sent, not {type(v).__name__}")


def _enc_pairs(pairs: dict[str, object]) -> list[bytes]:
    toks = []
    for k, v in pairs.items():
        if not isinstance(k, str) or not _KEY_RE.match(k.encode("ascii", "replace")):
            raise CommandError(f"argument name {k!r} must be 1..16 chars of a-z 0-9 _")
        toks.append(k.encode() + b"=" + _enc_value(k, v))
    return toks


def _seal(toks: list[bytes]) -> bytes:
    body = b" ".join(toks)
    line = body + b" *%08x\n" % zlib.crc32(body)
    if len(line) > MAX_FRAME:
        raise CommandError(f"frame would be {len(line)} bytes; the limit is {MAX_FRAME}")
    return line


def encode_command(
    node: str, counter: int, cmd: str, args: dict[str, object] | None = None,
    *, boot: int = 0, tag: bytes | None = None,
) -> bytes:
    """One host -> node command line. `node` may be '*' (every node on the line).

    `boot` targets one boot of the node (0 = whatever boot is running). `tag` is the
    reserved HMAC field (16 bytes); v1 nodes accept and ignore it.
    """
    if cmd not in COMMANDS:
        raise CommandError(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
    if not isinstance(node, str) or not (node == "*" or _NODE_RE.match(node.encode("ascii", "replace"))):
        raise CommandError(f"node id {node!r} must be '*' or 1..16 chars of A-Z a-z 0-9 _ -")
    for name, v in (("counter", counter), ("boot", boot)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 10**10:
            raise CommandError(f"{name} must be an integer 0..9999999999, got {v!r}")
    toks = [b"@CNP%d" % VERSION, node.encode(), b"%d" % boot, b"%d" % counter, b"C", cmd.encode()]
    toks += _enc_pairs(dict(args or {}))
    if tag is not None:
        if len(tag) != TAG_BYTES:
            raise CommandError(f"tag must be {TAG_BYTES} bytes")
        toks.append(b"!" + bytes(tag).hex().encode())
    return _seal(toks)


def encode_frame(kind: str, node: str, boot: int, seq: int, fields: dict[str, object]) -> bytes:
    """A node -> host frame line, exactly as the firmware would send it (tests, tools, fakes)."""
    letter = KIND_LETTERS.get(kind)
    if letter is None or kind == "command":
        raise CommandError(f"unknown frame kind {kind!r}")
    if not _NODE_RE.match(node.encode("ascii", "replace")):
        raise CommandError(f"node id {node!r} must be 1..16 chars of A-Z a-z 0-9 _ -")
    toks = [b"@CNP%d" % VERSION, node.encode(), b"%d" % boot, b"%d" % seq, letter.encode()]
    if kind == "reading":
        missing = [k for k in READING_KEYS if k not in fields]
        if missing:
            raise CommandError(f"reading lacks {', '.join(missing)}")
        toks.append(b",".join(b"%d" % int(fields[k]) for k in READING_KEYS))  # type: ignore[call-overload]
    else:
        toks += _enc_pairs(fields)
    return _seal(toks)


# ---------------------------------------------------------------- sequence tracking

@dataclass
class SeqStatus:
    """What one frame means for its node's sequence: exactly one of these is set."""

    new_boot: bool = False  # first frame seen from this node, or a new boot id
    duplicate: bool = False  # a seq already seen (or older) within this boot
    gap: tuple[int, int] | None = None  # missing seq numbers first..last (inclusive)


class SeqTracker:
    """Per node: detects reboots (new boot id), gaps and duplicates from (boot, seq)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def observe(self, frame: Frame) -> SeqStatus:
        prev = self._last.get(frame.node)
        if frame.kind == "command":
            return SeqStatus()
        if prev is None or prev[0] != frame.boot:
            self._last[frame.node] = (frame.boot, frame.seq)
            return SeqStatus(new_boot=True)
        last = prev[1]
        expected = 0 if last >= SEQ_WRAP else last + 1
        if frame.seq == expected:
            self._last[frame.node] = (frame.boot, frame.seq)
            return SeqStatus()
        ahead = (frame.seq - expected) % (SEQ_WRAP + 1)
        if ahead < (SEQ_WRAP + 1) // 2:
            self._last[frame.node] = (frame.boot, frame.seq)
            first, stop = expected, (frame.seq - 1) % (SEQ_WRAP + 1)
            return SeqStatus(gap=(first, stop))
        return SeqStatus(duplicate=True)
