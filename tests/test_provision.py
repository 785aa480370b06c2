"""`canopy provision` and the node registry: identity + key onto virtual nodes, MAC -> id.

The MAC a virtual node reports is read through the raw REPL exactly as on a chip
(`machine.unique_id()`; `network.WLAN().config('mac')` agrees), so these tests check
the registry logic against what the node says, not against the host's own derivation
alone. Keys are checked with the standard library's HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path

import pytest

from canopy_host import cli, ports
from canopy_host.deploy import connect
from canopy_host.errors import CanopyError
from canopy_host.provision import provision_node, read_facts, sim_mac
from canopy_host.registry import Registry, normalise_mac
from canopy_host.security import KEY_FILE_NAME, read_key_file
from canopy_host.sim import SimConfig, Supervisor

MASTER = b"\x5a" * 32

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("prov")
    with Supervisor(SimConfig(nodes=2, directory=d / "sim", speed=10.0)) as s:
        yield s


@pytest.fixture
def env(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    key = tmp_path / "master.key"
    key.write_text(MASTER.hex() + "\n")
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(key))
    return tmp_path / "nodes.json"


def _provision(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = cli.main(["provision", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, (json.loads(out) if out.strip() else None), err


# -- registry (no node needed) -----------------------------------------------------------

def test_mac_forms_normalise() -> None:
    assert normalise_mac("24:0A:C4:12:34:56") == "24:0a:c4:12:34:56"
    assert normalise_mac("240ac4123456") == "24:0a:c4:12:34:56"
    assert normalise_mac(bytes.fromhex("240ac4123456")) == "24:0a:c4:12:34:56"
    for bad in ("24:0a:c4", "zz:0a:c4:12:34:56", "240ac41234567"):
        with pytest.raises(CanopyError):
            normalise_mac(bad)


def test_registry_refuses_one_mac_under_two_ids(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.json")
    reg.update("n01", mac="02:00:00:00:00:01")
    with pytest.raises(CanopyError, match="already registered as n01"):
        reg.update("n02", mac="02:00:00:00:00:01")
    reg.save()
    assert Registry.load(tmp_path / "r.json").by_mac("020000000001") == "n01"


def test_shared_usb_serial_is_not_trusted_without_location(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.json")
    reg.update("n01", mac="02:00:00:00:00:01", usb_serial="0001", location="1-1.1")
    reg.update("n02", mac="02:00:00:00:00:02", usb_serial="0001", location="1-1.2")
    reg.update("n03", mac="02:00:00:00:00:03", usb_serial="A5069RR4")
    assert reg.by_usb("0001", None) is None  # every CP2102 says 0001
    assert reg.by_usb("0001", "1-1.2") == "n02"  # the USB port path is a hint
    assert reg.by_usb("A5069RR4", "9-9") == "n03"  # a real serial number identifies
    # ports.py (canopy ports) uses the same rules
    info = ports.PortInfo(device="/dev/ttyUSB0", vid=0x10C4, pid=0xEA60, serial_number="0001",
                          description="CP2102", location="1-1.1")
    assert ports.lookup_node_id(info, reg.nodes) == "n01"


def test_broken_registry_is_a_clear_error_for_writers(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    p.write_text("{not json")
    assert Registry.load(p).nodes == {}  # readers (canopy ports) carry on
    with pytest.raises(CanopyError, match="cannot read the node registry"):
        Registry.load(p, strict=True)


# -- provisioning virtual nodes ------------------------------------------------------------

@linux_only
def test_node_reports_a_stable_mac_both_ways(sup) -> None:
    node = sup.nodes[0]
    t = connect(node.port, soft_reset=False)
    try:
        facts = read_facts(t)
        wlan = t.exec("import network, binascii\nprint(binascii.hexlify(network.WLAN(network.STA_IF).config('mac')).decode())")
    finally:
        t.exit_raw_repl()
        t.close()
    assert facts.mac == sim_mac(node.node_id) == normalise_mac(wlan.decode().strip())
    assert int(facts.mac[:2], 16) & 0x03 == 0x02  # locally administered, unicast
    assert sim_mac("n01") != sim_mac("n02")


@linux_only
def test_provision_writes_identity_and_key_and_registers_mac(sup, env: Path, capsys) -> None:
    node = sup.nodes[0]
    rc, doc, err = _provision(capsys, "--port", node.port, "--board", "unix-sim", "--zone", "A")
    assert rc == 0, err
    assert doc["node_id"] == node.node_id and doc["mac"] == sim_mac(node.node_id) and not doc["was_known"]
    ident = json.loads((node.folder / "identity.json").read_text())
    keyf = json.loads((node.folder / KEY_FILE_NAME).read_text())
    want = hmac.new(MASTER, b"canopy/node-key/v1/" + node.node_id.encode(), hashlib.sha256).digest()
    assert keyf == {"v": 1, "node_id": node.node_id, "key": want.hex()}  # docs/security.md format
    assert read_key_file(node.folder / KEY_FILE_NAME) == (node.node_id, want)  # the security module's reader
    kid = hashlib.sha256(want).hexdigest()[:16]
    assert ident == {"version": 1, "node_id": node.node_id, "zone": "A", "key_id": kid}
    reg = Registry.load(env)
    assert reg.by_mac(doc["mac"]) == node.node_id
    rec = reg.nodes[node.node_id]
    assert rec["board"] == "unix-sim" and rec["zone"] == "A" and rec["key_id"] == kid
    assert MASTER.hex() not in env.read_text() and keyf["key"] not in env.read_text()  # no secrets
    # Again, without --board/--zone: the MAC says who it is, zone kept.
    rc, doc2, err = _provision(capsys, "--port", node.port)
    assert rc == 0 and doc2["was_known"] and doc2["node_id"] == node.node_id and doc2["zone"] == "A", err
    # --list shows the registry
    rc, listing, _ = _provision(capsys, "--list")
    assert rc == 0 and listing["nodes"][node.node_id]["mac"] == doc["mac"]


@linux_only
def test_two_boards_with_the_same_usb_serial_are_told_apart_by_mac(sup, env: Path, capsys) -> None:
    a, b = sup.nodes
    for node in (a, b):  # both bridges report the factory serial "0001"
        rc, doc, err = _provision(capsys, "--port", node.port, "--board", "unix-sim", "--usb-serial", "0001")
        assert rc == 0, err
    reg = Registry.load(env)
    assert reg.nodes[a.node_id]["usb_serial"] == reg.nodes[b.node_id]["usb_serial"] == "0001"
    assert reg.by_usb("0001", None) is None  # the serial alone cannot say which is which
    # The MAC read from whichever board is on a port identifies it.
    for node in (b, a):
        t = connect(node.port, soft_reset=False)
        try:
            mac = read_facts(t).mac
        finally:
            t.exit_raw_repl()
            t.close()
        assert reg.by_mac(mac) == node.node_id


@linux_only
def test_known_board_cannot_be_renamed_by_accident(sup, env: Path, capsys) -> None:
    node = sup.nodes[1]
    assert _provision(capsys, "--port", node.port, "--board", "unix-sim")[0] == 0
    rc, _, err = _provision(capsys, "--port", node.port, "--node-id", "n77")
    assert rc == 2 and f"registered as {node.node_id}" in err
    rc, _, err = _provision(capsys, "--port", sup.nodes[0].port, "--board", "unix-sim", "--node-id", node.node_id)
    assert rc == 2 and "already belongs" in err


@linux_only
def test_new_board_gets_the_requested_id(sup, tmp_path: Path) -> None:
    node = sup.nodes[1]
    t = connect(node.port, soft_reset=False)
    try:
        res = provision_node(t, "unix-sim", MASTER, zone="C", node_id="bench7", registry_path=tmp_path / "r.json")
    finally:
        t.exit_raw_repl()
        t.close()
    assert res.node_id == "bench7" and not res.was_known
    assert res.warning and node.node_id in res.warning  # the app calls itself by its own id
    assert json.loads((node.folder / "identity.json").read_text())["node_id"] == "bench7"
    assert Registry.load(tmp_path / "r.json").by_mac(sim_mac(node.node_id)) == "bench7"


def test_provision_errors_are_clear(tmp_path: Path, env: Path, capsys) -> None:
    rc, _, err = _provision(capsys, "--port", str(tmp_path / "ttyNONE"), "--board", "unix-sim")
    assert rc == 2 and "cannot open" in err
    rc, _, err = _provision(capsys, "--port", "x", "--board", "nonesuch")
    assert rc == 2 and "unknown board" in err
    rc, _, err = _provision(capsys, "--port", "sim:n05", "--sim-state", str(tmp_path / "missing.json"))
    assert rc == 2 and "no virtual nodes" in err
