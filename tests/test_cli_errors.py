"""Common user mistakes with the `canopy` CLI: one clear line on stderr, exit 2 (a mistake)
or 1 (a runtime failure), never a traceback, and nothing of the user's touched.

Everything here runs in-process through `canopy_host.cli.main` and needs no virtual node
(those cases are in test_cli_node_errors.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from canopy_host import flash_cmd
from canopy_host.cli import main
from canopy_host.flash import NodeReport
from canopy_host.store import Store


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_error_line(err: str, verb: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"canopy {verb}: error: "), err
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def foreign_db(tmp_path: Path) -> Path:
    """Another program's SQLite file, in the default rollback-journal mode."""
    path = tmp_path / "photos.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE albums (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO albums (name) VALUES ('summer')")
    con.commit()
    con.close()
    return path


@dataclass
class Frame:
    kind: str
    node: str
    boot: int
    seq: int
    fields: dict[str, Any]


@pytest.fixture
def canopy_db(tmp_path: Path) -> Path:
    """A store with one node and one reading of it."""
    path = tmp_path / "canopy.db"
    with Store(path) as store:
        store.upsert_node("n01", seen=1_795_000_000.0, zone="A")
        store.add_frame(1_795_000_060.0, "/dev/pts/0", Frame("reading", "n01", 1, 1, {
            "t_raw": 500000, "p_raw": 400000, "h_raw": 30000, "t": 2400, "p": 100000, "h": 40960, "shade": 0,
            "mist": 0, "fan": 0, "faults": 0, "failsafe": 0, "tick": 1, "i_shade": 0, "i_mist": 0, "i_fan": 0}))
    return path


# -- --db that is not a canopy store ------------------------------------------------------

READERS = (
    ("export", []),
    ("plot", ["--node", "n01", "-o", "x.png"]),
    ("audit", []),
    ("consensus", []),
)


@pytest.mark.parametrize("verb,extra", READERS)
def test_foreign_sqlite_db_is_refused_and_left_untouched(verb, extra, foreign_db, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = digest(foreign_db)
    code, _, err = run(capsys, verb, "--db", str(foreign_db), *extra)
    assert code == 2
    assert "not a canopy monitor database" in one_error_line(err, verb)
    assert digest(foreign_db) == before  # not switched to WAL, no tables added
    assert not Path(f"{foreign_db}-wal").exists()


def test_monitor_does_not_write_into_a_foreign_db(foreign_db, capsys):
    before = digest(foreign_db)
    code, _, err = run(capsys, "monitor", "socket://127.0.0.1:1", "--duration", "0.2", "--db", str(foreign_db))
    assert code == 2
    assert "not a canopy monitor database" in one_error_line(err, "monitor")
    con = sqlite3.connect(foreign_db)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["albums"]
    con.close()
    assert digest(foreign_db) == before


@pytest.mark.parametrize("verb,extra", READERS + (("monitor", ["socket://127.0.0.1:1", "--duration", "0.2"]),))
def test_directory_as_db_says_so(verb, extra, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    code, _, err = run(capsys, verb, "--db", str(folder), *extra)
    assert code == 2
    assert "is a directory" in one_error_line(err, verb)


@pytest.mark.parametrize("verb,extra", READERS)
def test_random_or_empty_file_as_db(verb, extra, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    code, _, err = run(capsys, verb, "--db", str(junk), *extra)
    assert code == 2 and "not an SQLite file" in one_error_line(err, verb)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    code, _, err = run(capsys, verb, "--db", str(empty), *extra)
    assert code == 2 and "empty file" in one_error_line(err, verb)
    assert empty.read_bytes() == b""  # not turned into an SQLite file by a reader


def test_a_real_store_still_opens(canopy_db, capsys):
    code, out, err = run(capsys, "export", "--db", str(canopy_db))
    assert code == 0 and out.startswith("time,rx_time,node") and len(out.splitlines()) == 2
    code, out, _ = run(capsys, "audit", "--db", str(canopy_db))
    assert code == 0 and "no audit entries match" in out


# -- time ranges ---------------------------------------------------------------------------

def test_audit_time_range_is_checked_like_export(canopy_db, capsys):
    code, _, err = run(capsys, "audit", "--db", str(canopy_db), "--since", "1h", "--until", "2h")
    assert code == 2 and "--until is before --since" in one_error_line(err, "audit")
    code, _, err = run(capsys, "export", "--db", str(canopy_db), "--since", "1h", "--until", "2h")
    assert code == 2 and "--until is before --since" in one_error_line(err, "export")
    for bad in ("nan", "inf", "yesterday"):
        code, _, err = run(capsys, "audit", "--db", str(canopy_db), "--since", bad)
        assert code == 2 and "cannot read time" in one_error_line(err, "audit")


def test_audit_takes_the_same_time_forms_as_export(canopy_db, capsys):
    for ok in ("2h", "90s", "2026-11-25T21:30", "2026-11-25T21:30Z", "1795000000"):
        code, _, err = run(capsys, "audit", "--db", str(canopy_db), "--since", ok)
        assert code == 0, (ok, err)


# -- sim and mesh state files --------------------------------------------------------------

def test_sim_state_path_that_is_a_directory(tmp_path, capsys):
    folder = tmp_path / "state"
    folder.mkdir()
    code, _, err = run(capsys, "sim", "--nodes", "1", "--duration", "1", "--dir", str(tmp_path / "sim"),
                       "--state", str(folder))
    assert code == 2 and "is a directory" in one_error_line(err, "sim")
    assert not (tmp_path / "sim").exists()  # refused before any node started


def test_sim_state_never_overwrites_another_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _, err = run(capsys, "sim", "--nodes", "1", "--duration", "1", "--dir", str(tmp_path / "sim"),
                       "--state", str(notes))
    assert code == 2 and "not a `canopy sim` state file" in one_error_line(err, "sim")
    assert notes.read_text() == "my notes\n"


def _mesh_state(tmp_path: Path, running: bool) -> Path:
    nodes = []
    for nid in ("n01", "n02"):
        (tmp_path / nid).mkdir()
        nodes.append({"node_id": nid, "folder": str(tmp_path / nid), "mesh": {"port": 1}})
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "running": running, "updated": "2026-11-26T00:00:00Z",
                                "nodes": nodes}))
    return path


