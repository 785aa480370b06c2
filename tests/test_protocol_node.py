"""Node side of the wire protocol, run in the MicroPython unix port, checked from CPython.

Round trips: node encoder -> host parser (and byte-identical to the host's own
encoder), host encoder -> node parser. A bounded fuzz of the node's parser and of
the Link, and the Link on a real stdin pipe via select.poll.
"""

from __future__ import annotations

import json
import random
import subprocess
import zlib

import pytest

from canopy_host.paths import micropython_command
from canopy_host.protocol import READING_KEYS, FrameParser, encode_command, encode_frame
from canopy_host.unixport import call_batch, micropython_env
from conftest import MPY_TEST_DIR

MOD = "protocol_node"
EXTRA = [MPY_TEST_DIR]


def _batch(func: str, cases: list, **kw) -> list:
    return call_batch(MOD, func, cases, extra_path=EXTRA, **kw)


def _node_id(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))


def _i32(rng: random.Random) -> int:
    return rng.choice([rng.randint(-(2**31), 2**31 - 1), rng.randint(-1000, 1000), 0, -1, 2**31 - 1, -(2**31)])


def test_crc_kernel_matches_zlib() -> None:
    rng = random.Random(1)
    blobs = [b"", b"a", bytes(range(256))] + [rng.randbytes(rng.randint(1, 300)) for _ in range(200)]
    got = _batch("crc", [[b.hex()] for b in blobs])
    assert got == ["%08x" % zlib.crc32(b) for b in blobs]


def test_node_encoder_round_trips_through_host_parser() -> None:
    rng = random.Random(2)
    cases, expected = [], []
    for i in range(300):
        node, boot, seq = _node_id(rng), rng.randint(0, 2**30 - 1), rng.randint(0, 2**30 - 1)
        kind = ["reading", "hello", "event", "reply", "error"][i % 5]
        if kind == "reading":
            vals = [_i32(rng) for _ in READING_KEYS]
            vals[10] = rng.randint(0, 1)  # failsafe is a flag
            fields: dict = dict(zip(READING_KEYS, vals))
            cases.append([kind, node, boot, seq, vals])
        elif kind == "hello":
            fw_hash = "".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(1, 16)))
            digest = "".join(rng.choice("0123456789abcdef") for _ in range(64))
            fields = {"board": "esp32s3-devkitc", "fw_version": "0.1.0", "fw_hash": fw_hash,
                      "cfg_version": rng.randint(0, 10**6), "cfg_digest": digest}
            cases.append([kind, node, boot, seq, list(fields.values())])
        elif kind == "event":
            fields = {"code": rng.choice(["boot", "fault", "failsafe", "recovered"]), "arg": _i32(rng)}
            cases.append([kind, node, boot, seq, [fields["code"], fields["arg"]]])
        elif kind == "reply":
            extra = [["tick", rng.randint(0, 10**9)], ["offset", _i32(rng)]]
            fields = {"re": rng.randint(0, 2**30), "cmd": "status", "ok": 1, "tick": extra[0][1], "offset": extra[1][1]}
            cases.append([kind, node, boot, seq, [fields["re"], "status", extra]])
        else:
            fields = {"re": rng.randint(0, 2**30), "err": "bad_args", "msg": "delta_must_be_an_int"}
            cases.append([kind, node, boot, seq, [fields["re"], "bad_args", "delta must be an int"]])
        expected.append((kind, node, boot, seq, fields))
    # an error without a known counter omits `re`
    cases.append(["error", "n01", 5, 6, [-1, "crc"]])
    expected.append(("error", "n01", 5, 6, {"err": "crc"}))
    hexframes = _batch("encode", cases)
    parser = FrameParser()
    stream = b"".join(bytes.fromhex(h) for h in hexframes)
    frames = parser.feed(stream)
    assert parser.crc_errors == parser.malformed == parser.oversize == parser.garbage_bytes == 0
    assert [(f.kind, f.node, f.boot, f.seq, f.fields) for f in frames] == expected
    for h, (kind, node, boot, seq, fields) in zip(hexframes, expected):
        raw = bytes.fromhex(h)
        assert len(raw) <= 250
        # two independent encoders, one wire format
        assert raw == encode_frame(kind, node, boot, seq, fields)


def test_node_encoder_refuses_frames_over_250_bytes() -> None:
    (hello_hex, outcome), = _batch("encode_too_long", [["abcdefghijklmnop"]])
    assert outcome == "FrameTooLong"
    (hello,) = FrameParser().feed(bytes.fromhex(hello_hex))
    assert len(hello.raw) + 1 <= 250  # worst-case hello: every field at its cap
    assert (len(hello.fields["board"]), len(hello.fields["fw_hash"]), len(hello.fields["cfg_digest"])) == (24, 16, 64)


