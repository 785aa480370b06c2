"""`canopy deploy` against virtual nodes with the real mpremote (its Python transport).

What is checked against what:
- the files on the node's "flash" (its folder) byte for byte against the sources;
- `.mpy` headers against the MicroPython .mpy format (docs: "MicroPython .mpy files":
  byte 0 'M', byte 1 version 6, byte 2 = arch << 2 for files with native code;
  xtensawin = 10, rv32imc = 11);
- the key file against HMAC-SHA256(master, "canopy/node-key/v1/" + id) computed here
  with the standard library;
- "only changed files" and "repair after an interrupted copy" by editing sources in a
  copy of firmware/ and killing the node's process mid-transfer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from canopy_host import cli, deploy
from canopy_host.boards import load_board
from canopy_host.paths import FIRMWARE_DIR
from canopy_host.provision import sim_mac
from canopy_host.registry import Registry
from canopy_host.sim import SimConfig, Supervisor

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")

MASTER = bytes(range(32))


@pytest.fixture(scope="module")
def _counter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ctr") / "counter.json"


@pytest.fixture(autouse=True)
def _private_counter(_counter_file: Path, monkeypatch) -> None:
    # The authenticated ping draws host command counters; keep them out of the repo's var/,
    # but one file for the module: the nodes remember the highest counter they accepted.
    monkeypatch.setattr(deploy, "DEFAULT_COUNTER_FILE", _counter_file)
MPY_ARCH_CODE = {"xtensawin": 10, "rv32imc": 11}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("deploy")
    with Supervisor(SimConfig(nodes=2, directory=d / "sim", speed=10.0)) as s:
        yield s


@pytest.fixture
def fw(tmp_path: Path) -> Path:
    """A private copy of firmware/ the test may edit."""
    dst = tmp_path / "firmware"
    shutil.copytree(FIRMWARE_DIR, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _key_file(folder: Path) -> dict:
    from canopy_host.security import KEY_FILE_NAME

    return json.loads((folder / KEY_FILE_NAME).read_text())


# -- the bundle ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["esp32-devkitc", "esp32c3-devkitm"])
def test_real_board_bundle_is_mpy_for_its_arch_without_sim_code(name: str) -> None:
    board = load_board(name)
    b = deploy.build_bundle(board)
    paths = b.paths
    assert not any(p.startswith("canopy/sim/") for p in paths)
    assert "main.py" in paths and "board.json" in paths and "canopy/fw_hash.mpy" in paths
    native = 0
    for f in b.files:
        if f.path.startswith("canopy/"):
            assert f.path.endswith(".mpy") and f.data[0:2] == b"M\x06", f.path
            src = FIRMWARE_DIR / (f.path[:-4] + ".py")
            if src.exists() and "@micropython.viper" in src.read_text():
                # the arch is recorded only for files that carry machine code
                assert f.data[2] >> 2 == MPY_ARCH_CODE[board.mpy_arch], f.path
                native += 1
    assert native >= 2  # the viper kernels (conditioning, control)
    main = next(f for f in b.files if f.path == "main.py")
    assert main.data == (FIRMWARE_DIR / "main.py").read_bytes()
    assert next(f for f in b.files if f.path == "board.json").data == board.path.read_bytes()
    # Every node module of the source tree is in the bundle.
    want = {p.relative_to(FIRMWARE_DIR).with_suffix(".mpy").as_posix() for p in (FIRMWARE_DIR / "canopy").glob("*.py")}
    assert want <= paths


def test_virtual_board_bundle_is_the_sources() -> None:
    b = deploy.build_bundle(load_board("unix-sim"))
    for f in b.files:
        if f.path.endswith(".py") and f.path != "canopy/fw_hash.py":
            assert f.data == (FIRMWARE_DIR / f.path).read_bytes(), f.path
    assert any(p.startswith("canopy/sim/") for p in b.paths)
    assert b.files[-1].path == "canopy/fw_hash.py"  # written last: its new value means the rest landed
    assert b.arch is None


def test_app_hash_follows_the_sources(fw: Path) -> None:
    board = load_board("unix-sim")
    h1 = deploy.build_bundle(board, fw).app_hash
    assert deploy.build_bundle(board, fw).app_hash == h1
    (fw / "canopy" / "health.py").write_text((fw / "canopy" / "health.py").read_text() + "\n# edited\n")
    assert deploy.build_bundle(board, fw).app_hash != h1


def test_compile_error_is_a_clear_error(fw: Path) -> None:
    (fw / "canopy" / "broken.py").write_text("def f(:\n")
    with pytest.raises(Exception) as exc:
        deploy.build_bundle(load_board("esp32-devkitc"), fw)
    assert "broken.py" in str(exc.value) and "mpy-cross" in str(exc.value)


# -- deploying to virtual nodes ------------------------------------------------------------

def test_first_deploy_copies_all_provisions_and_is_healthy(sup, tmp_path: Path) -> None:
    node = sup.nodes[0]
    board = load_board("unix-sim")
    bundle = deploy.build_bundle(board)
    reg_path = tmp_path / "nodes.json"
    r = deploy.deploy_node(node.port, board, bundle, MASTER, zone="A", registry_path=reg_path)
    assert r.error is None, r
    assert r.flashed and r.provisioned and r.healthy, r.problems
    assert sorted(r.copied) == sorted(bundle.paths) and r.unchanged == 0
    for f in bundle.files:
        assert (node.folder / f.path).read_bytes() == f.data, f.path
    assert not list(node.folder.rglob("*.part"))
    # acceptance: the simulated BME280 answered with its chip id, readings are plausible
    assert r.acceptance["chip_id"] == 0x60
    assert r.acceptance["ticks"] >= 1 and r.acceptance["readings"] >= 1
    # ping: the app restarted from the deployed files and answered a status command
    assert r.ping["answered"] and r.ping["node_id"] == node.node_id == r.node_id
    assert bundle.app_hash.startswith(r.ping["fw_hash"])  # the deployed copy runs (hello caps it)
    assert r.ping["tagged"]  # the ping carried an HMAC tag under the freshly provisioned key
    # identity and key on the node
    ident = json.loads((node.folder / "identity.json").read_text())
    assert ident["node_id"] == node.node_id and ident["zone"] == "A"
    key = hmac.new(MASTER, b"canopy/node-key/v1/" + node.node_id.encode(), hashlib.sha256).digest()
    assert _key_file(node.folder) == {"v": 1, "node_id": node.node_id, "key": key.hex()}
    # registry: MAC -> id, flashed and healthy recorded separately
    reg = Registry.load(reg_path)
    assert reg.by_mac(sim_mac(node.node_id)) == node.node_id
    rec = reg.nodes[node.node_id]
    assert rec["flashed"] is True and rec["healthy"] is True and rec["app_hash"] == bundle.app_hash
    assert rec["key_id"] == ident["key_id"] == hashlib.sha256(key).hexdigest()[:16]


def test_second_deploy_copies_only_changed_files(sup, fw: Path, tmp_path: Path) -> None:
    node = sup.nodes[1]
    board = load_board("unix-sim")
    reg = tmp_path / "nodes.json"
    first = deploy.deploy_node(node.port, board, deploy.build_bundle(board, fw), MASTER, registry_path=reg)
    assert first.flashed and first.error is None, first
    again = deploy.deploy_node(node.port, board, deploy.build_bundle(board, fw), MASTER, registry_path=reg)
    assert again.copied == [] and again.removed == [] and again.flashed and again.healthy, again
    target = fw / "canopy" / "health.py"
    target.write_text(target.read_text() + "\n# tuned\n")
    third = deploy.deploy_node(node.port, board, deploy.build_bundle(board, fw), MASTER, registry_path=reg)
    assert third.copied == ["canopy/health.py", "canopy/fw_hash.py"], third.copied
    assert third.healthy and (node.folder / "canopy" / "health.py").read_bytes() == target.read_bytes()


def test_stale_modules_are_removed(sup, fw: Path, tmp_path: Path) -> None:
    node = sup.nodes[1]
    board = load_board("unix-sim")
    extra = fw / "canopy" / "extra_mod.py"
    extra.write_text("X = 1\n")
    r1 = deploy.deploy_node(node.port, board, deploy.build_bundle(board, fw), MASTER,
                            registry_path=tmp_path / "r.json", check=False)
    assert "canopy/extra_mod.py" in r1.copied and (node.folder / "canopy" / "extra_mod.py").exists()
    extra.unlink()
    (node.folder / "canopy" / "leftover.py.part").write_bytes(b"half a fi")
    r2 = deploy.deploy_node(node.port, board, deploy.build_bundle(board, fw), MASTER,
                            registry_path=tmp_path / "r.json", check=False)
    assert sorted(r2.removed) == ["canopy/extra_mod.py", "canopy/leftover.py.part"]
    assert not (node.folder / "canopy" / "extra_mod.py").exists()


class _KillAfter(deploy.Progress):
    """Kills the node's process (a power cut) once `limit` bytes of the copy went out."""

    def __init__(self, node, limit: int) -> None:
        self.node, self.limit, self.sent, self.killed = node, limit, 0, False

    def advance(self, nbytes: int) -> None:
        self.sent += nbytes
        if not self.killed and self.sent >= self.limit:
            self.killed = True
            os.kill(self.node.pid, signal.SIGKILL)


