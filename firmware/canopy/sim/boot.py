"""Unix-port boot shim: make a virtual node start up the way an ESP32 board does.

The supervisor (`canopy sim`, host_tools/canopy_host/sim.py) runs one of these per
virtual node, with the node's folder (its "flash") as the current directory::

    CANOPY_SIM_BOOT=hard micropython -i /path/to/firmware/canopy/sim/boot.py

`CANOPY_SIM_BOOT` says which kind of start this is:

- ``hard`` (power-on, reset, crash) and ``soft`` (Ctrl-D in the friendly REPL): run
  ``boot.py`` then ``main.py`` from the node folder (the firmware's ``main.py`` when the
  folder has none), then fall into the REPL (``-i``), like the chip does.
- ``raw`` (Ctrl-D in the raw REPL, which is how mpremote soft-resets): run ``boot.py``
  only; the supervisor has queued Ctrl-A so the REPL comes up in raw mode.

The unix port has no ``machine.reset``; mpremote's ``reset`` needs one, so a thin
``machine`` stand-in that adds it and ``unique_id()`` (a stable fake MAC derived from the
node id; ``network.WLAN().config('mac')`` returns the same, as on the chip), delegating
everything else, goes into
``sys.modules``; ``os`` gets the same treatment so ``os.ilistdir`` reports file sizes. Exiting the process with status 3 (from the REPL) or SIGUSR1 (from
boot.py/main.py, see ``_end_process``) is what the supervisor reads as a hard reset;
status 3 is also what the simulated HAL raises for ``node.reboot()``.
"""

import os
import sys

import machine as _builtin_machine

# The chip's sys.path starts with the flash root; the unix port puts this script's
# own directory first, which would let canopy/sim/*.py shadow top-level names.
sys.path[0] = ""

RESET_STATUS = 3


class _Machine:
    def __getattr__(self, name):
        return getattr(_builtin_machine, name)

    def reset(self):
        raise SystemExit(RESET_STATUS)

    def soft_reset(self):
        raise SystemExit(0)

    def unique_id(self):
        return _sim_mac()


def _sim_mac():
    # A virtual node's stand-in for the MAC burnt into an ESP32 (machine.unique_id()
    # returns it there): stable per node id, locally administered, unicast.
    import hashlib
    import json

    try:
        with open("sim.json") as f:
            nid = json.load(f).get("node_id") or "sim"
    except (OSError, ValueError, AttributeError):
        nid = "sim"
    mac = bytearray(hashlib.sha256(b"canopy-sim-mac:" + nid.encode()).digest()[:6])
    mac[0] = (mac[0] & 0xFC) | 0x02
    return bytes(mac)


class _WLAN:
    def __init__(self, *args):
        pass

    def config(self, name):
        if name == "mac":
            return _sim_mac()
        raise ValueError("unknown config param")


class _Network:
    STA_IF = 0
    AP_IF = 1
    WLAN = _WLAN


sys.modules["machine"] = _Machine()
try:
    import network  # noqa: F401
except ImportError:
    sys.modules["network"] = _Network()

_builtin_os = os


class _Os:
    # The chip's filesystems list (name, type, inode, size); the unix port leaves out
    # the size, which makes `mpremote fs ls` (and deploy checks built on it) show 0.
    def __getattr__(self, name):
        return getattr(_builtin_os, name)

    def ilistdir(self, path="."):
        prefix = "" if path in ("", ".") else path.rstrip("/") + "/"
        for entry in _builtin_os.ilistdir(path):
            if len(entry) > 3:
                yield entry
                continue
            size = 0
            if entry[1] == 0x8000:
                try:
                    size = _builtin_os.stat(prefix + entry[0])[6]
                except OSError:
                    pass
            yield (entry[0], entry[1], entry[2], size)


sys.modules["os"] = _Os()


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _firmware_main():
    for d in sys.path[1:]:
        if d and d != ".frozen":
            src = _read(d + "/main.py")
            if src is not None:
                return d + "/main.py", src
    return None, None


def _end_process(code):
    # On the chip, SystemExit out of main.py resets it (a soft reset for sys.exit(),
    # a hard one for machine.reset()/node.reboot()). The unix port's -i would swallow it
    # and open the REPL, and it has no os._exit, so the process signals itself; the
    # supervisor reads SIGUSR2 as a soft and SIGUSR1 as a hard reset.
    os.system("kill -%s $PPID" % ("USR2" if not code else "USR1"))


def _run(path, src):
    # Boards keep going after a failing boot.py/main.py and show the traceback;
    # only a reset (SystemExit) ends the "board" run.
    try:
        exec(compile(src, path, "exec"), globals())
    except SystemExit as e:
        _end_process(e.args[0] if e.args else 0)
        raise
    except BaseException as e:  # KeyboardInterrupt included: Ctrl-C lands in the REPL
        sys.print_exception(e)


def _boot(mode):
    src = _read("boot.py")
    if src is not None:
        _run("boot.py", src)
    if mode == "raw":
        return
    path = "main.py"
    src = _read(path)
    if src is None:
        path, src = _firmware_main()
    if src is not None:
        _run(path, src)


_boot(os.getenv("CANOPY_SIM_BOOT") or "hard")
