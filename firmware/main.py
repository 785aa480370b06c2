"""Canopy node entry point: the same file runs on the ESP32 and in the unix port.

Loads the board (``board.json``; in the unix port the board named in ``sim.json``),
the config (``config.json`` over the defaults), builds the node and runs ``loop``:
one ``node.tick()`` per ``tick_ms``, then ``link.service(now_ms)`` and housekeeping
between ticks. In the unix port the clock is simulated, so sleeping between ticks
advances the simulated world and time can run faster than real time.

Run a virtual node by hand (the folder is its "flash": sim.json, boot_id, config.json)::

    mkdir -p /tmp/n01 && cd /tmp/n01
    echo '{"node_id": "n01", "seed": 1, "weather": "mild"}' > sim.json
    CANOPY_SPEED=0 CANOPY_RUN_S=600 CANOPY_EVERY=60 MICROPYPATH=/path/to/firmware \\
        micropython /path/to/firmware/main.py

Environment (unix port only; the chip has no environment):
    CANOPY_RUN_S   stop after this many simulated seconds (default: run forever)
    CANOPY_SPEED   simulated seconds per wall second, 0 = as fast as possible
                   (default: sim.json "speed", else real time)
    CANOPY_EVERY   text link: print a reading every N ticks (default 10)
    CANOPY_LINK    "text" for the text link (default: the framed, authenticated link)
    CANOPY_AUTH    "dev": run unauthenticated when there is no key file (docs/security.md)
"""

import gc
import os
import sys

from micropython import const

from canopy import config as _config
from canopy import hal

try:
    from time import ticks_add, ticks_diff
except ImportError:  # CPython-side tooling importing this file
    def ticks_add(a, b):
        return a + b

    def ticks_diff(a, b):
        return a - b


def _env(name, default=None):
    getenv = getattr(os, "getenv", None)
    v = getenv(name) if getenv else None
    return default if v in (None, "") else v


def _fixed(v, scale):
    """Int in 1/scale units as a decimal string with 2 digits, without floats."""
    sign = "-" if v < 0 else ""
    v = -v if v < 0 else v
    whole = v // scale
    frac = (v - whole * scale) * 100 // scale
    return "%s%d.%02d" % (sign, whole, frac)


def _put_fixed(w, v, scale, after):
    """`_fixed(v, scale) + after` written through `w`, without building the line."""
    w(_fixed(v, scale))
    w(after)


class TextLink:
    """Default link: one human-readable line per reading (every `every` ticks) and per event.

    ``R t=12s T=25.43C (raw 25.50) P=100582Pa (raw 100580) H=45.12% (raw 45.30)
    shade=55.00% mist=0.00% fan=20.00% faults=0 failsafe=0``
    ``E t=12s event=failsafe arg=1``
    """

    def __init__(self, node, every=10, out=None):
        self.node = node
        self.every = every if every > 0 else 1
        # Lines go out in small pieces: one formatted line needs a tuple and a ~170-byte
        # string at once, and on a 64k heap that much contiguous room is not always free.
        self._write = out or sys.stdout.write
        self._last = -1

    def service(self, now_ms):
        node = self.node
        secs = node.ticks * node.period_ms // 1000
        if self._last < 0:
            c = node.cfg
            self._write(
                "I node boot=%d tick=%dms setpoints: T=%sC mist above %sC fan above H=%s%% "
                "mist blocked at H=%s%%\n"
                % (
                    node.boot_id, c["tick_ms"], _fixed(c["t_setpoint"], 100),
                    _fixed(c["mist_t_setpoint"], 100), _fixed(c["h_setpoint"], 1024),
                    _fixed(c["h_ceiling"], 1024),
                )
            )
            self._last = 0
        while True:
            ev = node.pop_event()
            if ev is None:
                break
            self._write("E t=%ds event=%s arg=%d\n" % (secs, ev[0], ev[1]))
        if node.ticks != self._last and node.ticks % self.every == 0:
            self._last = node.ticks
            r, m, o = node.raw, node.meas, node.out
            w = self._write
            w("R t=%ds T=" % secs)
            _put_fixed(w, m[0], 100, "C (raw ")
            _put_fixed(w, r[0], 100, ") P=")
            w("%dPa (raw %d) H=" % (m[1], r[1]))
            _put_fixed(w, m[2], 1024, "% (raw ")
            _put_fixed(w, r[2], 1024, ") shade=")
            _put_fixed(w, o[0], 100, "% mist=")
            _put_fixed(w, o[1], 100, "% fan=")
            _put_fixed(w, o[2], 100, "% faults=")
            w("%d failsafe=%d\n" % (node.faults, 1 if node.failsafe else 0))


