"""MicroPython-side adapters for tests/test_protocol_node.py (run in the unix port).

Bytes cross the JSON boundary of `canopy_host.unixport.call_batch` as hex strings.
"""

import gc
from array import array
from binascii import hexlify, unhexlify

import micropython

from canopy import protocol
from canopy.link import Link


def encode(kind, node_id, boot, seq, values):
    """One node frame from the real encoder, as hex."""
    enc = protocol.Encoder(node_id, boot)
    enc.seq = seq
    if kind == "reading":
        v = values
        n = enc.reading(array("i", v[0:3]), array("i", v[3:6]), array("i", v[6:9]),
                        v[9], v[10], v[11], array("i", v[12:15]))
    elif kind == "hello":
        n = enc.hello(*values)
    elif kind == "event":
        n = enc.event(*values)
    elif kind == "reply":
        n = enc.reply(values[0], values[1], [tuple(p) for p in values[2]])
    elif kind == "error":
        n = enc.error(*values)
    else:
        raise ValueError(kind)
    return hexlify(enc.buf[:n]).decode()


def encode_too_long(node_id):
    """The worst-case hello fits; a reply with too many fields is refused."""
    enc = protocol.Encoder(node_id, 2**30 - 1)
    enc.seq = 2**30 - 1
    n = enc.hello("b" * 99, "v" * 99, "h" * 99, 2**30 - 1, "d" * 99)
    hello = hexlify(enc.buf[:n]).decode()
    try:
        enc.reply(1, "status", [("k%d" % i, "v" * 20) for i in range(10)])
    except protocol.FrameTooLong:
        return [hello, "FrameTooLong"]
    return [hello, "no error"]


def crc(hexdata):
    return protocol.crc_hex(unhexlify(hexdata)).decode()


def parse(node_id, boot, hexstream):
    """Feed a byte stream to a CommandParser; list every non-NONE result."""
    p = protocol.CommandParser(node_id, boot)
    out = []
    for b in unhexlify(hexstream):
        r = p.push(b)
        if r == protocol.COMMAND:
            out.append(["cmd", p.counter, p.cmd, p.args, p.tag])
        elif r == protocol.ERROR:
            out.append(["err", p.err_counter, p.err, p.msg])
    return [out, p.garbage_bytes, p.ignored]


class FakeNode:
    """Just enough of canopy.node.Node for the link: records what the link asked."""

    def __init__(self):
        self.boot_id = 77
        self.raw = array("i", [2500, 100000, 50000])
        self.meas = array("i", [2499, 100001, 50001])
        self.out = array("i", [100, 0, 9000])
        self.faults = 0
        self.failsafe = False
        self.ticks = 0
        self.cfg = {"version": 1}
        self.calls = []
        self.events = []
        self.events_dropped = 0

    def pop_event(self):
        return self.events.pop(0) if self.events else None

    def set_config(self, d):
        if "bad" in d:
            raise ValueError("config: bad is not a setting")
        self.calls.append(["set", d])
        cfg = dict(self.cfg)
        cfg.update(d)
        cfg["version"] = cfg["version"] + 1
        self.cfg = cfg
        return cfg

    def calibrate_offset(self, ch, delta):
        if not isinstance(delta, int):
            raise ValueError("calibrate: delta must be an int")
        self.calls.append(["calibrate", ch, delta])
        return delta

    def identify(self, s):
        self.calls.append(["identify", s])

    def reboot(self):
        self.calls.append(["reboot"])


class Capture:
    def __init__(self):
        self.chunks = []

    def write(self, buf, n=-1):
        self.chunks.append(bytes(buf[:n] if n >= 0 else buf))
        return n


def link_session(hexchunks):
    """A Link on a FakeNode: service, feed each chunk, service again. Returns output + calls."""
    node = FakeNode()
    cap = Capture()
    link = Link(node, node_id="n01", inp=None, out=cap)
    link._poll = None  # bytes come from the test, not stdin
    node.events.append(("boot", 77))
    link.service(0)
    for h in hexchunks:
        link.feed(unhexlify(h))
        node.ticks += 1
        link.service(node.ticks * 1000)
    return [hexlify(b"".join(cap.chunks)).decode(), node.calls]


def fuzz(node_id, boot, hexchunks):
    """Feed chunks (garbage and commands mixed) through one parser; check the heap.

    Returns [results, free-heap change over a second identical run (after a
    collection, only counting results), garbage-only chunks fed with the heap
    locked without error, how many such chunks, buffer size after].
    """
    chunks = [unhexlify(h) for h in hexchunks]
    p = protocol.CommandParser(node_id, boot)
    results = []
    locked_ok = 0
    locked_total = 0
    for c in chunks:
        if b"\n" not in c and b"@" not in c:
            # Nothing can complete or be cut short in this chunk, so the parser
            # must not touch the heap at all.
            locked_total += 1
            if _push_locked(p, c):
                locked_ok += 1
            continue
        for b in c:
            r = p.push(b)
            if r == protocol.COMMAND:
                results.append(["cmd", p.counter, p.cmd])
            elif r == protocol.ERROR:
                results.append(["err", p.err_counter, p.err])
    size = len(p.buf)
    # Second run: the same stream through a fresh parser, counting only.
    p = protocol.CommandParser(node_id, boot)
    push = p.push
    gc.collect()
    free0 = gc.mem_free()
    count = 0
    for c in chunks:
        for b in c:
            if push(b) != protocol.NONE:
                count += 1
    p.args = None  # the last command's dict is legitimately kept; drop it to compare
    p.cmd = None
    p.msg = None
    p.err = None
    gc.collect()
    free1 = gc.mem_free()
    return [results, free0 - free1, locked_ok, locked_total, size, count]


def _push_locked(p, chunk):
    push = p.push
    micropython.heap_lock()
    try:
        bad = 0
        for b in chunk:
            if push(b) != protocol.NONE:
                bad += 1
    except MemoryError:
        micropython.heap_unlock()
        return False
    micropython.heap_unlock()
    return bad == 0


def reading_allocs(n):
    """Encode n reading frames with the heap locked; returns how many succeeded."""
    enc = protocol.Encoder("a4cf12", 123456)
    raw = array("i", [2512, 101325, 51200])
    meas = array("i", [-2511, 101320, 51234])
    out = array("i", [5000, 0, 10000])
    integ = array("i", [-123, 4567, 0])
    ok = 0
    micropython.heap_lock()
    try:
        for i in range(n):
            enc.reading(raw, meas, out, 3, True, i, integ)
            ok += 1
    except MemoryError:
        pass
    micropython.heap_unlock()
    return ok
