"""Canopy wire protocol, node side: frame encoder and bounded command parser.

The spec is docs/protocol.md. Every frame is one ASCII line on the USB serial
console, shared with REPL text and tracebacks::

    @CNP1 <node> <boot> <seq> <type> <payload...> *<crc32 as 8 hex>

The encoder formats into one preallocated bytearray and computes the CRC with a
table-driven viper kernel that writes the hex digits straight into that buffer,
so a reading frame allocates nothing (as long as the integers are small ints).
The command parser takes one byte at a time into a bounded buffer; only a
complete, CRC-valid command line allocates (its argument dict).

Usage::

    import sys
    from canopy.protocol import Encoder, CommandParser, COMMAND, ERROR
    enc = Encoder("a4cf12", 1234567)
    n = enc.event("boot", 0)
    sys.stdout.buffer.write(enc.buf, n)
    parser = CommandParser("a4cf12", 1234567)
    for b in b"@CNP1 a4cf12 0 7 C status *0123abcd\\n":
        if parser.push(b) == COMMAND:
            print(parser.counter, parser.cmd, parser.args)
"""

import micropython
from array import array
from micropython import const

VERSION = const(1)
MAX_FRAME = const(250)  # bytes per line, including the trailing LF
MAX_NODE_ID = const(16)
MAX_STR = const(64)
TAG_HEX = const(32)  # reserved HMAC tag: 16 bytes as hex (see docs/protocol.md)
SEQ_WRAP = const(0x3FFFFFFF)  # stays a small int on the ESP32
_SIGN = 1 << 31  # passed into viper (a literal this big does not compile for the ESP32)

# push() results
NONE = const(0)
COMMAND = const(1)
ERROR = const(2)
RELAY = const(3)  # a command frame for another node, kept in buf[0:n] (gateway relay)

_AT = const(64)
_SP = const(32)
_STAR = const(42)
_LF = const(10)
_CR = const(13)

# parser states
_TEXT = const(0)
_FRAME = const(1)
_SKIP = const(2)

_HEX = b"0123456789abcdef"
_TEXT_TYPES = (str, bytes, bytearray)  # built once: a literal tuple would allocate per call
_HEADER = b"@CNP1 "
COMMANDS = ("status", "set", "identify", "calibrate", "reboot")

# Reading payload order: one comma-separated token (keys would not fit 250 bytes).
READING_KEYS = ("t_raw", "p_raw", "h_raw", "t", "p", "h", "shade", "mist", "fan",
                "faults", "failsafe", "tick", "i_shade", "i_mist", "i_fan")


def _crc_table():
    # IEEE 802.3 / zlib CRC-32, reflected polynomial. Built once with plain ints,
    # stored as signed 32-bit so array('i') accepts every entry on both widths.
    t = array("i", bytearray(1024))  # raw copy: no 256-item list on a small heap
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        t[i] = c - 0x100000000 if c & 0x80000000 else c
    return t


_TABLE = _crc_table()


@micropython.viper
def _crc_hex(buf: ptr8, start: int, end: int, table: ptr32, dst: ptr8, pos: int, ones: int, hexd: ptr8):
    # `ones` is -1 from the caller: the all-ones start value without a >= 2**30 literal.
    # Only the low 32 bits of crc are meaningful; every shift is masked so it does not
    # matter whether loads are zero- (unix x64) or sign-extended (ESP32), nor whether
    # ints are 64- or 32-bit wide.
    crc = ones
    i = start
    while i < end:
        crc = table[(crc ^ buf[i]) & 0xFF] ^ ((crc >> 8) & 0xFFFFFF)
        i += 1
    crc = crc ^ ones
    k = 7
    while k >= 0:
        dst[pos + k] = hexd[crc & 0xF]
        crc = crc >> 4
        k -= 1


@micropython.viper
def _put_ints(dst: ptr8, pos: int, vals: ptr32, n: int, s: int, lim: int) -> int:
    # Writes n int32 values from vals as comma-separated decimals at dst[pos:];
    # returns the new end, or -1 past lim. `s` is 1 << 31 from the caller, for
    # portable sign extension: ptr32 loads are zero-extended on unix x64 and signed
    # on the ESP32.
    i = 0
    while i < n:
        if pos + 12 > lim:
            return -1
        if i > 0:
            dst[pos] = 44
            pos += 1
        v = vals[i]
        v = (v ^ s) - s  # wrap-ok: sign-extension idiom
        if v < 0:
            dst[pos] = 45
            pos += 1
            # First digit taken with floor division by -10: works for -2**31, whose
            # magnitude has no int32.
            start = pos
            dst[pos] = 48 - (v % -10)
            pos += 1
            v = v // -10
        else:
            start = pos
            dst[pos] = 48 + v % 10
            pos += 1
            v = v // 10
        while v > 0:
            dst[pos] = 48 + v % 10
            pos += 1
            v = v // 10
        j = pos - 1
        while start < j:
            c = dst[start]
            dst[start] = dst[j]
            dst[j] = c
            start += 1
            j -= 1
        i += 1
    return pos