def test_reading_encoder_allocates_nothing() -> None:
    assert _batch("reading_allocs", [[500]]) == [500]


def test_host_commands_round_trip_through_node_parser() -> None:
    rng = random.Random(3)
    node, boot = "a4cf12", 1234
    stream = b""
    expected = []
    for counter in range(200):
        cmd = rng.choice(["status", "set", "identify", "calibrate", "reboot"])
        args: dict = {}
        for _ in range(rng.randint(0, 4)):
            key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_0123456789") for _ in range(rng.randint(1, 16)))
            args[key] = rng.choice([_i32(rng), "auto", "x-1.5", ""])
        target = rng.choice([node, "*"])
        tag = rng.randbytes(16) if counter % 7 == 0 else None
        line = encode_command(target, counter, cmd, args, boot=rng.choice([0, boot]), tag=tag)
        if counter % 5 == 0:
            line = line.replace(b"\n", b"\r\n")  # a terminal program's line ending
        stream += line
        expected.append(["cmd", counter, cmd, args, tag.hex() if tag else None])
    # frames the node must ignore (another node) or refuse (stale boot, unknown command, CRC)
    stream += encode_command("other", 900, "reboot", {})
    stream += encode_command(node, 901, "reboot", {}, boot=999)
    expected.append(["err", 901, "boot", "stale"])
    bad = bytearray(encode_command(node, 902, "status", {}))
    bad[-3] ^= 0x01
    stream += bytes(bad)
    expected.append(["err", -1, "crc", None])
    body = b"@CNP1 a4cf12 0 903 C format"
    stream += body + b" *%08x\n" % zlib.crc32(body)
    expected.append(["err", 903, "unknown_cmd", "format"])
    out, garbage, ignored = _batch("parse", [[node, boot, stream.hex()]])[0]
    assert out == expected
    assert ignored == 1 and garbage == 0


def _fuzz_stream(seed: int, node: str) -> tuple[list[bytes], list[list]]:
    """Chunks of garbage with valid and broken command frames mixed in, and what the
    node's parser must report for them, in order."""
    rng = random.Random(seed)
    chunks: list[bytes] = []
    expected: list[list] = []
    counter = 0
    noise = [b"\x00\xff\x1b[0m", b"Traceback (most recent call last):\r\n", b"@", b"@C", b"@CN", b"@CNP", b"\n",
             b">>> ", b"*", b"\x03", b"@CNP2 a 0 1 C x *00000000", b"@@@@"]
    for _ in range(400):
        r = rng.random()
        if r < 0.35:
            chunks.append(rng.randbytes(rng.randint(1, 120)).replace(b"@", b"#"))
        elif r < 0.5:
            chunks.append(rng.choice(noise))
        elif r < 0.8:
            # every valid command must survive whatever garbage came before it
            cmd = rng.choice(["status", "set", "identify", "calibrate", "reboot"])
            frame = encode_command(node, counter, cmd, {"a": rng.randint(0, 99)} if cmd == "set" else {})
            cut = rng.randint(0, len(frame))
            chunks += [frame[:cut], frame[cut:]]
            expected.append(["cmd", counter, cmd])
            counter += 1
        elif r < 0.9:
            # a broken frame on its own line: exactly one error frame
            frame = bytearray(encode_command(node, counter, "status", {}))
            i = rng.randint(6, len(frame) - 12)  # inside the CRC-covered body
            new = rng.choice(b"abcxyz019")
            if frame[i] == new:
                continue
            frame[i] = new
            chunks.append(b"\n" + bytes(frame))
            expected.append(["err", -1, "crc"])
            counter += 1
        else:
            chunks.append(b"\n@CNP1 " + b"z" * rng.randint(260, 3000) + b"\n")  # oversize
            expected.append(["err", -1, "oversize"])
    chunks.append(b"\n")
    return [c for c in chunks if c], expected


def _norm(results: list[list]) -> list[list]:
    return [list(r) for r in results]


@pytest.mark.parametrize("seed", [11, 12])
def test_node_parser_fuzz(seed: int) -> None:
    node = "n01"
    chunks, expected = _fuzz_stream(seed, node)
    results, heap_growth, locked_ok, locked_total, bufsize, count = _batch(
        "fuzz", [[node, 7, [c.hex() for c in chunks]]], timeout=120
    )[0]
    results = _norm(results)
    # Every valid command is received, in order, whatever garbage came before it.
    assert [r for r in results if r[0] == "cmd"] == [e for e in expected if e[0] == "cmd"]
    # Every planted bad frame got its error, in order; the only other errors come from
    # marker-like noise ('@CNP' cut short by the next '@', or protocol version 2).
    planted = iter(e for e in expected if e[0] == "err")
    want = next(planted, None)
    for r in results:
        if r[0] != "err":
            continue
        if r == want:
            want = next(planted, None)
        else:
            assert r[2] in ("malformed", "version"), r
    assert want is None, f"planted error {want} was not reported"
    assert count == len(results)
    assert bufsize == 250
    assert locked_total > 50 and locked_ok == locked_total
    assert heap_growth <= 256, f"parser heap grew by {heap_growth} bytes over {sum(map(len, chunks))} bytes of input"


