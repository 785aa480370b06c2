"""The mesh on UDP loopback: multi-hop through a gateway, TTL, loss, partitions, node loss."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from canopy_host import security as hs
from canopy_host.protocol import FrameParser
from canopy_host.unixport import call_batch
from conftest import MPY_TEST_DIR

MASTER = bytes(range(100, 132))
IDS = ("n01", "n02", "n03")


def _ports(k: int) -> list[int]:
    # free UDP ports right now (closed again before the nodes bind them)
    socks = []
    for _ in range(k):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _line(tmp: Path, steps: list, ttl: int = 4, keys: bool = True, **extra: dict) -> dict:
    """n01 (gateway, wired to the host) - n02 - n03: n03 is out of n01's range."""
    p = dict(zip(IDS, _ports(3)))
    nodes = {
        "n01": {"port": p["n01"], "peers": {"n02": p["n02"]}, "gateway": True},
        "n02": {"port": p["n02"], "peers": {"n01": p["n01"], "n03": p["n03"]}},
        "n03": {"port": p["n03"], "peers": {"n02": p["n02"]}},
    }
    for nid in IDS:
        if keys:
            nodes[nid]["key"] = hs.derive_node_key(MASTER, nid).hex()
        nodes[nid].update(extra.get(nid, {}))
    spec = {"dir": str(tmp), "ttl": ttl, "nodes": nodes, "steps": steps}
    return call_batch("mesh_harness", "mesh_run", [[spec]], extra_path=[MPY_TEST_DIR], timeout=60)[0]


def _gateway_frames(res: dict):
    p = FrameParser()
    return p.feed(bytes.fromhex(res["n01"]["out"]))


def test_command_reaches_a_node_two_hops_away_and_its_reply_comes_back(tmp_path: Path) -> None:
    key3 = hs.derive_node_key(MASTER, "n03")
    cmd = hs.tag_command(key3, "n03", 1, "identify", {"seconds": 7})
    res = _line(tmp_path, [["pump", 2], ["host", cmd.hex()], ["pump", 3]])
    assert res["n03"]["calls"] == [["identify", 7]]
    assert res["n01"]["calls"] == [] and res["n02"]["calls"] == []
    frames = _gateway_frames(res)
    replies = [f for f in frames if f.kind == "reply" and f.node == "n03"]
    assert [(f.fields["re"], f.fields["seconds"]) for f in replies] == [(1, 7)]
    # every node's frames reach the host through the gateway, tagged end to end
    ver = hs.FrameVerifier.from_master(MASTER, list(IDS))
    verdicts = [ver.verify(f) for f in frames if f.kind != "command"]
    assert set(verdicts) == {"ok"}
    assert {f.node for f in frames} == set(IDS)
    assert res["n01"]["origins"]["n03"] == 2 and res["n01"]["origins"]["n02"] == 1
    assert res["n01"]["neighbours"] == ["n02"]  # n03 is heard only through n02
    assert res["n03"]["mesh"][3] > 0  # duplicates suppressed, not relayed forever


def test_ttl_one_does_not_cross_the_middle_node(tmp_path: Path) -> None:
    res = _line(tmp_path, [["pump", 3]], ttl=1)
    nodes = {f.node for f in _gateway_frames(res)}
    assert nodes == {"n01", "n02"}
    assert res["n02"]["mesh"][1] == 0 and res["n02"]["mesh"][4] > 0  # nothing relayed, all expired


def test_partition_and_node_loss_cut_traffic_and_heal(tmp_path: Path) -> None:
    steps = [
        ["pump", 3],
        ["control", "n02", {"blocked": ["n03"]}], ["control", "n03", {"blocked": ["n02"]}],
        ["pump", 4],
        ["control", "n02", {}], ["control", "n03", {}],
        ["pump", 3],
        ["control", "n02", {"down": True}],
        ["pump", 3],
    ]
    res = _line(tmp_path, steps)
    ticks = {}
    for f in _gateway_frames(res):
        if f.kind == "reading":
            ticks.setdefault(f.node, []).append(f.fields["tick"])
    # FakeNode ticks count pump rounds: 1-3 before, 4-7 partitioned, 8-10 healed, 11-13 n02 down
    assert set(ticks["n03"]) & set(range(4, 8)) == set()
    assert set(ticks["n03"]) & set(range(1, 4)) and set(ticks["n03"]) & set(range(8, 11))
    assert set(ticks["n02"]) & set(range(4, 8))  # the partition was only between n02 and n03
    assert set(ticks["n02"]) & set(range(11, 14)) == set()
    assert set(ticks["n03"]) & set(range(11, 14)) == set()  # its only route was n02