def test_interrupted_copy_is_repaired_by_the_next_deploy(sup, fw: Path, tmp_path: Path) -> None:
    node = sup.nodes[0]
    board = load_board("unix-sim")
    reg = tmp_path / "nodes.json"
    base = deploy.deploy_node(node.port, board, deploy.build_bundle(board, fw), MASTER, registry_path=reg, check=False)
    assert base.flashed, base
    # A new release touching several modules ...
    changed = ["canopy/condition.py", "canopy/control.py", "canopy/health.py", "canopy/node.py"]
    for rel in changed:
        (fw / rel).write_text((fw / rel).read_text() + "\n# release 2\n")
    bundle = deploy.build_bundle(board, fw)
    # ... whose copy dies part-way (power cut after ~1.5 files' worth of bytes).
    limit = len((fw / changed[0]).read_bytes()) * 3 // 2
    killer = _KillAfter(node, limit)
    cut = deploy.deploy_node(node.port, board, bundle, MASTER, registry_path=reg, check=False, progress=killer)
    assert killer.killed and not cut.flashed and cut.error, cut
    on_node = {rel: hashlib.sha256((node.folder / rel).read_bytes()).hexdigest() for rel in changed}
    want = {f.path: f.sha256 for f in bundle.files}
    stale = [rel for rel in changed if on_node[rel] != want[rel]]
    assert stale, "the interruption should have left some modules at the old version"
    assert (node.folder / "canopy" / "fw_hash.py").read_bytes() != want["canopy/fw_hash.py"]
    _wait_port(node)
    fixed = deploy.deploy_node(node.port, board, bundle, MASTER, registry_path=reg)
    assert fixed.error is None and fixed.flashed and fixed.healthy, fixed
    # exactly the files that differed were copied again (hash mismatch found on the node)
    assert set(stale) <= set(fixed.copied) <= set(changed) | {"canopy/fw_hash.py"}
    assert "canopy/fw_hash.py" in fixed.copied
    for f in bundle.files:
        assert (node.folder / f.path).read_bytes() == f.data, f.path
    assert not list(node.folder.rglob("*.part"))