def test_link_answers_commands_and_errors_and_reports() -> None:
    chunks = [
        encode_command("n01", 1, "status", {}),
        b"random noise\r\n" + encode_command("n01", 2, "set", {"t_setpoint": 2400}),
        encode_command("n01", 3, "set", {"bad": 1}),
        encode_command("n01", 4, "calibrate", {"channel": "h", "delta": -300}),
        encode_command("n01", 5, "identify", {"seconds": 3}),
        b"@CNP1 n01 0 6 C status *deadbeef\n",
        b"@CNP1 " + b"q" * 400 + b"\n",
        encode_command("n01", 7, "reboot", {}),
        encode_command("n01", 8, "status", {"x": 1}),
    ]
    out_hex, calls = _batch("link_session", [[[c.hex() for c in chunks]]])[0]
    parser = FrameParser()
    frames = parser.feed(bytes.fromhex(out_hex))
    assert parser.garbage_bytes == 0 and parser.crc_errors == 0 and parser.malformed == 0
    assert [f.seq for f in frames] == list(range(len(frames)))  # one per-boot sequence, no gaps
    assert all(f.node == "n01" and f.boot == 77 for f in frames)
    assert frames[0].kind == "hello" and frames[1].kind == "event" and frames[1].fields == {"code": "boot", "arg": 77}
    replies = {f.fields["re"]: f for f in frames if f.kind in ("reply", "error") and "re" in f.fields}
    assert replies[1].kind == "reply" and replies[1].fields["failsafe"] == 0
    assert replies[2].kind == "reply" and replies[2].fields["cfg_version"] == 2
    assert replies[3].kind == "error" and replies[3].fields["err"] == "bad_args"
    assert replies[4].fields["offset"] == -300 and replies[4].fields["channel"] == 2
    assert replies[5].fields["seconds"] == 3
    assert replies[7].kind == "reply"
    assert replies[8].kind == "error" and replies[8].fields["err"] == "bad_args"
    anonymous = [f.fields["err"] for f in frames if f.kind == "error" and "re" not in f.fields]
    assert anonymous == ["crc", "oversize"]
    assert calls == [["set", {"t_setpoint": 2400}], ["calibrate", 2, -300], ["identify", 3], ["reboot"]]
    readings = [f for f in frames if f.kind == "reading"]
    assert len(readings) >= len(chunks) and readings[0].fields["t_raw"] == 2500
    # status asks for a fresh hello
    assert sum(f.kind == "hello" for f in frames) == 2


_STDIN_SCRIPT = """
import time
import protocol_node as pn
from canopy.link import Link
node = pn.FakeNode()
link = Link(node, node_id="n01")
for i in range(20):
    node.ticks += 1
    link.service(time.ticks_ms())
    time.sleep_ms(2)
print("@@CALLS", node.calls, link.eof, link.parser.garbage_bytes)
"""