def load_config(path="config.json"):
    """config.json over the defaults; a bad file is reported and the defaults used,
    so a typo in the config cannot stop the node from keeping its failsafe duties."""
    try:
        return _config.merged(read_overrides(path))
    except ValueError as e:
        print("canopy: %s ignored: %s" % (path, e))
        return _config.merged()


def read_overrides(path="config.json"):
    """The settings in config.json as read, None without a file; `Node` merges them over
    the defaults and checks them (once: `load_config` and then `Node` would check twice,
    loading the checks while the node is being built, the peak of a small heap)."""
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError:
        return None
    if not isinstance(data, dict):
        raise ValueError("config: %s must hold a JSON object" % path)
    return data


def make_link(node):
    """The serial link serviced between ticks.

    CANOPY_LINK=text always selects the text link (unauthenticated, read-only: it takes
    no commands). Otherwise the authenticated framed link, from the flash
    (docs/security.md): strict with a key file; unauthenticated dev mode only when
    sim.json says "auth": "dev" or CANOPY_AUTH=dev; with neither, commands are refused.
    """
    if _env("CANOPY_LINK") == "text":
        return TextLink(node, int(_env("CANOPY_EVERY", "10")))
    from canopy.link import from_flash

    return from_flash(node)


def loop(node, link, run_ms=0):
    """Tick every cfg tick_ms; between ticks service the link and the node.

    run_ms > 0 stops after that much (simulated, in the unix port) time; 0 runs forever.
    """
    hw = node.hw
    start = hw.ticks_ms()
    deadline = start
    while True:
        node.tick()
        now = hw.ticks_ms()
        link.service(now)
        node.service()
        if run_ms and ticks_diff(now, start) + node.period_ms >= run_ms:
            return
        deadline = ticks_add(deadline, node.period_ms)
        wait = ticks_diff(deadline, hw.ticks_ms())
        if wait > 0:
            hw.sleep_ms(wait)
        else:
            # Overran the period: skip ahead rather than fire a burst of late ticks.
            deadline = hw.ticks_ms()


# Collect after this many bytes of allocation while the node is being built (see main).
_START_GC_BYTES = const(2048)


def _unload(name):
    # Start-up-only module: forget it so its bytecode is collected (its names stay
    # interned; an import later on simply loads it again).
    sys.modules.pop(name, None)
    pkg, _, attr = name.rpartition(".")
    parent = sys.modules.get(pkg)
    if parent is not None and attr in getattr(parent, "__dict__", ()):
        delattr(parent, attr)


def _start_gc(nbytes):
    threshold = getattr(gc, "threshold", None)  # absent on CPython
    if threshold is not None:
        threshold(nbytes)


def main():
    # Start-up garbage (JSON, .mpy loading, dicts outgrowing their tables) is collected
    # every few KB instead of when the heap is full: otherwise the long-lived objects
    # built meanwhile end up scattered between holes too small for the next dict table
    # or qstr pool, and a small heap fails with a third of it free. docs/firmware.md
    # "Memory budget" has the measurements.
    _start_gc(_START_GC_BYTES)
    try:
        from canopy import board

        hw = hal.open(board.load())
    except ValueError as e:  # BoardError, or a bad sim.json in the unix port
        _start_gc(-1)
        print("canopy: cannot start: %s" % e)
        return 2
    board = None
    _unload("canopy.board")
    _unload("canopy.sim.build")  # virtual nodes: sim.json checks, building the simulation
    gc.collect()
    # Imported only now: the start-up-only modules above came and went while less was
    # allocated, which keeps the peak down and their holes at the bottom of the heap.
    from canopy.node import Node

    try:
        node = Node(hw, read_overrides())
    except ValueError as e:
        # As in load_config: a typo in config.json must not stop the failsafe duties.
        print("canopy: config.json ignored: %s" % e)
        node = Node(hw)
    _unload("canopy.configcheck")  # config checks (if config.json had any): done
    gc.collect()
    link = make_link(node)
    err = getattr(link, "repair_error", None)
    if err is not None:
        # The link runs on without it (failsafe duties first), but say so: a node that
        # ignores cfg_* commands must not look like one that answers them.
        print("canopy: repair agent not started: %r" % (err,))
    err = None
    gc.collect()
    _start_gc(-1)  # steady state: only a full heap triggers a collection
    run_s = int(_env("CANOPY_RUN_S", "0"))
    loop(node, link, run_s * 1000)


if __name__ == "__main__":
    main()
