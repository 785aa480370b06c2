"""The protocol end to end: a virtual node (real firmware, unix port) on a real pty.

The host side is exactly what a tool uses on a USB port: pyserial through
canopy_host.transport, FrameParser in, encode_command out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from canopy_host import transport
from canopy_host.protocol import FrameParser, SeqTracker, encode_command
from canopy_host.sim import SimConfig, Supervisor

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")


def _collect(port, parser: FrameParser, until, timeout: float = 15.0) -> list:
    frames: list = []
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until(frames):
        frames += parser.feed(port.read(max(1, port.in_waiting)))
    return frames


def test_commands_over_a_pty_to_a_virtual_node(tmp_path: Path) -> None:
    with Supervisor(SimConfig(nodes=1, directory=tmp_path, speed=20.0, seed=3)) as sup:
        node = sup.nodes[0]
        with transport.open_port(node.port, timeout=0.1) as port:
            parser = FrameParser()
            frames = _collect(port, parser, lambda fs: any(f.kind == "reading" for f in fs))
            hello = next(f for f in frames if f.kind == "hello")
            assert hello.node == node.node_id and hello.fields["board"] == "unix-sim"
            # Line noise first, then commands: the node must still answer every one.
            port.write(b"\x00\xffnoise @CN garbage\r\n")
            port.write(encode_command(node.node_id, 1, "status", {}))
            port.write(encode_command(node.node_id, 2, "set", {"t_setpoint": 2300}))
            port.write(encode_command(node.node_id, 3, "calibrate", {"channel": "h", "delta": 512}))
            port.write(b"@CNP1 " + b"x" * 300 + b"\n")
            port.write(encode_command(node.node_id, 4, "identify", {"seconds": 1}, boot=hello.boot))
            answered = lambda fs: {1, 2, 3, 4} <= {f.fields.get("re") for f in fs if f.kind in ("reply", "error")}
            frames += _collect(port, parser, answered)
    answers = {f.fields["re"]: f for f in frames if f.kind in ("reply", "error") and "re" in f.fields}
    assert [answers[i].kind for i in (1, 2, 3, 4)] == ["reply"] * 4
    assert answers[2].fields["cfg_digest"] != hello.fields["cfg_digest"]
    assert answers[3].fields == {"re": 3, "cmd": "calibrate", "ok": 1, "channel": 2, "offset": 512}
    assert any(f.kind == "error" and f.fields["err"] == "oversize" for f in frames)
    assert parser.crc_errors == 0 and parser.malformed == 0
    # one boot, one gap-free sequence from the first frame we saw
    seq = SeqTracker()
    statuses = [seq.observe(f) for f in frames]
    assert statuses[0].new_boot and not any(s.gap or s.duplicate or s.new_boot for s in statuses[1:])