def test_loss_drops_a_share_of_packets(tmp_path: Path) -> None:
    lossy = {"n03": {"loss": 0.5, "seed": 3}}
    res = _line(tmp_path, [["pump", 20]], **lossy)
    n03_ticks = {f.fields["tick"] for f in _gateway_frames(res) if f.kind == "reading" and f.node == "n03"}
    lost = res["n03"]["mesh"][5]
    assert lost > 0 and 0 < len(n03_ticks) < 20
    res = _line(tmp_path, [["pump", 5]], n03={"loss": 1.0})
    assert "n03" not in {f.node for f in _gateway_frames(res)}


def test_unkeyed_dev_mesh_relays_untagged(tmp_path: Path) -> None:
    from canopy_host.protocol import encode_command

    res = _line(tmp_path, [["pump", 1], ["host", encode_command("n03", 4, "identify", {"seconds": 1}).hex()],
                           ["pump", 2]], keys=False)
    assert res["n03"]["calls"] == [["identify", 1]]
    assert not any(f.tag for f in _gateway_frames(res))


def test_packets_never_exceed_250_bytes() -> None:
    """Mesh.send refuses a line that would not fit one ESP-NOW packet with its TTL byte."""
    res = call_batch("mesh_harness", "packet_limits", [[]], extra_path=[MPY_TEST_DIR])[0]
    assert res == [True, False, 250]


def test_delay_holds_packets_for_simulated_time(tmp_path: Path) -> None:
    """2.5 simulated seconds at the gateway's radio: n02's reading of tick k (sent at
    k s) is handed over at the first service at or after k + 2.5 s."""
    def n02_ticks(rounds: int) -> list[int]:
        res = _line(tmp_path, [["pump", rounds]], n01={"delay_ms": 2500})
        return sorted(f.fields["tick"] for f in _gateway_frames(res) if f.kind == "reading" and f.node == "n02")

    assert n02_ticks(3) == []
    assert n02_ticks(6) == [1, 2, 3]


_PROC_NODE = """
import json
from canopy import board, config, hal
from canopy.link import from_flash
from canopy.node import Node
import main
sim = json.load(open("sim.json"))
hw = hal.open(board.load("unix-sim"), sim)
node = Node(hw, config.merged(), boot_id=sim["boot"])
main.loop(node, from_flash(node, repair=False), sim["run_ms"])
"""


def test_two_real_node_processes_gateway_and_remote(tmp_path: Path) -> None:
    """The production path: two unix-port processes, each the real Node with the Link
    from canopy.link.from_flash (key file + sim.json mesh section)."""
    import subprocess
    import time

    from canopy_host.paths import micropython_command
    from canopy_host.unixport import micropython_env

    pa, pb = _ports(2)
    procs = {}
    for nid, port, peer, gw in (("n12", pb, ("n11", pa), False), ("n11", pa, ("n12", pb), True)):
        folder = tmp_path / nid
        folder.mkdir()
        (folder / "canopy_key.json").write_text(hs.key_file_text(hs.derive_node_key(MASTER, nid), nid))
        sim = {"node_id": nid, "seed": 1, "speed": 20, "boot": 3, "run_ms": 400000,
               "mesh": {"port": port, "peers": {peer[0]: peer[1]}, "gateway": gw}}
        (folder / "sim.json").write_text(json.dumps(sim))
        procs[nid] = subprocess.Popen(micropython_command() + ["-c", _PROC_NODE], cwd=folder,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=micropython_env())
    gw = procs["n11"]
    parser = FrameParser()
    frames = []
    sent = False
    deadline = time.monotonic() + 40
    try:
        os.set_blocking(gw.stdout.fileno(), False)
        while time.monotonic() < deadline:
            chunk = gw.stdout.read(4096)
            if chunk:
                frames += parser.feed(chunk)
            if not sent and any(f.node == "n12" for f in frames):
                gw.stdin.write(hs.tag_command(hs.derive_node_key(MASTER, "n12"), "n12", 1, "status"))
                gw.stdin.flush()
                sent = True
            if any(f.node == "n12" and f.kind == "reply" for f in frames):
                break
            time.sleep(0.02)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    reply = [f for f in frames if f.node == "n12" and f.kind == "reply"]
    assert sent and reply, (parser.text_lines[-5:], procs["n12"].stderr.read()[-500:])
    assert reply[0].fields["re"] == 1 and reply[0].fields["auth"] == "strict"
    ver = hs.FrameVerifier.from_master(MASTER, ["n11", "n12"])
    verdicts = {ver.verify(f) for f in frames}
    assert verdicts == {"ok"}
    assert {f.node for f in frames if f.kind == "reading"} == {"n11", "n12"}


def test_espnow_radio_against_a_fake_espnow_module() -> None:
    """EspNowRadio uses the MicroPython espnow calls (broadcast peer, send, any, irecv);
    on one shared 'air' every node hears the frame once, relays it once, drops echoes."""
    counts, relayed, dups, first = call_batch("mesh_harness", "espnow_relay", [[]], extra_path=[MPY_TEST_DIR])[0]
    assert counts == [0, 1, 1] and first == "@CNP1 n0 1 0 E code=boot arg=1 *00000001"
    assert relayed == [0, 1, 1] and dups[0] == 2