def test_mesh_against_a_stopped_sim_is_an_error(tmp_path, capsys):
    state = _mesh_state(tmp_path, running=False)
    code, _, err = run(capsys, "mesh", "--state", str(state), "down", "n02")
    assert code == 2 and "not running" in one_error_line(err, "mesh")
    assert not (tmp_path / "n02" / "mesh_control.json").exists() and not any((tmp_path / "n02").iterdir())


def test_mesh_takes_sim_state_like_the_other_verbs(tmp_path, capsys):
    state = _mesh_state(tmp_path, running=True)
    code, out, _ = run(capsys, "mesh", "--sim-state", str(state), "status")
    assert code == 0 and "n01  up" in out and "n02  up" in out


# -- deploy / provision before any node is touched ---------------------------------------

def test_missing_port_path_is_named_as_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(tmp_path / "master.key"))
    code, _, err = run(capsys, "provision", "--port", "/dev/ttyUSB-not-there-7", "--board", "esp32-devkitc")
    line = one_error_line(err, "provision")
    assert code == 2 and "/dev/ttyUSB-not-there-7" in line and "does not exist" in line
    assert "another program" not in line  # not reported as a busy port
    # deploy: a missing port fails its own node (the others of the run still get deployed)
    code, out, err = run(capsys, "deploy", "--board", "esp32-devkitc", "--quiet",
                         "--port", "/dev/ttyUSB-not-there-7")
    error = json.loads(out)["nodes"][0]["error"]
    assert code == 1 and "does not exist" in error and "another program" not in error
    assert "does not exist" in " ".join(err.split())


@pytest.mark.parametrize("verb", ("deploy", "provision"))
def test_explicit_master_key_that_does_not_exist_is_not_created(verb, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    typo = tmp_path / "mesh_mastr.key"
    code, _, err = run(capsys, verb, "--board", "unix-sim", "--port", "/dev/null", "--master-key", str(typo))
    assert code == 2 and "no such file" in one_error_line(err, verb)
    assert not typo.exists()  # a fresh key there would re-key the node away from its mesh


def test_default_master_key_creation_is_announced(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    key = tmp_path / "cfg" / "mesh_master.key"
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(key))
    # /dev/null exists but is no node: the run fails at the port, after the key is made
    code, _, err = run(capsys, "deploy", "--board", "unix-sim", "--port", "/dev/null", "--quiet")
    assert code == 1
    assert key.exists() and f"created a new mesh master key at {key}" in " ".join(err.split())


def test_broken_host_files_stop_deploy_before_the_node(tmp_path, capsys, monkeypatch):
    key = tmp_path / "master.key"
    key.write_text("5a" * 32 + "\n")
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(key))
    broken = tmp_path / "nodes.json"
    broken.write_bytes(b"\xfb\x00not json")
    code, out, err = run(capsys, "deploy", "--board", "unix-sim", "--port", "/dev/null", "--registry", str(broken))
    assert code == 2 and "node registry" in one_error_line(err, "deploy") and out == ""
    folder = tmp_path / "ctr"
    folder.mkdir()
    code, out, err = run(capsys, "deploy", "--board", "unix-sim", "--port", "/dev/null",
                         "--registry", str(tmp_path / "ok.json"), "--counter-file", str(folder))
    assert code == 2 and "is a directory" in one_error_line(err, "deploy") and out == ""
    code, out, err = run(capsys, "deploy", "--board", "unix-sim", "--port", "/dev/null",
                         "--registry", str(tmp_path / "ok.json"), "--report", str(folder))
    assert code == 2 and "is a directory" in one_error_line(err, "deploy") and out == ""


