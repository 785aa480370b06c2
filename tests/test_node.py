"""The node tick in the unix port: allocation-free (heap_lock), fault handling, commands.

Every case runs the real firmware (node, kernels, BME280 driver) against the simulated
bus/sensor/world; the harness is tests/mpy/node_harness.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from canopy_host.paths import BOARDS_DIR, FIRMWARE_DIR, micropython_command
from canopy_host.unixport import call_batch, compiled_firmware, micropython_env
from conftest import MPY_TEST_DIR

SAFE = {"safe_shade": 5000, "safe_fan": 3000}  # DEFAULT_CONFIG values, restated to assert against


def _batch(func: str, cases: list[list]) -> list:
    return call_batch("node_harness", func, cases, extra_path=[MPY_TEST_DIR])


def test_heap_lock_proof_can_fail() -> None:
    # If allocation under heap_lock did not raise here, the tick proof below would be empty.
    assert _batch("lock_works", [[]]) == [True]


# One simulated hour with every sensor fault kind: ticks during the faults, in failsafe,
# and during recovery all run under heap_lock.
FAULT_SIM = {
    "seed": 5, "zone_seed": 9, "weather": "mild",
    "faults": [
        {"at_s": 300, "kind": "sensor_off", "duration_s": 90},
        {"at_s": 900, "kind": "stuck", "duration_s": 120},
        {"at_s": 1500, "kind": "spike", "value": 20.0},
        {"at_s": 2000, "kind": "drift", "duration_s": 300, "value": 0.01},
    ],
}


@pytest.fixture(scope="module")
def locked_runs() -> list[dict]:
    return _batch("run_locked", [[FAULT_SIM, None, 3600], [{"seed": 2, "weather": "hot"}, None, 600]])


def test_ticks_allocate_nothing_including_faults(locked_runs: list[dict]) -> None:
    for run in locked_runs:
        assert run["failed"] == [], f"ticks that allocated under heap_lock: {run['failed']}"
        assert run["ticks"] in (3600, 600)


def test_locked_run_went_through_fault_and_recovery(locked_runs: list[dict]) -> None:
    run = locked_runs[0]
    codes = [e[1] for e in run["events"]]
    # 1 = missing, 2 = stuck: both were seen, both were followed by recovery.
    assert run["fault_union"] & 1 and run["fault_union"] & 2
    assert codes.count("failsafe") == 2 and codes.count("recovered") == 2, run["events"]
    assert run["failsafe_ticks"] > 90


def test_boot_emits_boot_event_and_no_spurious_fault(locked_runs: list[dict]) -> None:
    run = locked_runs[1]
    assert run["events"][0][1] == "boot"
    assert [e for e in run["events"] if e[1] in ("fault", "failsafe")] == []
    assert run["failsafe_ticks"] <= 1  # only until the first conversion has been read


def test_commands_validate_and_take_effect() -> None:
    script = [
        [5, "set", {"t_setpoint": 2450}],
        [6, "set", {"t_setpoint": "hot"}],
        [6, "set", {"no_such_key": 1}],
        [7, "calibrate", 0, -150],
        [8, "calibrate", 3, 10],
        [8, "calibrate", 0, 100000],
        [9, "identify", 4],
        [9, "identify", -1],
        [14, "ring", 40],
    ]
    res = _batch("commands", [[{"seed": 1}, script]])[0]
    r = res["results"]
    assert r[0][0] == "ok" and r[0][1] == 2450 and r[0][2] == 2450  # reached the controller
    assert r[1][0] == "ValueError" and "t_setpoint" in r[1][1]
    assert r[2][0] == "ValueError" and "no_such_key" in r[2][1]
    ok, total, raw, adj = r[3]
    assert ok == "ok" and total == -150 and adj[0] == raw[0] - 150 and adj[1] == raw[1]
    assert r[4][0] == "ValueError" and "channel" in r[4][1]
    assert r[5][0] == "ValueError" and "exceeds" in r[5][1]
    assert r[6] == ["ok"]
    assert r[7][0] == "ValueError"
    # Ring of 16: 40 pushes on top of the earlier events keep the newest 16.
    assert r[8][1] > 0
    assert len(res["events"]) == 16
    assert res["events"][-1] == ["config", 39]
    # LED: lit while in failsafe (only the first tick, before the first conversion is
    # read), then off; identify blinks it every tick for 4 s after tick 9.
    led = res["led"]
    assert led[0] == 1 and led[1:9] == [0] * 8
    assert set(led[9:13]) == {0, 1} and all(led[i] != led[i + 1] for i in range(9, 12))


def _run_node(folder: Path, fw: Path, heapsize: str, link: str, run_s: int) -> subprocess.CompletedProcess:
    # A relative module path, as on the chip (/canopy/node.mpy): every module's __file__
    # is interned for good, so an absolute path would make the heap this test needs
    # depend on where the repository was cloned.
    link_dir = folder / "fw"
    if not link_dir.exists():
        link_dir.symlink_to(fw)
    env = micropython_env()
    env.update({"MICROPYPATH": "fw", "CANOPY_LINK": link, "CANOPY_SPEED": "0",
                "CANOPY_RUN_S": str(run_s), "CANOPY_EVERY": "60"})
    return subprocess.run(
        micropython_command() + ["-X", f"heapsize={heapsize}", "-c", "import main; main.main()"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


# The virtual node (firmware + simulated sensor, bus and microclimate), compiled to .mpy
# as deployed, on the 64-bit unix port, in the heap issue 2 asks for. Measured: ~62 KB
# stays allocated with the text link, of the ~63 KB a 64k heap offers; the framed link
# with the repair agent needs more, see tests/test_heap.py and docs/firmware.md "Memory
# budget". Objects on the 64-bit port are up to twice their ESP32 size.
VIRTUAL_NODE_HEAP = "64k"


@pytest.fixture(scope="module")
def compiled_fw() -> Path:
    # The precompiled cache `canopy sim` runs virtual nodes from (relative source names,
    # as deployed .mpy files have them).
    fw = compiled_firmware()
    if fw is None:
        pytest.skip("no mpy-cross or unknown unix-port architecture")
    return fw


def _node_folder(tmp_path: Path) -> Path:
    (tmp_path / "board.json").write_text((BOARDS_DIR / "unix-sim.json").read_text())
    (tmp_path / "sim.json").write_text(json.dumps(
        {"seed": 3, "faults": [{"at_s": 120, "kind": "sensor_off", "duration_s": 30}]}))
    return tmp_path


def test_virtual_node_runs_in_small_heap(compiled_fw: Path, tmp_path: Path) -> None:
    proc = _run_node(_node_folder(tmp_path), compiled_fw, VIRTUAL_NODE_HEAP, "text", 600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    readings = [ln for ln in proc.stdout.splitlines() if ln.startswith("R ")]
    assert len(readings) == 10
    assert "event=recovered" in proc.stdout


def test_virtual_node_runs_in_64k_through_every_fault_kind(compiled_fw: Path, tmp_path: Path) -> None:
    folder = _node_folder(tmp_path)
    (folder / "sim.json").write_text(json.dumps({"seed": 1, "weather": "hot", "faults": [
        {"at_s": 15, "kind": "spike"},
        {"at_s": 25, "kind": "drift", "duration_s": 30},
        {"at_s": 60, "kind": "sensor_off", "duration_s": 20},
        {"at_s": 90, "kind": "stuck", "duration_s": 25},
    ]}))
    proc = _run_node(folder, compiled_fw, "64k", "text", 180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("R ")] == [
        "t=60s", "t=120s", "t=180s"]
    events = [ln.split()[2] for ln in proc.stdout.splitlines() if ln.startswith("E ")]
    # the outage and the stuck sensor both put the node in failsafe and it comes back
    assert events.count("event=failsafe") >= 2 and events.count("event=recovered") >= 2
    assert "event=sensor" in events


def test_defaults_pass_the_config_checks() -> None:
    # config.merged() skips the checks without overrides (so a node without a
    # config.json never loads canopy.configcheck); that is only right if they pass.
    code = ("from canopy import config\n"
            "d = config.DEFAULT_CONFIG\n"
            "c = config.validate(dict(d, ema_shift=list(d['ema_shift'])))\n"
            "print(c == config.merged(), 'canopy.configcheck' in __import__('sys').modules)\n"
            "try:\n"
            "    config.merged({'tick_ms': 5})\n"
            "except ValueError as e:\n"
            "    print('rejected', e)\n")
    env = micropython_env()
    env["MICROPYPATH"] = str(FIRMWARE_DIR)
    proc = subprocess.run(micropython_command() + ["-c", code], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True True", "rejected config: 'tick_ms'=5 outside 10..3600000"]


def test_bad_config_json_is_reported_and_the_defaults_run(compiled_fw: Path, tmp_path: Path) -> None:
    folder = _node_folder(tmp_path)
    for bad, why in (('{"tick_ms": 5}', "'tick_ms'=5 outside"), ("[1, 2]", "must hold a JSON object"),
                     ('{"tick_ms": ', "")):
        (folder / "config.json").write_text(bad)
        proc = _run_node(folder, compiled_fw, "2m", "text", 2)
        assert proc.returncode == 0, proc.stderr
        assert f"canopy: config.json ignored: " in proc.stdout and why in proc.stdout
        assert "tick=1000ms" in proc.stdout


def test_boot_id_persists_in_the_node_folder(compiled_fw: Path, tmp_path: Path) -> None:
    folder = _node_folder(tmp_path)
    ids = []
    for _ in range(2):
        proc = _run_node(folder, compiled_fw, "2m", "text", 2)
        assert proc.returncode == 0, proc.stderr
        ids.append(int(proc.stdout.split("boot=")[1].split()[0]))
    assert ids[1] == ids[0] + 1
    assert (folder / "boot_id").read_text().strip() == str(ids[1])


def test_main_py_runs_as_a_script_from_source(tmp_path: Path) -> None:
    # How the chip (and `canopy demo`) start it: main.py as the script, firmware on the path.
    folder = _node_folder(tmp_path)
    env = micropython_env()
    env.update({"CANOPY_LINK": "text", "CANOPY_SPEED": "0", "CANOPY_RUN_S": "30", "CANOPY_EVERY": "10"})
    proc = subprocess.run(micropython_command() + [str(FIRMWARE_DIR / "main.py")], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("R ")] == ["t=10s", "t=20s", "t=30s"]


# The live heap after 1500 more ticks of the real loop (text link, a 1000 s sensor outage,
# re-probing between ticks) may differ only by what one outage leaves: at most the
# traceback entries of the bus's current OSError (scan() replaces it between outages).
# Growth per tick would exceed this within a few dozen ticks.
LEAK_LIMIT_BYTES = 1024


def test_steady_loop_does_not_grow_the_heap() -> None:
    sim = {"seed": 2, "faults": [{"at_s": 400, "kind": "sensor_off", "duration_s": 1000}]}
    before, after, ticks = _batch("leak_check", [[sim, 100, 1500]])[0]
    assert ticks == 1600
    assert after - before <= LEAK_LIMIT_BYTES


@pytest.mark.parametrize(
    "sim, config, words",
    [
        ({"weather": "sunny"}, None, "cannot start: sim.json: unknown weather 'sunny'"),
        ({"board": "no-such-board"}, None, "cannot start: board file"),
        ({"faults": [{"kind": "fire"}]}, None, "faults[0].kind 'fire'"),
        ({}, {"t_setpoint": "hot"}, "config.json ignored: config: 't_setpoint' must be an int"),
    ],
)
def test_bad_node_files_give_clear_messages(tmp_path: Path, sim: dict, config: dict | None, words: str) -> None:
    (tmp_path / "sim.json").write_text(json.dumps(sim))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    env = micropython_env()
    env.update({"CANOPY_LINK": "text", "CANOPY_SPEED": "0", "CANOPY_RUN_S": "2", "CANOPY_EVERY": "1"})
    proc = subprocess.run(micropython_command() + [str(FIRMWARE_DIR / "main.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert words in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_repeated_outages_do_not_grow_the_heap() -> None:
    # Each raise of the simulated bus's OSError appends to its traceback; without a fresh
    # instance per re-probe, ten outages would leave ~1.5 KB behind on a 64 KB heap.
    faults = [{"at_s": 150 + 120 * k, "kind": "sensor_off", "duration_s": 30} for k in range(10)]
    before, after, ticks = _batch("leak_check", [[{"seed": 2, "faults": faults}, 100, 1500]])[0]
    assert ticks == 1600
    assert after - before <= LEAK_LIMIT_BYTES
