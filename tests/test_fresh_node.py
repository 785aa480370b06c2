"""A fresh node from nothing to stored frames, with no hardware.

1. `canopy flash` writes a MicroPython image to a fake ESP32 ROM bootloader on
   socket:// (the real esptool talks to it) - the "factory fresh board" step.
2. `canopy deploy` builds the app for that board (xtensawin .mpy) - checked - but a
   fake ROM cannot run MicroPython, so the app is deployed to a virtual node instead:
   the closest stand-in for that board after it boots (same firmware, same raw REPL,
   same files; unix-port sources instead of xtensawin .mpy, simulated sensor). A fresh
   virtual node's flash folder is empty; the deploy fills it.
3. Deploying provisions it (identity + key, registry by MAC) and runs the acceptance
   test; `canopy provision` then finds the board by its MAC.
4. The node runs the DEPLOYED app (its hello carries the deployed app hash; the
   repository copy it could fall back to has none) and `canopy monitor`, bounded to a
   few seconds, stores its frames in SQLite.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

from canopy_host import cli, deploy
from canopy_host.boards import load_board
from canopy_host.provision import sim_mac
from canopy_host.registry import Registry
from canopy_host.sim import SimConfig, Supervisor
from fake_esp import FakeConfig, FakeEsp
from fake_esp.images import build_image

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")

FAST = 2_000_000


@pytest.fixture(autouse=True)
def _private_counter(tmp_path: Path, monkeypatch) -> None:
    # The authenticated ping draws host command counters; keep them out of the repo's var/.
    monkeypatch.setattr(deploy, "DEFAULT_COUNTER_FILE", tmp_path / "counter.json")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def test_fresh_node_flash_deploy_provision_monitor(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(tmp_path / "master.key"))

    # 1. flash the MicroPython image onto the (fake) factory-fresh ESP32
    image = tmp_path / "ESP32_GENERIC-test.bin"
    image.write_bytes(build_image("ESP32", 40_000, seed=3))
    board = load_board("esp32-devkitc")
    with FakeEsp(FakeConfig(chip="ESP32", mac=bytes.fromhex("240ac4aabbcc"), initial_baud=FAST)) as dev:
        rc, out, err = _cli(capsys, "flash", "--quiet", "--connect-attempts", "1", "--board", board.name,
                            "--firmware", str(image), "--port", dev.url, "--baud", str(FAST))
        flashed = bytes(dev.flash[board.flash_offset:board.flash_offset + len(image.read_bytes())])
    assert rc == 0, err
    assert flashed == image.read_bytes()
    assert json.loads(out)["nodes"][0]["mac"] == "24:0a:c4:aa:bb:cc"

    # 2. the app for that board compiles (what deploy would copy to it)
    real = deploy.build_bundle(board)
    assert all(p.endswith(".mpy") for p in real.paths if p.startswith("canopy/"))

    # 2-3. deploy + provision the stand-in: a virtual node with an empty flash folder
    with Supervisor(SimConfig(nodes=1, directory=tmp_path / "sim", speed=10.0, fresh=True)) as sup:
        node = sup.nodes[0]
        assert not (node.folder / "main.py").exists() and not (node.folder / "canopy").exists()
        rc, out, err = _cli(capsys, "deploy", "--board", "unix-sim", "--port", f"sim:{node.node_id}",
                            "--sim-state", str(sup.cfg.state_path), "--zone", "A", "--quiet")
        assert rc == 0, err
        rep = json.loads(out)["nodes"][0]
        assert rep["flashed"] and rep["provisioned"] and rep["healthy"], rep
        assert rep["acceptance"]["chip_id"] == 0x60
        assert (node.folder / "main.py").exists() and (node.folder / "identity.json").exists()

        rc, out, err = _cli(capsys, "provision", "--port", node.port)  # no --board: known by MAC
        assert rc == 0, err
        prov = json.loads(out)
        assert prov["was_known"] and prov["node_id"] == node.node_id and prov["mac"] == sim_mac(node.node_id)
        rec = Registry.load(tmp_path / "nodes.json").nodes[node.node_id]
        assert rec["healthy"] is True and rec["app_hash"] == rep["app_hash"] and rec["zone"] == "A"

        # 4. the node starts: provision soft-reset it into the app with its identity and key
        db = tmp_path / "m.db"
        rc, out, err = _cli(capsys, "monitor", node.port, "--db", str(db), "--json", "--duration", "4")
    assert rc == 0, err
    con = sqlite3.connect(db)
    kinds = dict(con.execute("SELECT kind, COUNT(*) FROM frames WHERE node=? GROUP BY kind", (node.node_id,)))
    assert kinds.get("reading", 0) >= 3, kinds
    hellos = [json.loads(x) for (x,) in con.execute(
        "SELECT extra FROM frames WHERE node=? AND kind='hello'", (node.node_id,))]
    # the deployed app runs: its hello carries the deployed hash (capped at 16, or 10
    # characters in a tagged hello, docs/security.md); the repository copy says "dev"
    assert hellos and all(len(h["fw_hash"]) >= 10 and rep["app_hash"].startswith(h["fw_hash"]) for h in hellos), hellos