# -- repair --------------------------------------------------------------------------------

@pytest.fixture
def shadow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the default --db (canopy-monitor.db) lands here, if anywhere
    path = tmp_path / "shadow.json"
    path.write_text(json.dumps({"config": {}, "nodes": {"n01": {}}}))
    return path


def test_repair_binary_findings_file(shadow, tmp_path, capsys):
    junk = tmp_path / "verdicts.jsonl"
    junk.write_bytes(b"\xfb\xfe\x00\x01" * 64)
    code, _, err = run(capsys, "repair", "--shadow", str(shadow), "--findings", str(junk),
                       "--port", "n01=/dev/null", "--dry-run")
    assert code == 2 and "not text" in one_error_line(err, "repair")


def test_repair_numbers_and_ports_are_checked(shadow, capsys):
    code, _, err = run(capsys, "repair", "--shadow", str(shadow), "--port", "n01=/dev/null", "--deadline", "-1")
    assert code == 2 and "--deadline" in one_error_line(err, "repair")
    code, _, err = run(capsys, "repair", "--shadow", str(shadow), "--port", "n01=/dev/null", "--timeout", "0")
    assert code == 2 and "--timeout" in one_error_line(err, "repair")
    code, _, err = run(capsys, "repair", "--shadow", str(shadow), "--dry-run")
    assert code == 2 and "no node has a port" in one_error_line(err, "repair")


def test_repair_refuses_a_foreign_journal_db(shadow, foreign_db, capsys):
    before = digest(foreign_db)
    code, _, err = run(capsys, "repair", "--shadow", str(shadow), "--port", "n01=/dev/null",
                       "--db", str(foreign_db), "--deadline", "0")
    assert code == 2 and "not a canopy monitor database" in one_error_line(err, "repair")
    assert digest(foreign_db) == before


# -- monitor -------------------------------------------------------------------------------

def test_monitor_one_missing_port_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "monitor", "/dev/ttyUSB-not-there-7", "--duration", "1", "--db", str(tmp_path / "m.db"))
    assert code == 2
    line = one_error_line(err, "monitor")
    assert "'/dev/ttyUSB-not-there-7' does not exist" in line and "following the others" not in line


def test_monitor_piped_output_is_plain(tmp_path, capsys):
    # capsys is not a terminal, as in `canopy monitor ... > log`: no clipped live table,
    # notices on stderr, the summary on stdout starting on a line of its own.
    code, out, err = run(capsys, "monitor", "socket://127.0.0.1:1", "--duration", "0.6", "--db", str(tmp_path / "m.db"))
    assert code == 0
    assert "┏" not in out and "│" not in out
    assert out.startswith("canopy monitor: ") and "-> " in out.splitlines()[0]
    assert "canopy monitor: socket://127.0.0.1:1: cannot open" in err


# -- flash: Ctrl-C ----------------------------------------------------------------------------

def _image(tmp_path: Path) -> Path:
    from fake_esp.images import build_image

    path = tmp_path / "fw.bin"
    path.write_bytes(build_image("ESP32", 64 * 1024))
    return path


def test_flash_ctrl_c_lets_the_writes_finish_and_reports(tmp_path, capsys, monkeypatch):
    finished = threading.Event()

    def slow_flash(ports, board, image, *a, **kw):  # stands in for esptool writing
        time.sleep(1.0)
        finished.set()
        return [NodeReport(port=p, board=board.name, result="ok", image_sha256=image.sha256, offset=board.flash_offset,
                           chip="ESP32", mac="24:a1:60:00:10:00", baud=460800) for p in ports]

    monkeypatch.setattr(flash_cmd, "flash_nodes", slow_flash)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    code, out, err = run(capsys, "flash", "--board", "esp32-devkitc", "--firmware", str(_image(tmp_path)),
                         "--port", "socket://127.0.0.1:9", "--quiet")
    assert finished.is_set()
    assert code == 130
    assert "letting the writes under way finish" in err and "interrupted" in err
    report = json.loads(out)
    assert [n["result"] for n in report["nodes"]] == ["ok"]  # what was done is still reported


