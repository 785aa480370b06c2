"""The repair agent on the node (unix port): trial and self-revert, chunk idempotency, bad
commands answered as errors, quarantine holding the actuators at failsafe, and a steady
Link.service() that still allocates nothing with the agent attached."""

from __future__ import annotations

import json

import pytest

from canopy_host.protocol import FrameParser
from canopy_host.repair import config_chunks, encode_repair_command
from canopy_host.shadow import firmware_config
from canopy_host.unixport import call_batch
from test_repair_support import canonical_digest

DRIVER = r'''
import os, json, micropython
from canopy import config, board, hal
from canopy.configstore import ConfigStore, MAX_TRIAL_BOOTS
from canopy.repair_agent import RepairAgent, TRIAL_TICKS, TRIAL_GOOD

class FakeNode:
    def __init__(self):
        self.cfg = config.merged()
        self.cal = [0, 0, 0]
        self.quarantined = False
        self.faults = 0
        self.failsafe = False
        self.ticks = 0
        self.boot_id = 1
    def set_config(self, cfg):
        self.cfg = config.merged(cfg)
    def set_quarantine(self, on):
        self.quarantined = bool(on)
    def calibrate_offset(self, ch, d):
        self.cal[ch] += d
        return self.cal[ch]
    def pop_event(self):
        return None

def _fresh(d):
    try:
        os.mkdir(d)
    except OSError:
        pass
    for n in os.listdir(d):
        os.remove(d + "/" + n)

def _push(agent, text, digest, version):
    st = agent.store
    st.stage_begin(version, len(text), digest)
    st.stage_chunk(0, text.encode().hex())
    st.stage_commit()
    return agent._activate({"digest": digest})

def trial(d, new_text, new_digest, healthy_after):
    """Activate on a healthy fake node; then the node is healthy or faulty for the trial."""
    _fresh(d)
    node = FakeNode()
    agent = RepairAgent(node, ConfigStore(d))
    res = _push(agent, new_text, new_digest, 2)
    during = [agent.store.trial() is not None, node.cfg["version"]]
    for t in range(TRIAL_TICKS + 5):
        node.ticks += 1
        node.faults = 0 if healthy_after else 4
        node.failsafe = not healthy_after
        agent.poll()
    return [res[0][1], during, agent.store.load()[1], node.cfg["version"],
            agent.store.trial() is not None, agent.reverts]

def reboot_loop(d, new_text, new_digest):
    """A config that reboots the node before its trial ends is taken back."""
    _fresh(d)
    agent = RepairAgent(FakeNode(), ConfigStore(d))
    _push(agent, new_text, new_digest, 2)
    seen = []
    for boot in range(MAX_TRIAL_BOOTS + 1):
        node = FakeNode()
        agent = RepairAgent(node, ConfigStore(d))   # runs recover() like a boot
        seen.append([node.cfg["version"], agent.recovered])
    return seen

def chunks(d, text, digest):
    _fresh(d)
    st = ConfigStore(d)
    out = []
    data = text.encode().hex()
    st.stage_begin(2, len(text), digest)
    out.append(st.stage_chunk(0, data[:40]))
    out.append(st.stage_chunk(0, data[:40]))          # repeat after a lost ack
    try:
        st.stage_chunk(40, data[80:120])                # a gap
        out.append("no error")
    except ValueError as e:
        out.append(str(e))
    out.append(st.stage_chunk(20, data[40:]))
    out.append(st.stage_commit())
    out.append(st.stage_commit())                       # repeat: same answer
    st.stage_begin(2, len(text), "0" * 64)
    st.stage_chunk(0, data)
    try:
        st.stage_commit()
        out.append("no error")
    except ValueError as e:
        out.append(str(e))
    out.append(sorted(os.listdir(d)))
    return out

def during_trial(d, t2, d2, t3, d3):
    """A second activation while the first config is still on trial is refused."""
    _fresh(d)
    node = FakeNode()
    agent = RepairAgent(node, ConfigStore(d))
    _push(agent, t2, d2, 2)
    try:
        _push(agent, t3, d3, 3)
        first = "no error"
    except ValueError as e:
        first = str(e)
    for _ in range(TRIAL_GOOD):
        node.ticks += 1
        agent.poll()
    res = agent._activate({"digest": d3})   # v3 is still staged: now it goes
    return [first, res[0][1], agent.store.load()[1], agent.store._read("config.prev").decode()]

class Sink:
    def __init__(self):
        self.data = bytearray()
    def write(self, buf, n=None):
        self.data.extend(buf if n is None else buf[:n])

def _real_node(d):
    _fresh(d)
    os.chdir(d)
    from canopy.node import Node
    hw = hal.open(board.load("unix-sim"), {"seed": 3, "speed": 0})
    return Node(hw, config.merged(), boot_id=5), hw

def link_lines(d, lines):
    """Feed command lines to a real Link (real Node, sim hardware); return its output."""
    from canopy.link import Link
    node, hw = _real_node(d)
    sink = Sink()
    link = Link(node, node_id="n01", out=sink, inp=object())
    for line in lines:
        link.feed(line.encode())
    return bytes(sink.data).decode()

def quarantine(d):
    from canopy.link import Link
    node, hw = _real_node(d)
    link = Link(node, node_id="n01", out=Sink(), inp=object())
    out = []
    for _ in range(10):
        node.tick(); hw.sleep_ms(1000)
    out.append([node.failsafe, list(node.out)])
    link.repair._quarantine({"on": 1})
    for _ in range(5):
        micropython.heap_lock()   # the tick only: the simulated world allocates
        try:
            node.tick()
        finally:
            micropython.heap_unlock()
        hw.sleep_ms(1000)
    out.append([node.failsafe, list(node.out), node.quarantined])
    link.repair._quarantine({"on": 0})
    for _ in range(30):
        node.tick(); hw.sleep_ms(1000)
    out.append([node.failsafe, list(node.out), node.quarantined])
    return out

def steady_service(d):
    from canopy.link import Link
    node, hw = _real_node(d)
    link = Link(node, node_id="n01", out=Sink(), inp=object())
    for _ in range(3):
        node.tick(); hw.sleep_ms(1000); link.service(hw.ticks_ms())
    link._hello_due = False
    micropython.heap_lock()
    try:
        for _ in range(50):
            link.service(hw.ticks_ms())
    finally:
        micropython.heap_unlock()
    return [link.repair is not None, len(link._hooks)]

def case(name, *a):
    return globals()[name](*a)
'''


