"""`canopy deploy` with a mesh gateway: the acceptance test pings the node over the mesh.

Three virtual nodes on a line n01 (gateway) - n02 - n03 (`canopy sim --mesh line`,
UDP radios), so n03 is two radio hops from the gateway and out of its range: its
answer can only reach the host by being relayed. What is checked against what:
- the answer: a `status` reply that arrived on the GATEWAY's pty, from n03, whose
  `re=` is a counter the host sent and whose HMAC tag verifies under the key derived
  here with the standard library (HMAC-SHA256(master, "canopy/node-key/v1/" + id));
- the failure: with the mesh partitioned (`canopy mesh partition`, the real CLI) the
  same deploy is flashed but not healthy, with the reason and a hint, in the report,
  the registry and the CLI's summary.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from pathlib import Path

import pytest

from canopy_host import cli, deploy
from canopy_host.boards import load_board
from canopy_host.mesh_sim import MeshSpec
from canopy_host.protocol import FrameParser
from canopy_host.registry import Registry
from canopy_host.sim import SimConfig, Supervisor
from canopy_host.transport import open_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")

MASTER = bytes(range(100, 132))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("deploymesh")
    cfg = SimConfig(nodes=3, directory=d / "sim", speed=10.0, mesh=MeshSpec("line", gateway="n01"),
                    master_key=MASTER)
    with Supervisor(cfg) as s:
        s.write_state()
        yield s


@pytest.fixture(autouse=True)
def _private_counter(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    # One counter file for the module: the nodes remember the highest counter they accepted.
    path = Path(tmp_path_factory.getbasetemp()) / "deploymesh-counter.json"
    monkeypatch.setattr(deploy, "DEFAULT_COUNTER_FILE", path)
    # A partitioned mesh never answers: wait less than a real deploy would.
    monkeypatch.setattr(deploy, "MESH_PING_TIMEOUT_S", 4.0)
    monkeypatch.setattr(deploy, "MESH_RESEND_S", 1.0)


def _key(nid: str) -> bytes:
    return hmac.new(MASTER, b"canopy/node-key/v1/" + nid.encode(), hashlib.sha256).digest()


def _tag_ok(raw: bytes, key: bytes) -> bool:
    body, _, tag = raw.rpartition(b" *")[0].rpartition(b" !")
    return hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest()[:16].hex(), tag.decode().lower())


def _cli(args: list[str], tmp: Path, capsys, monkeypatch) -> tuple[int, dict, str]:
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp / "nodes.json"))
    key_file = tmp / "master.key"
    key_file.write_text(MASTER.hex() + "\n")
    key_file.chmod(0o600)
    rc = cli.main(["deploy", "--board", "unix-sim", "--quiet", "--master-key", str(key_file), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, json.loads(out), " ".join(err.split())  # rich wraps the summary at the terminal width


def test_gateway_from_sim_state_and_hops(mesh) -> None:
    state = mesh.state()
    gw = deploy.gateway_from_sim_state(state)
    assert gw is not None and gw.node_id == "n01" and gw.port == mesh.node("n01").port and gw.ttl == 4
    assert [gw.hops_to(n) for n in ("n01", "n02", "n03", "n09")] == [0, 1, 2, None]
    # an explicit port names the gateway even when another node is marked
    other = deploy.gateway_from_sim_state(state, mesh.node("n02").port)
    assert other is not None and other.node_id == "n02" and other.hops_to("n03") == 1
    assert deploy.gateway_from_sim_state({"nodes": [{"node_id": "x", "port": "/dev/null"}]}) is None


def test_deploy_through_gateway_answers_mesh_ping_then_partition_fails_it(mesh, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    state = str(mesh.cfg.state_path)
    rc, doc, err = _cli(["--port", "sim:n03", "--gateway", "sim:n01", "--sim-state", state],
                        tmp_path, capsys, monkeypatch)
    assert rc == 0, err
    (r,) = doc["nodes"]
    assert r["node_id"] == "n03" and r["flashed"] and r["healthy"], r["problems"]
    m = r["mesh_ping"]
    assert m["answered"] is True and m["tag"] == "ok" and m["rtt_ms"] > 0
    assert m["via"] == {"port": mesh.node("n01").port, "node": "n01"}
    assert m["hops"] == 2 and m["ttl"] == 4
    assert "mesh ping" in err and "via n01, 2 hop(s)" in err

    # Partition n03 off: the node itself is fine (its own cable answers the link ping),
    # but the gateway no longer hears it.
    assert cli.main(["mesh", "--state", state, "partition", "n01,n02", "n03"]) == 0
    capsys.readouterr()
    try:
        time.sleep(0.3)  # the radios re-read mesh.json when it changes
        rc, doc, err = _cli(["--port", "sim:n03", "--gateway", "sim:n01", "--sim-state", state],
                            tmp_path, capsys, monkeypatch)
    finally:
        assert cli.main(["mesh", "--state", state, "heal"]) == 0
        capsys.readouterr()
    assert rc == 1
    (r,) = doc["nodes"]
    assert r["flashed"] and not r["healthy"] and r["ping"]["answered"], r
    m = r["mesh_ping"]
    assert m["answered"] is False and m["sent"] >= 2 and m["frames_from_node"] == 0
    assert m["frames_from_others"] > 0  # the gateway itself is alive: the node is cut off
    (why,) = [p for p in r["problems"] if "mesh ping" in p]
    assert "through the gateway n01" in why and "nothing from n03" in why and "Hint:" in why
    assert "canopy mesh" in why
    assert "flashed" in err and "NOT healthy" in err and "mesh ping" in err
    rec = Registry.load(tmp_path / "nodes.json").nodes["n03"]
    assert rec["flashed"] is True and rec["healthy"] is False

    # Healed: the same deploy is healthy again.
    time.sleep(0.3)
    rc, doc, err = _cli(["--port", "sim:n03", "--sim-state", state], tmp_path, capsys, monkeypatch)
    assert rc == 0, err
    assert doc["nodes"][0]["mesh_ping"]["answered"]  # gateway found in the sim state, no --gateway


def test_mesh_ping_reply_arrives_on_the_gateway_port_with_a_valid_tag(mesh, tmp_path: Path) -> None:
    # deploy_node with a Gateway (the library API) on a one-hop node; then the same
    # exchange by hand on the gateway's port (one reader at a time: a second would steal
    # bytes), its reply's tag checked with the standard library's HMAC.
    board = load_board("unix-sim")
    reg = tmp_path / "nodes.json"
    rep = deploy.deploy_node(mesh.node("n02").port, board, deploy.build_bundle(board), MASTER,
                             registry_path=reg, gateway=deploy.gateway_from_sim_state(mesh.state()))
    assert rep.healthy and rep.mesh_ping["answered"] and rep.mesh_ping["hops"] == 1, rep

    from canopy_host.security import CommandCounter, tag_command

    counter = CommandCounter(deploy.DEFAULT_COUNTER_FILE)
    c = counter.next()
    parser = FrameParser()
    got = None
    with open_port(mesh.node("n01").port, timeout=0.1) as ser:
        ser.write(tag_command(_key("n03"), "n03", c, "status"))
        deadline = time.monotonic() + 8
        while got is None and time.monotonic() < deadline:
            for fr in parser.feed(ser.read(4096)):
                if fr.kind == "reply" and fr.node == "n03" and fr.fields.get("re") == c:
                    got = fr
    assert got is not None, "n03 did not answer through the gateway"
    assert _tag_ok(got.raw, _key("n03")) and not _tag_ok(got.raw, _key("n01"))


def test_deploy_all_with_the_gateway_among_the_ports(mesh, tmp_path: Path) -> None:
    # The gateway itself is reset and in the raw REPL during its own deploy: the mesh
    # pings run after every deploy, and the gateway's own is "not checked".
    board = load_board("unix-sim")
    ports = [n.port for n in mesh.nodes]
    reports = deploy.deploy_nodes(ports, board, MASTER, registry_path=tmp_path / "nodes.json",
                                  gateway=deploy.gateway_from_sim_state(mesh.state()))
    got = {r.node_id: r for r in reports}
    assert all(r.healthy for r in reports), [r.problems for r in reports]
    assert got["n01"].mesh_ping == "not checked (the node is the gateway)"
    assert [got[n].mesh_ping["hops"] for n in ("n02", "n03")] == [1, 2]
    assert all(got[n].mesh_ping["answered"] for n in ("n02", "n03"))


def test_no_gateway_is_reported_as_not_checked(tmp_path: Path, capsys, monkeypatch) -> None:
    # Without a mesh (and without --gateway) the report says why there is no mesh ping.
    r = deploy.NodeReport(port="x", board="unix-sim")
    assert r.to_json()["mesh_ping"] == "not checked (no gateway)"
    with Supervisor(SimConfig(nodes=1, directory=tmp_path / "sim", speed=10.0)) as s:
        s.write_state()
        rc, doc, err = _cli(["--port", "sim:n01", "--sim-state", str(s.cfg.state_path)], tmp_path, capsys,
                            monkeypatch)
    assert rc == 0, err
    assert doc["nodes"][0]["mesh_ping"] == "not checked (no gateway)" and doc["nodes"][0]["healthy"]
    assert "mesh ping not checked (no gateway)" in err


def test_bad_gateway_port_is_a_clear_failure(mesh, tmp_path: Path, capsys, monkeypatch) -> None:
    rc, doc, err = _cli(["--port", "sim:n02", "--gateway", str(tmp_path / "ttyNOPE"),
                         "--sim-state", str(mesh.cfg.state_path)], tmp_path, capsys, monkeypatch)
    assert rc == 1
    (r,) = doc["nodes"]
    assert r["flashed"] and not r["healthy"]
    assert "cannot open the gateway port" in r["mesh_ping"]["error"]
    assert any("--gateway" in p for p in r["problems"])
