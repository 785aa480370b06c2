"""Test support: virtual nodes (real firmware Node + Link + repair agent in the unix port)
driven over pipes, with injectable partitions, lost replies, node reboots and host crashes.

Each node is a `micropython` process in its own folder (its flash: sim.json, boot_id,
config.json, ...). A command line goes in on stdin; the node answers, runs one control
tick (so a config trial makes progress) and the client reads frames until the answer.
A reboot kills the process and starts a new one in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from canopy_host.protocol import FrameParser
from canopy_host.repair import NodeOffline, NodeRefused, encode_repair_command, tag_line
from canopy_host.security import FrameVerifier, derive_node_key, key_file_text
from canopy_host.unixport import micropython_env
from canopy_host.paths import micropython_command

DRIVER = r'''
import sys
from canopy import board, hal
from canopy.node import Node
from canopy.link import Link
import main as fw

class _NoInput:
    pass

hw = hal.open(board.load())
node = Node(hw, fw.load_config())
try:
    import os
    os.stat("canopy_key.json")
    auth = "flash"  # strict: the node's key file, as provisioning writes it
except OSError:
    auth = None
link = Link(node, inp=_NoInput(), report_every=1000000, auth=auth)
out = sys.stdout.buffer
link.service(hw.ticks_ms())
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    link.feed(line)
    node.tick()
    hw.sleep_ms(node.period_ms)
    link.service(hw.ticks_ms())
    out.write(b"~tick\n")
'''


class HostCrash(Exception):
    """Raised by the client to simulate the host process dying mid-repair."""


def canonical_digest(cfg: Mapping[str, Any]) -> str:
    """Reference digest: sha256 of sorted-key, no-space JSON (docs/protocol.md)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class PipeMesh:
    def __init__(self, root: Path, ids: list[str], master: bytes | None = None) -> None:
        self.root = root
        self.master = master
        self.verifier = FrameVerifier.from_master(master, ids) if master else None
        self.untagged = False  # send the next commands without a tag (an attacker, a stale tool)
        self.tag_node: str | None = None  # tag under this node's key instead (cross-node forgery)
        self.ids = ids
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.partitioned: set[str] = set()
        self.drop_reply: Callable[[str, str, dict[str, Any]], bool] = lambda n, c, a: False
        self.before_send: Callable[[str, str], None] = lambda n, c: None
        self.after_send: Callable[[str, str], None] = lambda n, c: None
        self.versions: dict[str, list[int]] = {n: [] for n in ids}  # every status seen
        self.sent: list[tuple[str, str]] = []
        self.counter = 0
        driver = root / "node_driver.py"
        driver.write_text(DRIVER)
        self.driver = driver
        for i, nid in enumerate(ids):
            d = root / nid
            d.mkdir()
            (d / "sim.json").write_text(json.dumps({"node_id": nid, "seed": 11 + i, "speed": 0,
                                                    "weather": "mild"}))
            if master:
                (d / "canopy_key.json").write_text(key_file_text(derive_node_key(master, nid), nid))
            self.start(nid)

    def folder(self, nid: str) -> Path:
        return self.root / nid

    def start(self, nid: str) -> None:
        self.procs[nid] = subprocess.Popen(
            micropython_command() + [str(self.driver)], cwd=self.folder(nid), env=micropython_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def reboot(self, nid: str) -> None:
        p = self.procs[nid]
        p.kill()
        p.wait()
        for s in (p.stdin, p.stdout, p.stderr):
            if s:
                s.close()
        self.start(nid)

    def close(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()
            for s in (p.stdin, p.stdout, p.stderr):
                if s:
                    s.close()

    def file(self, nid: str, name: str) -> bytes | None:
        p = self.folder(nid) / name
        return p.read_bytes() if p.exists() else None

    def request(self, node: str, cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        if node in self.partitioned:
            raise NodeOffline(f"{node} partitioned")
        self.before_send(node, cmd)
        self.counter += 1
        counter = self.counter
        p = self.procs[node]
        assert p.stdin is not None and p.stdout is not None
        line = encode_repair_command(node, counter, cmd, args)
        if self.master and not self.untagged:
            line = tag_line(line, derive_node_key(self.master, self.tag_node or node))
        p.stdin.write(line)
        p.stdin.flush()
        self.sent.append((node, cmd))
        parser = FrameParser()
        fd = p.stdout.fileno()
        end = time.monotonic() + 20
        answer: dict[str, Any] | None = None
        refused: tuple[str, str] | None = None
        buf = b""
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.5)
            if not r:
                continue
            data = os.read(fd, 65536)
            if not data:
                raise AssertionError(f"{node} died: {p.stderr.read().decode() if p.stderr else ''}")
            buf += data
            for f in parser.feed(data):
                if f.fields.get("re") != counter:
                    continue
                if self.verifier is not None:
                    assert self.verifier.verify(f) == "ok", f  # the node's answers are tagged too
                if f.kind == "reply":
                    answer = dict(f.fields)
                elif f.kind == "error":
                    refused = (str(f.fields.get("err")), str(f.fields.get("msg", "")))
            if b"~tick\n" in buf and (answer is not None or refused is not None):
                break
        else:
            raise AssertionError(f"{node}: no answer to {cmd}")
        self.after_send(node, cmd)
        if refused is not None:
            raise NodeRefused(node, *refused)
        assert answer is not None
        if cmd == "repair_status":
            self.versions[node].append(int(answer["cfg_version"]))
        if self.drop_reply(node, cmd, answer):
            raise NodeOffline(f"{node}: reply to {cmd} lost")
        return answer


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += max(s, 0.0)