@pytest.fixture(scope="module")
def drv(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    (d / "agent_driver.py").write_text(DRIVER)
    return d


def cfg_text(version: int, **over: object) -> tuple[str, str]:
    cfg = dict(firmware_config().DEFAULT_CONFIG, version=version, **over)
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return text, canonical_digest(cfg)


def run(drv, *cases):
    return call_batch("agent_driver", "case", list(cases), extra_path=[drv])


def test_trial_passes_when_healthy_and_reverts_when_the_config_breaks_the_node(drv, tmp_path):
    new, d_new = cfg_text(2, t_setpoint=2450)
    _, d_old = cfg_text(1)
    ok, bad = run(drv, ("trial", str(tmp_path / "a"), new, d_new, True),
                  ("trial", str(tmp_path / "b"), new, d_new, False))
    assert ok == ["activated", [True, 2], d_new, 2, False, 0]
    assert bad == ["activated", [True, 2], d_old, 1, False, 1]


def test_a_config_that_keeps_rebooting_the_node_is_taken_back(drv, tmp_path):
    new, d_new = cfg_text(2, tick_ms=500)
    [seen] = run(drv, ("reboot_loop", str(tmp_path / "c"), new, d_new))
    versions = [v for v, _ in seen]
    assert versions[0] == 2 and versions[-1] == 1 and versions == sorted(versions, reverse=True)
    assert any("reverted" in " ".join(r) for _, r in seen)


def test_chunks_are_idempotent_and_a_bad_digest_is_discarded(drv, tmp_path):
    text, digest = cfg_text(2, t_setpoint=2450)
    [out] = run(drv, ("chunks", str(tmp_path / "d"), text, digest))
    assert out[0] == 20 and out[1] == 20
    assert "expected off=20" in out[2]
    assert out[3] == len(text) and out[4] == digest and out[5] == digest
    assert "digest mismatch" in out[6]
    assert out[7] == ["config.new"]  # the bad staging left nothing behind


def test_commands_over_the_link_and_their_errors(drv, tmp_path):
    text, digest = cfg_text(2, t_setpoint=2450)
    lines = [encode_repair_command("n01", 1, "repair_status", {}),
             encode_repair_command("n01", 2, "cfg_stage", {"ver": 2, "size": len(text), "digest": digest})]
    lines += [encode_repair_command("n01", 3 + i, "cfg_chunk", a) for i, a in enumerate(config_chunks(text.encode()))]
    k = 3 + len(lines)
    lines += [encode_repair_command("n01", k, "cfg_commit", {}),
              encode_repair_command("n01", k + 1, "cfg_activate", {"digest": digest}),
              encode_repair_command("n01", k + 2, "cfg_activate", {"digest": digest}),
              encode_repair_command("n01", k + 3, "cfg_activate", {"digest": "a" * 64}),
              encode_repair_command("n01", k + 4, "quarantine", {"on": 5}),
              encode_repair_command("n01", k + 5, "cal_set", {"channel": "x", "offset": 1}),
              encode_repair_command("n01", k + 6, "cal_set", {"channel": "t", "offset": 99999}),
              encode_repair_command("n01", k + 7, "repair_status", {"bogus": 1})]
    [out] = run(drv, ("link_lines", str(tmp_path / "e"), [ln.decode() for ln in lines]))
    frames = {f.fields.get("re"): f for f in FrameParser().feed(out.encode()) if "re" in f.fields}
    st = frames[1].fields
    assert frames[1].kind == "reply" and st["cfg_version"] == 1 and st["trial"] == 0 and st["cal"] == "0,0,0"
    assert frames[k].fields["digest"] == digest
    assert frames[k + 1].fields["result"] == "activated" and frames[k + 1].fields["cfg_digest"] == digest
    assert frames[k + 2].fields["result"] == "already"
    for j in range(3, 8):
        assert frames[k + j].kind == "error" and frames[k + j].fields["err"] == "bad_args", frames[k + j]
    assert "staged" in frames[k + 3].fields["msg"] and "exceeds" in frames[k + 6].fields["msg"]
    # every frame the node sent fits the 250-byte limit
    assert max(len(line) for line in out.encode().split(b"\n")) < 250


def test_quarantine_holds_failsafe_outputs_without_allocating(drv, tmp_path):
    d = firmware_config().DEFAULT_CONFIG
    [out] = run(drv, ("quarantine", str(tmp_path / "f")))
    before, held, after = out
    assert before[0] is False
    assert held[1] == [d["safe_shade"], 0, d["safe_fan"]] and held[2] is True and held[0] is False
    assert after[2] is False


def test_steady_link_service_with_the_agent_allocates_nothing(drv, tmp_path):
    [out] = run(drv, ("steady_service", str(tmp_path / "g")))
    assert out == [True, 1]


def test_no_second_activation_while_a_trial_runs(drv, tmp_path):
    t2, d2 = cfg_text(2, t_setpoint=2450)
    t3, d3 = cfg_text(3, t_setpoint=2400)
    [(first, res, active, prev)] = run(drv, ("during_trial", str(tmp_path / "h"), t2, d2, t3, d3))
    assert "on trial" in first
    assert res == "activated" and active == d3
    assert canonical_digest(json.loads(prev)) == d2  # the fallback passed its trial
