"""MicroPython-side harness for the node tests: build a virtual node, run ticks, report.

Runs in the unix port (via canopy_host.unixport.call_batch); results are plain lists
and dicts so CPython can assert on them. World stepping always happens outside
`heap_lock`, ticks inside when asked: that is the allocation-free contract.
"""

import micropython

from canopy import board
from canopy.sim import hal as sim_hal
from canopy.node import Node


def _build(sim, cfg):
    if "speed" not in sim:
        sim["speed"] = 0  # as fast as possible: tests never wait on the wall clock
    hw = sim_hal.open(board.load("unix-sim"), sim)
    node = Node(hw, cfg or None, boot_id=1)
    return hw, node


def lock_works():
    """Sanity check of the proof itself: does an allocation under heap_lock fail here?"""
    micropython.heap_lock()
    try:
        x = [1, 2, 3]
        ok = False
    except MemoryError:
        ok = True
    micropython.heap_unlock()
    return ok


def run_locked(sim, cfg, n):
    """n ticks, each under heap_lock. Returns ticks that raised and what happened."""
    hw, node = _build(sim, cfg)
    period = node.period_ms
    failed = []
    failsafe_ticks = 0
    events = []
    fault_union = 0
    for i in range(n):
        micropython.heap_lock()
        try:
            node.tick()
            err = 0
        except MemoryError:
            err = 1
        micropython.heap_unlock()
        if err and len(failed) < 10:
            failed.append(i)
        if node.failsafe:
            failsafe_ticks += 1
        fault_union |= node.faults
        while True:
            e = node.pop_event()
            if e is None:
                break
            events.append([i, e[0], e[1]])
        node.service()
        hw.sleep_ms(period)
    return {"failed": failed, "failsafe_ticks": failsafe_ticks, "events": events,
            "fault_union": fault_union, "ticks": node.ticks}


def trajectory(sim, cfg, n):
    """Run n ticks; per tick: true T (0.01 C), true RH (0.01 %), measured/raw T and H,
    outputs, physical actuator positions (0.01 %), faults, failsafe."""
    hw, node = _build(sim, cfg)
    world = hw.world
    period = node.period_ms
    cols = ("t_true", "rh_true", "t_raw", "t", "h", "shade", "mist", "fan",
            "shade_pos", "mist_pos", "fan_pos", "faults", "failsafe", "led")
    out = {}
    for c in cols:
        out[c] = []
    events = []
    for i in range(n):
        node.tick()
        c = world.canopy
        pos = world.actuator_positions()
        row = (int(c.t_c * 100), int(c.rh_pct * 100), node.raw[0], node.meas[0], node.meas[2],
               node.out[0], node.out[1], node.out[2],
               int(pos[0] * 10000 + 0.5), int(pos[1] * 10000 + 0.5), int(pos[2] * 10000 + 0.5),
               node.faults, 1 if node.failsafe else 0, world.led.value() if world.led else 0)
        for k in range(len(cols)):
            out[cols[k]].append(row[k])
        while True:
            e = node.pop_event()
            if e is None:
                break
            events.append([i, e[0], e[1]])
        node.service()
        hw.sleep_ms(period)
    out["events"] = events
    out["cfg"] = {"t_setpoint": node.cfg["t_setpoint"], "h_ceiling": node.cfg["h_ceiling"],
                  "safe_shade": node.cfg["safe_shade"], "safe_fan": node.cfg["safe_fan"],
                  "stuck_n": node.cfg["stuck_n"], "recover_m": node.cfg["recover_m"]}
    return out


def commands(sim, script):
    """Drive the link-facing commands; script = [[tick, cmd, args...], ...] then report."""
    hw, node = _build(sim, None)
    period = node.period_ms
    results = []
    led_changes = []
    n = 0
    for step in script:
        at = step[0]
        while node.ticks < at:
            node.tick()
            node.service()
            led_changes.append(hw.world.led.value())
            hw.sleep_ms(period)
        cmd = step[1]
        try:
            if cmd == "set":
                node.set_config(step[2])
                r = ["ok", node.cfg["t_setpoint"], node.ctrl._par[1]]
            elif cmd == "calibrate":
                r = ["ok", node.calibrate_offset(step[2], step[3]), list(node.raw), list(node.adj)]
            elif cmd == "identify":
                node.identify(step[2])
                r = ["ok"]
            elif cmd == "ring":
                for k in range(step[2]):
                    node._push(4, k)
                r = ["ok", node.events_dropped]
            else:
                r = ["unknown"]
        except ValueError as e:
            r = ["ValueError", str(e)]
        results.append(r)
        n += 1
    ev = []
    while True:
        e = node.pop_event()
        if e is None:
            break
        ev.append(list(e))
    return {"results": results, "events": ev, "led": led_changes}


def leak_check(sim, warm, n):
    """Run main.loop (text link to a null writer) and compare the live heap after `warm`
    ticks with the live heap after `n` more: the steady-state loop must not grow."""
    import gc

    import main

    hw, node = _build(sim, None)
    link = main.TextLink(node, 1, out=lambda s: None)
    main.loop(node, link, warm * node.period_ms)
    gc.collect()
    a = gc.mem_alloc()
    main.loop(node, link, n * node.period_ms)
    gc.collect()
    b = gc.mem_alloc()
    return [a, b, node.ticks]
