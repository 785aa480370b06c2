"""Board definition: pins and buses of the board this firmware runs on.

The host deploys the repository's ``boards/<name>.json`` next to the firmware as
``board.json``. In the unix port (virtual nodes) there is no deployed copy, so the
board named by ``sim.json`` (default ``unix-sim``) is read from the repository's
``boards/`` folder, found relative to this file.

Usage::

    from canopy import board
    b = board.load()              # board.json, or boards/unix-sim.json in the unix port
    b["pins"]["shade"]            # -> 25 on an ESP32-DevKitC
"""

import json
import sys

DEPLOYED = "board.json"
_REQUIRED_PINS = ("shade", "mist", "fan")
# boards/*.json fields only the host tools read (docs/flashing.md, canopy ports)
_HOST_ONLY = ("description", "usb", "flash_offset", "mpy_arch", "firmware_pattern")


class BoardError(ValueError):
    """The board definition is missing or unusable; the message says which and why."""


def _exists(path):
    try:
        open(path).close()
        return True
    except OSError:
        return False


def _repo_boards_dir():
    # <firmware>/canopy/board.py -> <firmware>/../boards, for absolute and relative __file__
    fw = "/".join(__file__.replace("\\", "/").split("/")[:-2])
    return (fw + "/../boards") if fw else "../boards"


def find(name=None):
    """Path of the board file to use: an explicit name/path, board.json, or the repo copy."""
    if name:
        if name.endswith(".json"):
            return name
        return _repo_boards_dir() + "/" + name + ".json"
    if _exists(DEPLOYED):
        return DEPLOYED
    # A virtual node (unix port) names its board in sim.json; the file is in the repo.
    name = "unix-sim"
    if sys.platform != "esp32":
        try:
            with open("sim.json") as f:
                name = json.load(f).get("board") or name
        except (OSError, ValueError, AttributeError):
            pass
    return _repo_boards_dir() + "/" + name + ".json"


def validate(b):
    """Check the fields the node needs; raise BoardError naming the first bad one."""
    if not isinstance(b, dict):
        raise BoardError("board definition must be a JSON object")
    pins = b.get("pins")
    if not isinstance(pins, dict):
        raise BoardError("board %r has no 'pins' object" % b.get("name"))
    for key in _REQUIRED_PINS:
        if not isinstance(pins.get(key), int):
            raise BoardError("board %r: pins.%s must be an integer GPIO" % (b.get("name"), key))
    i2c = b.get("i2c")
    if not isinstance(i2c, dict):
        raise BoardError("board %r has no 'i2c' object" % b.get("name"))
    for key in ("id", "sda", "scl"):
        if not isinstance(i2c.get(key), int):
            raise BoardError("board %r: i2c.%s must be an integer" % (b.get("name"), key))
    return b


def load(name=None):
    """Read, parse and validate a board definition (see `find` for which file)."""
    path = find(name)
    try:
        with open(path) as f:
            b = json.load(f)
    except OSError:
        raise BoardError("board file %s not found (deploy boards/<name>.json as board.json)" % path)
    except ValueError:
        raise BoardError("board file %s is not valid JSON" % path)
    validate(b)
    # Keep what the node uses: the host-side fields (USB ids, flash layout, description)
    # would otherwise stay allocated with the Hardware for the node's whole life.
    return {k: v for k, v in b.items() if k not in _HOST_ONLY}