def test_link_reads_real_stdin_without_blocking() -> None:
    """The Link on a real pipe: poll, read what is there, answer; the loop keeps ticking."""
    stdin = b"boot noise\n" + encode_command("n01", 1, "identify", {"seconds": 2}) + encode_command("*", 2, "status", {})
    proc = subprocess.run(
        micropython_command() + ["-c", _STDIN_SCRIPT], input=stdin, capture_output=True, timeout=60,
        env=micropython_env([MPY_TEST_DIR]),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    parser = FrameParser()
    frames = parser.feed(proc.stdout)
    parser.flush_text()
    replies = [f for f in frames if f.kind == "reply"]
    assert [(f.fields["re"], f.fields["cmd"]) for f in replies] == [(1, "identify"), (2, "status")]
    calls_line = [t for t in parser.text_lines if t.startswith("@@CALLS")]
    assert calls_line and "['identify', 2]" in calls_line[0]
    assert calls_line[0].endswith(" True 11")  # saw EOF; the noise line was read and dropped
    # the loop kept ticking after the input ran dry: one reading per tick
    assert sum(f.kind == "reading" for f in frames) >= 20


_REAL_NODE_SCRIPT = """
from canopy import board, config, hal
from canopy.link import Link
from canopy.node import Node
import main
hw = hal.open(board.load("unix-sim"), {"node_id": "n07", "seed": 1, "speed": 0})
node = Node(hw, config.merged(), boot_id=5)
main.loop(node, Link(node), 30000)
"""


def test_link_drives_the_real_node(tmp_path) -> None:
    """The Link against canopy.node.Node in firmware/main.py's loop, commands on stdin."""
    from canopy_host.unixport import run_code

    stdin = b"".join([
        b"stray text\n",
        encode_command("n07", 1, "status", {}),
        encode_command("n07", 2, "set", {"t_setpoint": 2400}),
        encode_command("n07", 3, "calibrate", {"channel": "t", "delta": -20}),
        encode_command("n07", 4, "identify", {"seconds": 2}),
        encode_command("n07", 5, "set", {"t_setpoint": 99999}),
        encode_command("n08", 6, "reboot", {}),  # another node's: ignored
    ])
    proc = run_code(_REAL_NODE_SCRIPT, stdin=stdin.decode(), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    parser = FrameParser()
    frames = parser.feed(proc.stdout.encode())
    assert parser.crc_errors == parser.malformed == parser.oversize == 0
    assert all(f.node == "n07" and f.boot == 5 for f in frames)
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert frames[0].kind == "hello" and frames[0].fields["board"] == "unix-sim"
    answers = {f.fields["re"]: f for f in frames if f.kind in ("reply", "error")}
    assert sorted(answers) == [1, 2, 3, 4, 5]
    assert answers[2].fields["cfg_digest"] != frames[0].fields["cfg_digest"]  # the setpoint changed
    assert answers[3].fields["offset"] == -20
    assert answers[5].kind == "error" and answers[5].fields["err"] == "bad_args"
    events = [f.fields["code"] for f in frames if f.kind == "event"]
    assert events[0] == "boot" and {"config", "calibrate", "identify"} <= set(events)
    readings = [f for f in frames if f.kind == "reading"]
    assert len(readings) >= 29  # one per simulated second
    last = readings[-1].fields
    assert 0 <= last["shade"] <= 10000 and last["failsafe"] == 0 and 1000 < last["t"] < 5000


_FLOOD_SCRIPT = """
import protocol_node as pn
from canopy.link import Link
node = pn.FakeNode()
link = Link(node, node_id="n01")
seen = []
for i in range(200):
    node.ticks += 1
    link.service(i)
    seen.append(link.parser.garbage_bytes)
    if link.parser.commands:
        break
print("@@FLOOD", seen[0], len(seen), link.parser.commands)
"""


def test_link_reads_a_bounded_amount_per_service_call() -> None:
    """A flood on the line is consumed max_read bytes per call: the tick keeps its pace."""
    stdin = b"x" * 10_000 + b"\n" + encode_command("n01", 1, "status", {})
    proc = subprocess.run(
        micropython_command() + ["-c", _FLOOD_SCRIPT], input=stdin, capture_output=True, timeout=60,
        env=micropython_env([MPY_TEST_DIR]),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    parser = FrameParser()
    frames = parser.feed(proc.stdout)
    parser.flush_text()
    (line,) = [t for t in parser.text_lines if t.startswith("@@FLOOD")]
    first, calls, commands = map(int, line.split()[1:])
    assert first == 256  # Link.max_read
    assert calls == -(-len(stdin) // 256) and commands == 1
    assert [f.fields["re"] for f in frames if f.kind == "reply"] == [1]


_LOCKED_SCRIPT = """
import micropython
import protocol_node as pn
from canopy.link import Link
node = pn.FakeNode()
link = Link(node, node_id="n01")
link.service(0)  # first call: hello, poll setup
def run(n):
    ok = 0
    micropython.heap_lock()
    try:
        for i in range(n):
            node.ticks += 1
            node.raw[0] = 2500 - i  # values change every tick, as a real node's do
            link.service(i)
            ok += 1
    except MemoryError:
        pass
    micropython.heap_unlock()
    return ok
print("@@LOCKED", run(150), link.frames_out)
"""


def test_link_steady_state_allocates_nothing() -> None:
    """Polling an idle line, sending readings and the periodic hello: all with the heap locked."""
    proc = subprocess.Popen(
        micropython_command() + ["-c", _LOCKED_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=micropython_env([MPY_TEST_DIR]),
    )
    try:
        # stdin stays open and idle until the script has exited (communicate would close it)
        out = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdin.close()
    parser = FrameParser()
    frames = parser.feed(out)
    parser.flush_text()
    (line,) = [t for t in parser.text_lines if t.startswith("@@LOCKED")]
    ok, sent = map(int, line.split()[1:])
    assert ok == 150, err.decode()
    assert sum(f.kind == "hello" for f in frames) == 1 + 150 // 60  # the periodic hello ran locked too
    assert sent == len(frames) and [f.seq for f in frames] == list(range(len(frames)))
