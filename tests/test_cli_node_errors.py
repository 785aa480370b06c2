"""User mistakes that involve a node: `canopy repair` against nodes that hold a mesh key,
and `canopy provision` failing half way. One keyed virtual node (the real firmware in the
unix port, on a pty) serves every test."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from canopy_host.cli import main
from canopy_host.sim import SimConfig, Supervisor
from canopy_host.transport import open_port

MASTER = bytes(range(32))

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory):
    """One strict node (it holds a key derived from MASTER); the state file names no key,
    as after `canopy sim` + `canopy deploy`, which keys the nodes with the default key."""
    d = tmp_path_factory.mktemp("keyed")
    key_file = d / "master.key"
    key_file.write_text(MASTER.hex() + "\n")
    key_file.chmod(0o600)
    with Supervisor(SimConfig(nodes=1, directory=d / "sim", speed=10.0, master_key=MASTER)) as sup:
        yield {"dir": d, "state": sup.cfg.state_path, "key": key_file, "port": sup.nodes[0].port}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _shadow(d: Path) -> Path:
    path = d / "shadow.json"
    path.write_text(json.dumps({"config": {}, "nodes": {"n01": {}}}))
    return path


def test_repair_without_the_key_says_so_at_once(keyed, tmp_path, capsys):
    db = tmp_path / "journal.db"
    t0 = time.monotonic()
    code, _, err = run(capsys, "repair", "--shadow", str(_shadow(tmp_path)), "--sim-state", str(keyed["state"]),
                       "--db", str(db), "--deadline", "8", "--timeout", "2")
    took = time.monotonic() - t0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "n01" in lines[0] and "err=auth" in lines[0] and "--master-key" in lines[0]
    assert took < 8  # told, not retried until the deadline
    if db.exists():  # no job journaled that could never succeed
        con = sqlite3.connect(db)
        assert con.execute("SELECT COUNT(*) FROM repair_jobs").fetchone()[0] == 0
        con.close()


def test_repair_takes_the_key_the_sim_state_names(keyed, tmp_path, capsys):
    state = json.loads(Path(keyed["state"]).read_text())
    state["master_key_file"] = str(keyed["key"])  # what `canopy sim --master-key FILE` records
    named = tmp_path / "state.json"
    named.write_text(json.dumps(state))
    code, out, err = run(capsys, "repair", "--shadow", str(_shadow(tmp_path)), "--sim-state", str(named),
                         "--db", str(tmp_path / "j.db"), "--dry-run", "--timeout", "2")
    assert code == 0, err
    assert "no status" not in err and "dry run" in out


def _frames_after(port: str, seconds: float) -> bytes:
    p = open_port(port, timeout=0.1)
    try:
        p.reset_input_buffer()
        end, got = time.monotonic() + seconds, b""
        while time.monotonic() < end and b"@CNP1" not in got:
            got += p.read(4096)
        return got
    finally:
        p.close()


def test_provision_that_fails_leaves_the_app_running(keyed, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "empty-registry.json"))
    # An unknown MAC without --board: refused after the app was stopped to read the MAC.
    code, _, err = run(capsys, "provision", "--port", keyed["port"], "--master-key", str(keyed["key"]))
    assert code == 2 and "--board" in err
    assert b"@CNP1" in _frames_after(keyed["port"], 8.0)  # the node is back at work, not at the REPL


def test_provision_refuses_a_chip_board_for_a_virtual_node(keyed, tmp_path, capsys, monkeypatch):
    registry = tmp_path / "nodes.json"
    monkeypatch.setenv("CANOPY_REGISTRY", str(registry))
    code, out, err = run(capsys, "provision", "--port", keyed["port"], "--board", "esp32-devkitc",
                         "--master-key", str(keyed["key"]))
    assert code == 2 and out == ""
    assert "does not fit this node" in err and "--board unix-sim" in err
    assert not registry.exists()  # the wrong board was not recorded
    assert b"@CNP1" in _frames_after(keyed["port"], 8.0)


def test_repair_with_another_mesh_key_names_the_key_not_an_outage(keyed, tmp_path):
    from canopy_host.repair import NodeOffline, SerialClient
    from canopy_host.security import HostAuth

    other = HostAuth(bytes(range(1, 33)), tmp_path / "counter.json")  # not the nodes' master key
    client = SerialClient({"n01": keyed["port"]}, timeout=2.0, auth=other)
    try:
        with pytest.raises(NodeOffline) as err:
            client.request("n01", "status", {})
    finally:
        client.close()
    assert "does not verify" in str(err.value) and "--master-key" in str(err.value)
