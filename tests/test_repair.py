"""The repair engine against virtual nodes (real firmware in the unix port, over pipes).

Expected digests come from `canonical_digest` (sorted-key JSON + sha256, written in
the test support from the protocol spec), never from the code under test; node state
is read back from the node itself (`repair_status`) and from the files in its flash
folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canopy_host.repair import (TERMINAL, TRANSITIONS, Journal, NodeRefused, RepairEngine, audit_entries, plan,
                                status)
from canopy_host.shadow import Shadow, firmware_config
from test_repair_support import FakeClock, HostCrash, PipeMesh, canonical_digest

DEFAULTS = firmware_config().DEFAULT_CONFIG


def want(version: int, **over: object) -> dict:
    cfg = dict(DEFAULTS, version=version, **over)
    cfg["ema_shift"] = list(DEFAULTS["ema_shift"])
    return cfg


@pytest.fixture
def mesh(tmp_path):
    m = PipeMesh(tmp_path, ["n01", "n02", "n03"])
    yield m
    m.close()


def make(tmp_path: Path, mesh: PipeMesh, shadow: Shadow, clock: FakeClock | None = None) -> RepairEngine:
    clock = clock or FakeClock()
    return RepairEngine(Journal(tmp_path / "repair.db", clock=clock.now), mesh, shadow, clock=clock,
                        backoff=2.0, max_backoff=64.0, trial_wait=1.0)


def actual(mesh: PipeMesh, shadow: Shadow) -> dict:
    return {n: status(mesh, n) for n in shadow.node_ids()}


def check_journal(path: Path) -> None:
    """Every journaled state change is a legal move of the state machine."""
    j = Journal(path)
    for e in audit_entries(j.con):
        if e["event"] == "state":
            frm, to = e["detail"]["from"], e["state"]
            assert frm == to or to in TRANSITIONS[frm], f"illegal {frm} -> {to}: {e}"
    j.close()


def node_digest(mesh: PipeMesh, nid: str) -> str:
    return status(mesh, nid).cfg_digest


def test_push_config_to_stale_and_tampered_nodes(tmp_path, mesh):
    shadow = Shadow({"version": 2, "t_setpoint": 2450}, {n: {} for n in mesh.ids})
    # n02 runs the right version with a tampered value: same version, other digest
    (mesh.folder("n02") / "config.json").write_text(json.dumps(want(2, t_setpoint=3100)))
    mesh.reboot("n02")
    p = plan(shadow, actual(mesh, shadow))
    assert {(s.node, s.action) for s in p.steps} == {(n, "push_config") for n in mesh.ids}
    assert "tampered" in [s for s in p.steps if s.node == "n02"][0].reason
    eng = make(tmp_path, mesh, shadow)
    eng.submit(p)
    counts = eng.run(deadline_s=600)
    assert counts == {"VERIFIED": 3}
    expect = canonical_digest(want(2, t_setpoint=2450))
    for n in mesh.ids:
        assert node_digest(mesh, n) == expect
        # the active file itself holds that exact canonical JSON
        assert canonical_digest(json.loads(mesh.file(n, "config.json"))) == expect
        assert mesh.file(n, "config.trial") is None
    # fallback is the previous config
    assert json.loads(mesh.file("n02", "config.prev"))["t_setpoint"] == 3100
    check_journal(tmp_path / "repair.db")
    # nothing left to do: a second plan is empty
    assert plan(shadow, actual(mesh, shadow)).steps == []


def test_lost_activate_ack_then_duplicate_activate_is_harmless(tmp_path, mesh):
    shadow = Shadow({"version": 2, "t_setpoint": 2450}, {"n01": {}})
    lost = []

    def drop(node, cmd, answer):
        if cmd == "cfg_activate" and not lost:
            lost.append(answer)
            return True
        return False

    dup = []
    digest = canonical_digest(want(2, t_setpoint=2450))

    def duplicate(node, cmd):
        # The activate is repeated (same digest) right after its ack was lost, while the
        # new config is on trial: what a retransmitting host or relay would do.
        if lost and not dup:
            dup.append(None)
            dup[0] = mesh.request("n01", "cfg_activate", {"digest": digest})

    mesh.drop_reply = drop
    mesh.before_send = duplicate
    eng = make(tmp_path, mesh, shadow)
    eng.submit(plan(shadow, actual(mesh, shadow)))
    assert eng.run(deadline_s=600) == {"VERIFIED": 1}
    assert lost and lost[0]["result"] == "activated"
    assert dup and dup[0]["result"] == "already" and dup[0]["cfg_digest"] == digest
    # the duplicate did not overwrite the fallback with the new config
    assert json.loads(mesh.file("n01", "config.prev")) == json.loads(json.dumps(want(1)))
    assert node_digest(mesh, "n01") == canonical_digest(want(2, t_setpoint=2450))
    # and the same activate sent once more by hand answers "already"
    got = mesh.request("n01", "cfg_activate", {"digest": canonical_digest(want(2, t_setpoint=2450))})
    assert got["result"] == "already"


def test_host_crash_between_steps_resumes_from_journal(tmp_path, mesh):
    shadow = Shadow({"version": 3, "safe_fan": 2500}, {n: {} for n in mesh.ids})
    shadow.nodes["n02"]["quarantine"] = True
    shadow.nodes["n03"]["cal"] = {"t": -35}
    sends = [0]
    crashed_on: list[str] = []

    def crash(node, cmd):
        sends[0] += 1
        if sends[0] % 16 == 3:  # lands on status, stage, chunk, commit, activate, ...
            crashed_on.append(cmd)
            raise HostCrash(f"host died after {sends[0]} commands")  # the command WAS delivered

    mesh.after_send = crash
    crashes = 0
    clock = FakeClock()
    for _ in range(200):
        eng = make(tmp_path, mesh, shadow, clock)  # a fresh process: journal and shadow only
        try:
            if not eng.journal.jobs():
                eng.submit(plan(shadow, actual(mesh, shadow)))
            counts = eng.run(deadline_s=600)
            if all(s in TERMINAL for s in counts):
                break
        except HostCrash:
            crashes += 1
        finally:
            eng.journal.close()
    mesh.after_send = lambda n, c: None
    assert crashes == len(crashed_on) >= 4
    assert len(set(crashed_on)) >= 3, crashed_on  # crashes at different kinds of step
    j = Journal(tmp_path / "repair.db")
    assert {job.state for job in j.jobs()} == {"VERIFIED"}
    j.close()
    expect = canonical_digest(want(3, safe_fan=2500))
    for n in mesh.ids:
        assert node_digest(mesh, n) == expect
    assert status(mesh, "n02").quarantine and not status(mesh, "n01").quarantine
    assert status(mesh, "n03").cal == (-35, 0, 0)
    check_journal(tmp_path / "repair.db")


def test_node_reboots_mid_repair_ends_verified(tmp_path, mesh):
    shadow = Shadow({"version": 2, "t_setpoint": 2450}, {"n01": {}})
    n = [0]

    def reboot_sometimes(node, cmd):
        n[0] += 1
        if n[0] % 17 == 5:
            mesh.reboot(node)  # after the command: the reply is lost with the process
            raise_offline.append(cmd)

    raise_offline: list[str] = []
    mesh.after_send = reboot_sometimes
    mesh.drop_reply = lambda node, cmd, a: bool(raise_offline) and raise_offline.pop() is not None
    eng = make(tmp_path, mesh, shadow)
    eng.submit(plan(shadow, actual(mesh, shadow)))
    counts = eng.run(deadline_s=3000)
    mesh.after_send = lambda node, cmd: None
    mesh.drop_reply = lambda node, cmd, a: False
    assert counts == {"VERIFIED": 1}
    assert node_digest(mesh, "n01") == canonical_digest(want(2, t_setpoint=2450))
    check_journal(tmp_path / "repair.db")


def test_partition_heals_and_mesh_converges_without_rollback(tmp_path, mesh):
    clock = FakeClock()
    shadow = Shadow({"version": 2, "t_setpoint": 2450}, {n: {} for n in mesh.ids})
    mesh.partitioned = {"n03"}
    eng = make(tmp_path, mesh, shadow, clock)
    acts = {n: (None if n in mesh.partitioned else status(mesh, n)) for n in mesh.ids}
    eng.submit(plan(shadow, acts))
    eng.run(deadline_s=100)
    states = {j.node: j.state for j in eng.journal.jobs()}
    assert states["n01"] == states["n02"] == "VERIFIED" and states["n03"] == "PENDING"
    retries = [e["detail"]["next_try"] - e["time"] for e in audit_entries(eng.journal.con, node="n03")
               if e["event"] == "retry"]
    assert len(retries) >= 3 and all(b >= a * 1.9 for a, b in zip(retries, retries[1:])), retries
    # while n03 is away the operator moves on to v3; n03 is still on v1
    shadow.config = {"version": 3, "t_setpoint": 2400}
    eng.submit(plan(shadow, {n: (None if n in mesh.partitioned else status(mesh, n)) for n in mesh.ids}))
    mesh.partitioned = set()
    counts = eng.run(deadline_s=600)
    assert counts.get("SUPERSEDED") == 1  # n03's v2 job: it never gets the v2 it missed
    expect = canonical_digest(want(3, t_setpoint=2400))
    for n in mesh.ids:
        assert node_digest(mesh, n) == expect
        seen = mesh.versions[n]
        assert seen == sorted(seen), f"{n} went back a version: {seen}"
    assert 2 not in mesh.versions["n03"]
    check_journal(tmp_path / "repair.db")


def test_never_rolls_back_a_newer_node(tmp_path, mesh):
    (mesh.folder("n01") / "config.json").write_text(json.dumps(want(5)))
    mesh.reboot("n01")
    shadow = Shadow({"version": 4}, {"n01": {}})
    p = plan(shadow, actual(mesh, shadow))
    assert p.steps == [] and "never rolled back" in p.skipped[0][1]
    # and the node refuses an older config even when asked directly
    with pytest.raises(Exception, match="older"):
        mesh.request("n01", "cfg_stage", {"ver": 4, "size": 10, "digest": "0" * 64})


def test_no_quorum_findings_are_never_acted_on_quarantine_and_release(tmp_path, mesh):
    shadow = Shadow({}, {n: {} for n in mesh.ids})
    findings = [
        {"node": "n01", "actionable": False, "action": {"kind": "quarantine"}},
        {"node": "n02", "actionable": False, "action": {"kind": "recalibrate", "quantity": "t", "offset": 1.0}},
    ]
    p = plan(shadow, actual(mesh, shadow), findings)
    assert p.steps == [] and len(p.skipped) == 2
    eng = make(tmp_path, mesh, shadow)
    eng.submit(p)
    assert [e["event"] for e in audit_entries(eng.journal.con)] == ["skipped", "skipped"]
    # an actionable quarantine and a recalibration from consensus (+0.35 degC too warm)
    findings = [
        {"node": "n01", "actionable": True, "action": {"kind": "quarantine"}},
        {"node": "n02", "actionable": True, "action": {"kind": "recalibrate", "quantity": "t", "offset": 0.35}},
    ]
    eng.submit(plan(shadow, actual(mesh, shadow), findings))
    assert eng.run(deadline_s=600) == {"VERIFIED": 2}  # quarantine, n02's t offset
    st = status(mesh, "n01")
    assert st.quarantine and mesh.file("n01", "quarantine") is not None
    assert status(mesh, "n02").cal == (-35, 0, 0)
    assert json.loads(mesh.file("n02", "cal.json")) == [-35, 0, 0]
    # quarantine survives a reboot (flag on flash)
    mesh.reboot("n01")
    assert status(mesh, "n01").quarantine
    findings = [{"node": "n01", "actionable": True, "action": {"kind": "release"}}]
    eng.submit(plan(shadow, actual(mesh, shadow), findings))
    assert eng.run(deadline_s=600) == {"VERIFIED": 3}
    assert not status(mesh, "n01").quarantine and mesh.file("n01", "quarantine") is None


def test_config_that_breaks_a_healthy_node_is_rolled_back(tmp_path, mesh):
    # every plausible temperature is now "out of range": the sensor faults, failsafe
    shadow = Shadow({"version": 2, "t_min": -4000, "t_max": -3000}, {"n01": {}})
    for _ in range(8):
        status(mesh, "n01")  # a few ticks so the node is healthy before the push
    eng = make(tmp_path, mesh, shadow)
    eng.submit(plan(shadow, actual(mesh, shadow)))
    assert eng.run(deadline_s=3000) == {"ROLLED_BACK": 1}
    assert node_digest(mesh, "n01") == canonical_digest(want(1))
    assert mesh.file("n01", "config.trial") is None


def test_strict_nodes_take_only_tagged_repair_commands(tmp_path):
    master = bytes(range(32))
    mesh = PipeMesh(tmp_path, ["n01", "n02"], master=master)
    try:
        shadow = Shadow({"version": 2, "t_setpoint": 2450}, {"n01": {}, "n02": {}})
        eng = make(tmp_path, mesh, shadow)
        eng.submit(plan(shadow, actual(mesh, shadow)))
        assert eng.run(deadline_s=600) == {"VERIFIED": 2}
        digest = canonical_digest(want(2, t_setpoint=2450))
        assert node_digest(mesh, "n01") == digest
        mesh.untagged = True
        with pytest.raises(NodeRefused) as e:
            mesh.request("n01", "quarantine", {"on": 1})
        assert e.value.err == "auth"
        mesh.untagged = False
        mesh.tag_node = "n02"  # n02's key speaking for n01
        with pytest.raises(NodeRefused) as e:
            mesh.request("n01", "quarantine", {"on": 1})
        assert e.value.err == "auth"
        mesh.tag_node = None
        assert not status(mesh, "n01").quarantine and mesh.file("n01", "quarantine") is None
    finally:
        mesh.close()


def test_node_reboots_after_every_state_change_and_holds_old_or_new(tmp_path, mesh):
    """Reboot the node right after each journaled step of its job (PENDING -> STAGED ->
    ACTIVATED -> VERIFIED); after each reboot its config is the old or the new one."""
    shadow = Shadow({"version": 2, "t_setpoint": 2450}, {"n01": {}})
    old, new = canonical_digest(want(1)), canonical_digest(want(2, t_setpoint=2450))
    eng = make(tmp_path, mesh, shadow)
    seen: list[tuple[str, str]] = []
    move = eng.journal.move

    def move_and_reboot(job, state, **detail):
        move(job, state, **detail)
        mesh.reboot(job.node)
        seen.append((state, status(mesh, job.node).cfg_digest))

    eng.journal.move = move_and_reboot  # type: ignore[method-assign]
    eng.submit(plan(shadow, actual(mesh, shadow)))
    assert eng.run(deadline_s=600) == {"VERIFIED": 1}
    assert [s for s, _ in seen] == ["STAGED", "ACTIVATED", "VERIFIED"]
    assert all(d in (old, new) for _, d in seen)
    assert seen[0][1] == old and seen[-1][1] == new