def test_corrupted_file_on_node_is_detected_by_hash(sup, tmp_path: Path) -> None:
    node = sup.nodes[1]
    board = load_board("unix-sim")
    bundle = deploy.build_bundle(board)
    reg = tmp_path / "nodes.json"
    deploy.deploy_node(node.port, board, bundle, MASTER, registry_path=reg, check=False)
    victim = node.folder / "canopy" / "control.py"
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    r = deploy.deploy_node(node.port, board, bundle, MASTER, registry_path=reg, check=False)
    assert r.copied == ["canopy/control.py"] and victim.read_bytes() == data


def _wait_port(node, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (node.state != "running" or not node.port):
        time.sleep(0.05)


# -- the CLI ---------------------------------------------------------------------------

def test_cli_deploy_all_virtual_nodes_in_parallel(sup, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(tmp_path / "master.key"))
    rc = cli.main(["deploy", "--board", "unix-sim", "--all", "--quiet", "--zone", "B",
                   "--sim-state", str(sup.cfg.state_path), "--report", str(tmp_path / "rep.json")])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert rc == 0, err
    doc = json.loads(out)
    assert doc == json.loads((tmp_path / "rep.json").read_text())
    got = {n["node_id"]: n for n in doc["nodes"]}
    assert set(got) == {"n01", "n02"} and all(n["healthy"] and n["flashed"] for n in got.values())
    assert (tmp_path / "master.key").stat().st_mode & 0o077 == 0  # the master key is private
    reg = Registry.load(tmp_path / "nodes.json")
    assert {reg.by_mac(sim_mac("n01")), reg.by_mac(sim_mac("n02"))} == {"n01", "n02"}


def test_cli_deploy_errors_are_clear(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(tmp_path / "master.key"))
    assert cli.main(["deploy", "--board", "no-such-board", "--port", "/dev/null"]) == 2
    assert "unknown board" in capsys.readouterr().err
    rc = cli.main(["deploy", "--board", "unix-sim", "--quiet", "--port", str(tmp_path / "ttyGONE")])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    assert "cannot open" in json.loads(out)["nodes"][0]["error"]
    rc = cli.main(["deploy", "--board", "unix-sim", "--all", "--sim-state", str(tmp_path / "none.json")])
    assert rc == 2 and "no virtual nodes" in capsys.readouterr().err
    rc = cli.main(["deploy", "--board", "unix-sim", "--port", "a", "--port", "b", "--node-id", "n09"])
    assert rc == 2 and "--node-id" in capsys.readouterr().err


def test_bad_master_key_file_is_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    bad = tmp_path / "master.key"
    bad.write_text("not hex\n")
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    rc = cli.main(["deploy", "--board", "unix-sim", "--port", "/dev/null", "--master-key", str(bad)])
    assert rc == 2 and "hex" in capsys.readouterr().err


def test_deploy_in_thread_does_not_block_others(sup) -> None:
    # Two nodes deployed at once through deploy_nodes: reports come back in port order.
    board = load_board("unix-sim")
    seen: list[str] = []
    lock = threading.Lock()

    class P(deploy.Progress):
        def __init__(self, port: str) -> None:
            self.port = port

        def stage(self, text: str) -> None:
            with lock:
                seen.append(f"{self.port}:{text}")

    ports = [n.port for n in sup.nodes]
    reports = deploy.deploy_nodes(ports, board, MASTER, make_progress=P, check=False,
                                  registry_path=Path(sup.cfg.directory) / "reg-par.json")
    assert [r.port for r in reports] == ports and all(r.flashed for r in reports)
    assert {s.split(":", 1)[0] for s in seen} == set(ports)


def test_a_chip_board_is_refused_on_a_virtual_node_before_anything_is_copied(sup, tmp_path: Path) -> None:
    node = sup.nodes[1]
    before = {p.relative_to(node.folder): p.read_bytes() for p in node.folder.rglob("*") if p.is_file()
              and p.suffix in (".py", ".mpy")}
    board = load_board("esp32-devkitc")
    r = deploy.deploy_node(node.port, board, deploy.build_bundle(board), MASTER, registry_path=tmp_path / "r.json",
                           check=False)
    assert not r.healthy and "does not fit this node" in (r.error or "") and "unix-sim" in r.error
    after = {p.relative_to(node.folder): p.read_bytes() for p in node.folder.rglob("*") if p.is_file()
             and p.suffix in (".py", ".mpy")}
    assert after == before and not any(p.suffix == ".mpy" for p in after)


def test_a_lost_reset_handshake_before_the_acceptance_test_is_retried(sup, tmp_path: Path, monkeypatch) -> None:
    real = deploy._enter_raw
    calls = []

    def first_one_lost(t, soft_reset):
        calls.append(soft_reset)
        if len(calls) == 1:
            raise deploy.CanopyError("entering the raw REPL: no answer from the node within 10 s")
        return real(t, soft_reset)

    monkeypatch.setattr(deploy, "_enter_raw", first_one_lost)
    node = sup.nodes[0]
    board = load_board("unix-sim")
    r = deploy.deploy_node(node.port, board, deploy.build_bundle(board), MASTER, registry_path=tmp_path / "r.json")
    assert calls == [True] and r.healthy, (r.error, r.problems)  # the retry came through connect()