def crc_hex(data, start=0, end=-1):
    """CRC-32 (zlib) of data[start:end] as 8 lowercase hex bytes (allocates; for tests/tools)."""
    if end < 0:
        end = len(data)
    out = bytearray(8)
    _crc_hex(data, start, end, _TABLE, out, 0, -1, _HEX)
    return bytes(out)


def _safe_byte(c):
    # printable ASCII except space and the two framing characters
    return 0x21 <= c <= 0x7E and c != _AT and c != _STAR


def valid_node_id(s):
    if not isinstance(s, str) or not 1 <= len(s) <= MAX_NODE_ID:
        return False
    for ch in s:
        if not (ch.isalpha() or ch.isdigit() or ch in "_-") or ord(ch) > 126:
            return False
    return True


class FrameTooLong(ValueError):
    pass


_TOO_LONG = FrameTooLong("frame exceeds 250 bytes")


class Encoder:
    """Formats node -> host frames into `self.buf`; each method returns the length.

    Write with `stream.write(enc.buf, n)`. The sequence number advances per frame.
    """

    def __init__(self, node_id, boot_id):
        if not valid_node_id(node_id):
            raise ValueError("node id must be 1..16 chars of A-Z a-z 0-9 _ -")
        self.node = node_id.encode()
        self.boot = int(boot_id)
        self.seq = 0
        # slack past MAX_FRAME so an over-long frame is detected, not an IndexError
        self.buf = bytearray(MAX_FRAME + 40)
        self.n = 0
        self._over = False
        self._vals = array("i", bytearray(60))  # the 15 reading values
        self.auth = None  # canopy.security.Auth: when it has a key, every frame is tagged

    # -- low level, allocation-free for small ints and bytes constants --
    def _put(self, src):
        buf = self.buf
        n = self.n
        lim = MAX_FRAME + 20
        for c in src:
            if n >= lim:
                self._over = True
                break
            buf[n] = c
            n += 1
        self.n = n

    def _byte(self, c):
        if self.n < MAX_FRAME + 20:
            self.buf[self.n] = c
            self.n += 1
        else:
            self._over = True

    def _int(self, v):
        buf = self.buf
        n = self.n
        if n > MAX_FRAME:
            self._over = True
            return
        if v < 0:
            buf[n] = 45
            n += 1
            v = -v
        start = n
        while True:
            buf[n] = 48 + v % 10
            n += 1
            v //= 10
            if v == 0 or n >= MAX_FRAME + 20:
                break
        if v:
            self._over = True
        i = start
        j = n - 1
        while i < j:
            c = buf[i]
            buf[i] = buf[j]
            buf[j] = c
            i += 1
            j -= 1
        self.n = n

    def _str(self, s, cap=MAX_STR):
        if isinstance(s, str):
            s = s.encode()
        buf = self.buf
        n = self.n
        k = 0
        for c in s:
            if k >= cap or n >= MAX_FRAME + 20:
                break
            buf[n] = c if _safe_byte(c) else 95  # '_'
            n += 1
            k += 1
        self.n = n

    def _value(self, v):
        if isinstance(v, bool):
            self._int(1 if v else 0)
        elif isinstance(v, int):
            self._int(v)
        else:
            self._str(v if isinstance(v, _TEXT_TYPES) else str(v))

    def _begin(self, kind):
        self.n = 0
        self._over = False
        self._put(_HEADER)
        self._put(self.node)
        self._byte(_SP)
        self._int(self.boot)
        self._byte(_SP)
        self._int(self.seq)
        self._byte(_SP)
        self._byte(kind)

    def _kv(self, key, value):
        self._byte(_SP)
        self._put(key)
        self._byte(61)  # '='
        self._value(value)

    def _kvs(self, key, value, cap):
        self._byte(_SP)
        self._put(key)
        self._byte(61)
        self._str(value if isinstance(value, _TEXT_TYPES) else str(value), cap)

    def _finish(self):
        n = self.n
        auth = self.auth
        tagged = auth is not None and auth.hmac is not None
        if self._over or n + (45 if tagged else 11) > MAX_FRAME:
            raise _TOO_LONG
        buf = self.buf
        if tagged:
            n = auth.tag_into(buf, n)  # " !<tag>" over buf[0:n]; the CRC then covers it
        _crc_hex(buf, 0, n, _TABLE, buf, n + 2, -1, _HEX)
        buf[n] = _SP
        buf[n + 1] = _STAR
        buf[n + 10] = _LF
        self.n = n + 11
        s = self.seq + 1
        self.seq = 0 if s > SEQ_WRAP else s
        return self.n

    # -- frame types --
    def reading(self, raw, meas, out, faults, failsafe, tick, integ):
        """raw/meas/out: 3-item int sequences; integ: 3 integrators or None.

        Values are reported as int32 (the node's ints all are); one viper call
        formats all 15, which is several times faster than a digit loop in bytecode.
        """
        v = self._vals
        for i in range(3):
            v[i] = raw[i]
            v[3 + i] = meas[i]
            v[6 + i] = out[i]
            v[12 + i] = integ[i] if integ is not None else 0
        v[9] = faults
        v[10] = failsafe if type(failsafe) is int else (1 if failsafe else 0)  # Node.held() bits
        v[11] = tick
        self._begin(82)  # 'R'
        self._byte(_SP)
        n = _put_ints(self.buf, self.n, v, 15, _SIGN, MAX_FRAME)
        if n < 0:
            self._over = True
        else:
            self.n = n
        return self._finish()

    def hello(self, board, fw_version, fw_hash, cfg_version, cfg_digest):
        # Caps keep the worst case (16-char node id, 10-digit boot/seq/version) at 240 bytes.
        # A tagged hello needs 34 more: tighter caps keep it at 250 (cfg_version <= 1000).
        tagged = self.auth is not None and self.auth.hmac is not None
        self._begin(72)  # 'H'
        self._kvs(b"board", board, 18 if tagged else 24)
        self._kvs(b"fw_version", fw_version, 10 if tagged else 16)
        self._kvs(b"fw_hash", fw_hash, 10 if tagged else 16)
        self._kv(b"cfg_version", cfg_version)
        self._kvs(b"cfg_digest", cfg_digest, 64)
        return self._finish()

    def event(self, code, arg):
        self._begin(69)  # 'E'
        self._kv(b"code", code)
        self._kv(b"arg", arg)
        return self._finish()

    def reply(self, counter, cmd, pairs=()):
        """pairs: sequence of (key, value) with str/bytes keys."""
        self._begin(65)  # 'A'
        self._kv(b"re", counter)
        self._kv(b"cmd", cmd)
        self._kv(b"ok", 1)
        for k, v in pairs:
            self._kv(k if isinstance(k, bytes) else k.encode(), v)
        return self._finish()

    def error(self, counter, err, msg=None):
        """counter -1 = the offending frame's counter is unknown (the field is omitted)."""
        self._begin(88)  # 'X'
        if counter >= 0:
            self._kv(b"re", counter)
        self._kv(b"err", err)
        if msg:
            self._kv(b"msg", msg)
        return self._finish()


