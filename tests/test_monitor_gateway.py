"""A mesh gateway's port carries every node's frames (docs/mesh.md "Relaying"); a node
followed both on its own cable and through the gateway delivers each frame twice.

Neither is an anomaly: one `node_changed` per node new to a port (not one per
alternation), and an authentic copy of an accepted frame arriving through a second
port is counted as `relayed`, not stored again and not a security reject. A replay on a
node's only port, or of an old frame, is still rejected as `replay`.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from canopy_host.monitor import Collector, PortSpec
from canopy_host.protocol import READING_KEYS, FrameParser, encode_frame
from canopy_host.security import HostAuth, derive_node_key, tag_bytes

MASTER = bytes(range(32))


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.events: list[tuple] = []

    def add_frame_rows(self, rows):
        self.rows.extend(rows)

    def add_event(self, rx, port, node, kind, **kw):
        self.events.append((port, node, kind, kw.get("detail")))

    def upsert_node(self, *a, **kw):
        pass


def _line(node: str, seq: int, boot: int = 7) -> bytes:
    fields = dict(zip(READING_KEYS, range(seq, seq + len(READING_KEYS))))
    body = encode_frame("reading", node, boot, seq, fields).rpartition(b" *")[0]
    body += b" !" + tag_bytes(derive_node_key(MASTER, node), body).hex().encode()
    return body + b" *%08x\n" % zlib.crc32(body)


def _collector(tmp_path: Path, auth: bool = True) -> tuple[Collector, Recorder]:
    store = Recorder()
    c = Collector(store, clock=lambda: 100.0, auth=HostAuth(MASTER, tmp_path / "c.json") if auth else None)  # type: ignore[arg-type]
    return c, store


def test_gateway_port_interleaving_nodes_is_not_a_stream_of_node_changes(tmp_path: Path) -> None:
    for auth in (True, False):
        c, store = _collector(tmp_path, auth)
        gw = c.add_port(PortSpec(label="gw", path="/dev/gw"))
        parser = FrameParser()
        stream = b"".join(_line(n, s) for s in range(20) for n in ("n01", "n02", "n03"))
        for k in range(0, len(stream), 300):
            c.feed(gw, parser, stream[k:k + 300], 100.0)
        changes = [e for e in store.events if e[2] == "node_changed"]
        assert [e[3] for e in changes] == ["n01 -> n02", "n02 -> n03"]  # each node once, when new
        assert len(store.rows) == 60 and all(c.nodes[n].frames == 20 for n in ("n01", "n02", "n03"))
        assert all(c.nodes[n].gaps == c.nodes[n].duplicates == 0 for n in c.nodes)
        # a board swapped on the cable while it was unplugged is news again
        c.link_lost(gw, "unplugged")
        c.link_connected(gw, "/dev/gw")
        c.feed(gw, parser, _line("n09", 0), 100.0)
        assert [e[3] for e in store.events if e[2] == "node_changed"][-1] == "n03 -> n09"


def test_copies_through_the_gateway_are_relayed_not_replays(tmp_path: Path) -> None:
    c, store = _collector(tmp_path)
    own = c.add_port(PortSpec(label="n02-cable", path="/dev/n02"))
    gw = c.add_port(PortSpec(label="gw", path="/dev/gw"))
    p_own, p_gw = FrameParser(), FrameParser()
    for s in range(30):
        c.feed(own, p_own, _line("n02", s), 100.0)
        # the gateway relays n02's frame a little later, between its own
        c.feed(gw, p_gw, _line("n01", s) + (_line("n02", s - 2) if s >= 2 else b""), 100.0)
    st = c.nodes["n02"]
    assert st.frames == 30 and st.relayed == 28 and st.sec_rejects == 0 and c.sec_rejects == 0
    assert not [e for e in store.events if e[2] in ("security", "duplicate", "gap")]
    assert sorted(r[6] for r in store.rows if r[4] == "n02") == list(range(30))  # stored once
    c.feed(gw, p_gw, _line("n02", 23), 100.0)  # a relay 6 frames late is still a copy
    assert c.nodes["n02"].relayed == 29 and c.sec_rejects == 0
    # an old frame replayed through the gateway, beyond the relay window: a replay
    for s in range(30, 110):
        c.feed(own, p_own, _line("n02", s), 100.0)
    c.feed(gw, p_gw, _line("n02", 20), 100.0)  # 89 frames old
    assert c.nodes["n02"].sec_rejects == 1 and c.nodes["n02"].security == {"replay": 1}


def test_a_replay_on_a_nodes_only_port_is_still_a_security_reject(tmp_path: Path) -> None:
    c, store = _collector(tmp_path)
    own = c.add_port(PortSpec(label="n02-cable", path="/dev/n02"))
    parser = FrameParser()
    for s in range(10):
        c.feed(own, parser, _line("n02", s), 100.0)
    c.feed(own, parser, _line("n02", 8), 100.0)
    assert c.nodes["n02"].security == {"replay": 1} and c.nodes["n02"].relayed == 0
    assert [e[2] for e in store.events].count("security") == 1
