"""`canopy sim --mesh` configuration and `canopy mesh` run-time controls (host side)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canopy_host import mesh_sim
from canopy_host import security as hs
from canopy_host.cli import main as cli_main
from canopy_host.errors import CanopyError
from canopy_host.sim import SimConfig, Supervisor

IDS = ["n01", "n02", "n03", "n04"]


def test_topologies_are_symmetric_and_as_named() -> None:
    line = mesh_sim.neighbours(IDS, "line")
    assert line == {"n01": ["n02"], "n02": ["n01", "n03"], "n03": ["n02", "n04"], "n04": ["n03"]}
    ring = mesh_sim.neighbours(IDS, "ring")
    assert ring["n01"] == ["n02", "n04"] and ring["n04"] == ["n01", "n03"]
    full = mesh_sim.neighbours(IDS, "full")
    assert all(len(v) == 3 for v in full.values())
    for topo in (line, ring, full):
        for a, peers in topo.items():
            assert all(a in topo[b] for b in peers)


def test_sections_and_bad_options() -> None:
    sec = mesh_sim.mesh_sections(IDS, mesh_sim.MeshSpec("line", gateway="n02", base_port=46000))
    assert [sec[n]["port"] for n in IDS] == [46000, 46001, 46002, 46003]
    assert sec["n03"]["peers"] == {"n02": 46001, "n04": 46003}
    assert [n for n in IDS if sec[n]["gateway"]] == ["n02"]
    auto = mesh_sim.mesh_sections(IDS, mesh_sim.MeshSpec("full"))
    assert len({auto[n]["port"] for n in IDS}) == 4 and auto["n01"]["gateway"]
    for bad in (mesh_sim.MeshSpec("star"), mesh_sim.MeshSpec(loss=1.5), mesh_sim.MeshSpec(ttl=0),
                mesh_sim.MeshSpec(gateway="n09")):
        with pytest.raises(CanopyError):
            bad.validate(IDS)


def test_sim_writes_mesh_sections_and_keys(tmp_path: Path) -> None:
    master = bytes(range(32))
    cfg = SimConfig(nodes=3, directory=tmp_path / "sim", mesh=mesh_sim.MeshSpec("line"), master_key=master)
    cfg.validate()
    Supervisor(cfg)._prepare_nodes()  # folders only; no processes
    for nid in ("n01", "n02", "n03"):
        folder = tmp_path / "sim" / nid
        sim = json.loads((folder / "sim.json").read_text())
        assert "auth" not in sim and sim["mesh"]["gateway"] == (nid == "n01")
        assert hs.read_key_file(folder / "canopy_key.json") == (nid, hs.derive_node_key(master, nid))
    # the same folders without a master key: keys removed, dev mode said explicitly
    cfg2 = SimConfig(nodes=3, directory=tmp_path / "sim")
    Supervisor(cfg2)._prepare_nodes()
    sim = json.loads((tmp_path / "sim" / "n02" / "sim.json").read_text())
    assert sim["auth"] == "dev" and "mesh" not in sim
    assert not (tmp_path / "sim" / "n02" / "canopy_key.json").exists()


def _state(tmp_path: Path) -> Path:
    nodes = []
    for nid in IDS:
        folder = tmp_path / nid
        folder.mkdir()
        nodes.append({"node_id": nid, "folder": str(folder), "mesh": {"port": 1}})
    p = tmp_path / "state.json"
    p.write_text(json.dumps({"version": 1, "nodes": nodes}))
    return p


def test_mesh_command_writes_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = str(_state(tmp_path))
    assert cli_main(["mesh", "--state", st, "partition", "n01,n02", "n03"]) == 0
    assert mesh_sim.read_control(tmp_path / "n01") == {"blocked": ["n03"]}
    assert mesh_sim.read_control(tmp_path / "n03") == {"blocked": ["n01", "n02"]}
    assert mesh_sim.read_control(tmp_path / "n04") == {}  # in no group: keeps its links
    assert cli_main(["mesh", "--state", st, "down", "n02"]) == 0
    assert mesh_sim.read_control(tmp_path / "n02") == {"blocked": ["n03"], "down": True}
    assert cli_main(["mesh", "--state", st, "heal"]) == 0
    assert all(mesh_sim.read_control(tmp_path / n) == {} for n in IDS)
    assert cli_main(["mesh", "--state", st, "loss", "0.25", "--node", "n04"]) == 0
    assert mesh_sim.read_control(tmp_path / "n04") == {"loss": 0.25}
    assert cli_main(["mesh", "--state", st, "status"]) == 0
    assert "n04  up  blocked=-  loss=0.25" in capsys.readouterr().out
    for bad in (["partition", "n01"], ["down", "n09"], ["loss", "x"], ["loss", "2"], ["down"]):
        assert cli_main(["mesh", "--state", st, *bad]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("canopy mesh: error:") == 5
    assert cli_main(["mesh", "--state", str(tmp_path / "missing.json"), "status"]) == 2