def test_flash_report_path_checked_before_flashing(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(flash_cmd, "flash_nodes", lambda *a, **kw: called.append(1) or [])
    folder = tmp_path / "reports"
    folder.mkdir()
    code, out, err = run(capsys, "flash", "--board", "esp32-devkitc", "--firmware", str(_image(tmp_path)),
                         "--port", "socket://127.0.0.1:9", "--report", str(folder))
    assert code == 2 and "is a directory" in one_error_line(err, "flash") and not called and out == ""


# -- plot / help ------------------------------------------------------------------------------

def test_plot_unknown_quantity_is_named(canopy_db, tmp_path, capsys):
    code, _, err = run(capsys, "plot", "--db", str(canopy_db), "--node", "n01", "--quantity", "temp",
                       "-o", str(tmp_path / "x.png"))
    line = one_error_line(err, "plot")
    assert code == 2 and "readings have no temp" in line and "known: t," in line


# Where each verb keeps its files by default: a new user must find them from --help.
DEFAULT_FILES = {
    "demo": ["var/demo"], "monitor": ["canopy-monitor.db"], "sim": ["var/sim", "state"],
    "deploy": ["~/.config/canopy/nodes.json", "mesh_master.key"], "provision": ["~/.config/canopy/nodes.json"],
    "repair": ["var/shadow.json", "canopy-monitor.db"], "audit": ["canopy-monitor.db"], "mesh": ["var/sim/state.json"],
}


def test_every_verb_help_has_an_example_and_its_files(capsys):
    from canopy_host.cli import COMMAND_MODULES

    for module in COMMAND_MODULES:
        verb = module.rsplit(".", 1)[1].removesuffix("_cmd")
        with pytest.raises(SystemExit) as exit_:
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert exit_.value.code == 0
        assert "example" in text and f"canopy {verb}" in text, verb
        for where in DEFAULT_FILES.get(verb, []):
            assert where in text, (verb, where)


def test_an_unexpected_os_error_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # e.g. a full disk or a permission no verb foresaw: the machine's answer, with the file
    from canopy_host import ports_cmd

    full = tmp_path / "out.csv"

    def no_space(args):
        raise OSError(28, "No space left on device", str(full))

    monkeypatch.setattr(ports_cmd, "run", no_space)  # main() builds its parser per call
    code, _, err = run(capsys, "ports")
    assert code == 1
    assert "No space left on device" in one_error_line(err, "ports") and str(full) in err


def test_deploy_ctrl_c_lets_the_deploys_finish_and_reports(tmp_path, capsys, monkeypatch):
    from canopy_host import deploy

    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "nodes.json"))
    key = tmp_path / "master.key"
    key.write_text("5a" * 32 + "\n")
    monkeypatch.setenv("CANOPY_MASTER_KEY_FILE", str(key))
    finished = threading.Event()

    def slow_deploy(ports, board, master, **kw):  # stands in for the copy over the raw REPL
        time.sleep(1.0)
        finished.set()
        return [deploy.NodeReport(port=p, board=board.name, node_id="n01", flashed=True) for p in ports]

    monkeypatch.setattr(deploy, "deploy_nodes", slow_deploy)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    code, out, err = run(capsys, "deploy", "--board", "unix-sim", "--port", "/dev/null", "--no-check", "--quiet")
    assert finished.is_set()
    assert code == 130
    assert "letting the deploys under way finish" in err and "interrupted" in err
    assert [n["flashed"] for n in json.loads(out)["nodes"]] == [True]


def test_repair_says_how_long_it_will_retry(shadow, tmp_path, capsys):
    # /dev/null opens as no serial port: the node is offline, its job waits
    code, out, err = run(capsys, "repair", "--shadow", str(shadow), "--port", "n01=/dev/null",
                         "--db", str(tmp_path / "j.db"), "--deadline", "1", "--timeout", "0.3")
    assert code == 3 and "PENDING" in out
    assert "retrying n01 for up to 1 s (--deadline)" in err and "next run resumes" in err


@pytest.mark.parametrize("option", (["--duration", "nan"], ["--duration", "-1"], ["--speed", "nan"],
                                    ["--speed", "inf"]))
def test_sim_numbers_are_checked_before_nodes_start(option, tmp_path, capsys):
    code, _, err = run(capsys, "sim", "--nodes", "1", "--dir", str(tmp_path / "sim"), *option)
    assert code == 2 and option[0] in one_error_line(err, "sim")
    assert not (tmp_path / "sim").exists()


def test_repair_does_not_wait_for_a_node_it_has_no_port_for(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shadow = tmp_path / "shadow.json"
    shadow.write_text(json.dumps({"config": {}, "nodes": {"n01": {}, "n09": {}}}))
    db = tmp_path / "j.db"
    code, out, err = run(capsys, "repair", "--shadow", str(shadow), "--port", "n01=/dev/null", "--db", str(db),
                         "--deadline", "0", "--timeout", "0.3")
    assert "n09: skipped: no port for it" in out
    con = sqlite3.connect(db)
    assert {r[0] for r in con.execute("SELECT node FROM repair_jobs")} == {"n01"}  # n09 not journaled
    con.close()