def _is_digits(s):
    if not s:
        return False
    for ch in s:
        if not ("0" <= ch <= "9"):
            return False
    return True


def _is_int(s):
    return _is_digits(s[1:] if s[:1] == "-" else s) and len(s) <= 12


def _is_key(s):
    if not 1 <= len(s) <= 16:
        return False
    for ch in s:
        if not ("a" <= ch <= "z" or "0" <= ch <= "9" or ch == "_"):
            return False
    return True


def _is_hex(s):
    for ch in s:
        if not ("0" <= ch <= "9" or "a" <= ch <= "f" or "A" <= ch <= "F"):
            return False
    return True


class CommandParser:
    """Bounded, byte-at-a-time parser for host -> node command frames.

    `push(b)` returns NONE, COMMAND (then read `counter`, `cmd`, `args`, `tag`) or
    ERROR (then read `err`, `err_counter` (-1 if unknown), `msg`). Free text and
    frames for other nodes are dropped and counted. Feeding bytes allocates nothing;
    a line longer than the buffer is dropped (ERROR 'oversize'), the buffer never grows.
    """

    def __init__(self, node_id, boot_id, maxlen=MAX_FRAME):
        self.node = node_id
        self.boot = int(boot_id)
        self.buf = bytearray(maxlen)
        self.maxlen = maxlen
        self.n = 0
        self.state = _TEXT
        self._crc = bytearray(8)
        self.counter = -1
        self.cmd = None
        self.args = None
        self.tag = None
        self.err = None
        self.err_counter = -1
        self.msg = None
        self.commands = 0
        self.errors = 0
        self.ignored = 0
        self.garbage_bytes = 0
        self.tag_at = -1  # index of the '!' of the last command's tag token, -1 = none
        self.relay = False  # gateway: return RELAY for command frames addressed elsewhere

    def push(self, b):
        st = self.state
        if b == _AT:
            # '@' never occurs inside a frame, so it always (re)starts a candidate;
            # a frame still open here was cut short.
            cut = st == _FRAME and self.n >= 4
            self.buf[0] = b
            self.n = 1
            self.state = _FRAME
            if cut:
                return self._fail("malformed", -1, "truncated")
            return NONE
        if st == _FRAME:
            n = self.n
            if b == _LF:
                self.state = _TEXT
                if n >= 4:
                    return self._line()
                self.garbage_bytes += n + 1
                return NONE
            if n < 4 and b != _HEADER[n]:
                self.state = _TEXT
                self.garbage_bytes += n + 1
                return NONE
            if n >= self.maxlen:
                self.state = _SKIP
                return self._fail("oversize", -1, None)
            self.buf[n] = b
            self.n = n + 1
            return NONE
        self.garbage_bytes += 1
        if st == _SKIP and b == _LF:
            self.state = _TEXT
        return NONE

    def _fail(self, err, counter, msg):
        self.err = err
        self.err_counter = counter
        self.msg = msg
        self.errors += 1
        return ERROR

    def _line(self):
        buf = self.buf
        n = self.n
        if buf[n - 1] == _CR:
            n -= 1
        # version: the digits between the marker and the first space
        i = 4
        while i < n and 48 <= buf[i] <= 57:
            i += 1
        if i == 4 or i >= n or buf[i] != _SP:
            return self._fail("malformed", -1, "header")
        if i != 5 or buf[4] != 49:  # '1'
            return self._fail("version", -1, "v1")
        e = n - 10
        if e < 6 or buf[e] != _SP or buf[e + 1] != _STAR:
            return self._fail("malformed", -1, "no_crc")
        crc = self._crc
        _crc_hex(buf, 0, e, _TABLE, crc, 0, -1, _HEX)
        for k in range(8):
            c = buf[e + 2 + k]
            if 65 <= c <= 70:
                c += 32  # accept upper-case hex
            if c != crc[k]:
                return self._fail("crc", -1, None)
        for k in range(e):
            c = buf[k]
            if c < 32 or c > 126:
                return self._fail("malformed", -1, "char")
        # A valid line: from here allocation is fine (bounded by the buffer size).
        toks = bytes(buf[0:e]).decode().split(" ")
        if len(toks) < 6 or not all(toks):
            return self._fail("malformed", -1, "fields")
        if not _is_digits(toks[3]) or len(toks[3]) > 10:
            return self._fail("malformed", -1, "counter")
        counter = int(toks[3])
        if toks[4] != "C":
            self.ignored += 1  # another node's frame relayed to us; not ours to answer
            return NONE
        if toks[1] != self.node and toks[1] != "*":
            self.ignored += 1
            if self.relay:
                self.n = n
                return RELAY
            return NONE
        if not _is_digits(toks[2]) or len(toks[2]) > 10:
            return self._fail("malformed", counter, "boot")
        boot = int(toks[2])
        if boot != 0 and boot != self.boot:
            return self._fail("boot", counter, "stale")
        cmd = toks[5]
        args = {}
        tag = None
        self.tag_at = -1
        last = len(toks) - 1
        for j in range(6, len(toks)):
            t = toks[j]
            if t[0] == "!":
                if j != last or len(t) != TAG_HEX + 1 or not _is_hex(t[1:]):
                    return self._fail("malformed", counter, "tag")
                tag = t[1:]
                self.tag_at = e - TAG_HEX - 1
                continue
            eq = t.find("=")
            if eq <= 0:
                return self._fail("malformed", counter, "arg")
            k = t[:eq]
            v = t[eq + 1:]
            if not _is_key(k) or k in args:
                return self._fail("malformed", counter, "key")
            args[k] = int(v) if _is_int(v) else v
        if cmd not in COMMANDS:
            return self._fail("unknown_cmd", counter, cmd[:MAX_STR])
        self.counter = counter
        self.cmd = cmd
        self.args = args
        self.tag = tag
        self.commands += 1
        return COMMAND
