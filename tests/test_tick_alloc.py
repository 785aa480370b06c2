"""The control tick allocates nothing even with the heap UNLOCKED.

`heap_lock()` (tests/test_node.py) proves a tick leaves nothing behind, but under the
lock the VM silently puts bytecode frames too big for its C-stack budget on the C stack,
while with the heap unlocked it takes them from the heap on every call (freed on return,
but the allocations still drive the GC). Here every tick of a virtual node runs with the
heap unlocked, between two `micropython.mem_total()` readings (total bytes ever
allocated), and the world steps, events are drained and `service()` runs OUTSIDE that
window. Runs both the sources and the precompiled .mpy tree virtual nodes use.
"""

from __future__ import annotations

import json

import pytest

from canopy_host.unixport import compiled_firmware, run_code

# MicroPython side. Per-tick deltas go into a preallocated array('i'): storing a small
# int there allocates nothing, so the bookkeeping cannot hide or cause an allocation.
_HARNESS = """
import gc, json, sys, micropython
from array import array
from canopy import board
from canopy.sim import hal as sim_hal
from canopy.node import Node

def big_frame(a, b, c, d, e):
    # 5 arguments + 7 locals: more than the VM's 11-word C-stack frame budget.
    f = g = h = i = j = k = l = a
    return l

def measure_control():
    # The same measuring window around a call known to allocate its frame: > 0 here
    # shows the method can see the allocations this test is about.
    a = micropython.mem_total()
    big_frame(1, 2, 3, 4, 5)
    return micropython.mem_total() - a

def run(spec):
    hw = sim_hal.open(board.load("unix-sim"), spec["sim"])
    node = Node(hw, None, boot_id=1)
    n = spec["ticks"]
    alloc = array("i", bytes(4 * n))
    raised = array("i", bytes(4 * n))  # 1: the sensor was in use and went missing this tick
    fsafe = 0
    events = []
    cmds = spec.get("commands", {})
    gc.collect()
    for t in range(n):
        cmd = cmds.get(str(t))
        if cmd == "identify":
            node.identify(3)
        elif cmd == "quarantine":
            node.set_quarantine(True)
        elif cmd == "release":
            node.set_quarantine(False)
        had = node.sensor is not None and not node.faults & 1
        a = micropython.mem_total()
        node.tick()
        b = micropython.mem_total()
        alloc[t] = b - a
        raised[t] = 1 if had and node.faults & 1 else 0
        if node.failsafe:
            fsafe += 1
        while True:
            e = node.pop_event()
            if e is None:
                break
            events.append([t, e[0], e[1]])
        node.service()
        hw.sleep_ms(node.period_ms)
    return {"alloc": list(alloc), "raised": list(raised), "failsafe_ticks": fsafe,
            "events": events, "ticks": node.ticks, "readings": node.readings}

print("@@CONTROL@@" + json.dumps(measure_control()))
for spec in json.loads(sys.stdin.read()):
    print("@@RUN@@" + json.dumps(run(spec)))
"""

# Every fault kind that does not take the sensor off the bus (stuck, out of range,
# drift), an identify blink and a quarantine, in 30 simulated minutes at 1 tick/s.
NO_RAISE = {
    "sim": {"seed": 5, "zone_seed": 9, "weather": "mild", "speed": 0, "faults": [
        {"at_s": 200, "kind": "stuck", "duration_s": 120},
        {"at_s": 700, "kind": "spike", "value": 70.0},
        {"at_s": 1000, "kind": "drift", "duration_s": 300, "value": 0.01},
    ]},
    "ticks": 1800,
    "commands": {"50": "identify", "1400": "quarantine", "1450": "release"},
}
# The sensor leaves the bus twice and comes back (re-probed by service(), outside).
SENSOR_OFF = {
    "sim": {"seed": 2, "weather": "hot", "speed": 0, "faults": [
        {"at_s": 100, "kind": "sensor_off", "duration_s": 60},
        {"at_s": 400, "kind": "sensor_off", "duration_s": 30},
    ]},
    "ticks": 600,
}


def _runs(compiled: bool) -> tuple[int, list[dict]]:
    proc = run_code(_HARNESS, stdin=json.dumps([NO_RAISE, SENSOR_OFF]), compiled=compiled, timeout=240)
    control = None
    runs = []
    for line in proc.stdout.splitlines():
        if line.startswith("@@CONTROL@@"):
            control = json.loads(line[len("@@CONTROL@@"):])
        elif line.startswith("@@RUN@@"):
            runs.append(json.loads(line[len("@@RUN@@"):]))
    assert proc.returncode == 0 and control is not None and len(runs) == 2, proc.stderr + proc.stdout[-2000:]
    return control, runs


FORMS = ["sources", "compiled"]


@pytest.fixture(scope="module", params=FORMS)
def measured(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    compiled = request.param == "compiled"
    if compiled and compiled_firmware() is None:
        pytest.skip("no mpy-cross or unknown unix-port architecture: no compiled firmware")
    return _runs(compiled)


def _nonzero(run: dict) -> dict[int, int]:
    return {t: b for t, b in enumerate(run["alloc"]) if b}


def test_the_measurement_sees_frame_allocations(measured: tuple[int, list[dict]]) -> None:
    control, _ = measured
    assert control > 0


def test_ticks_allocate_nothing_through_faults_and_recovery(measured: tuple[int, list[dict]]) -> None:
    run = measured[1][0]
    assert run["ticks"] == NO_RAISE["ticks"]
    assert _nonzero(run) == {}, "ticks (index: bytes) that allocated with the heap unlocked"
    names = [e[1] for e in run["events"]]
    # The run went through failsafe and out of it again, more than once (stuck, range),
    # and spent most of its time on the normal control path.
    assert names.count("failsafe") >= 2 and names.count("recovered") >= 2, run["events"]
    assert run["readings"] > 1500
    assert 0 < run["failsafe_ticks"] < 300


def test_sensor_off_only_the_failing_transfer_allocates(measured: tuple[int, list[dict]]) -> None:
    # A transfer that fails raises an OSError inside the tick: on the chip machine.I2C
    # builds a new exception object, in the unix port the simulated bus raises one
    # preallocated instance, which records its traceback on the heap. That one tick per
    # outage may allocate; every other tick (failsafe during the outage, re-probe,
    # recovery) must not.
    run = measured[1][1]
    assert run["ticks"] == SENSOR_OFF["ticks"]
    failing = [t for t, r in enumerate(run["raised"]) if r]
    assert len(failing) == 2, failing  # two outages, each noticed in one tick
    assert set(_nonzero(run)) <= set(failing), _nonzero(run)
    names = [e[1] for e in run["events"]]
    assert names.count("recovered") == 2 and names.count("sensor") >= 4, run["events"]
    assert run["failsafe_ticks"] > 90
