"""The one way host tools open a node: a serial port, physical or virtual.

Physical boards (`/dev/ttyUSB0`, `COM3`), virtual nodes (the pseudo-terminals that
`canopy sim` prints, e.g. `/dev/pts/7`) and pyserial URLs (`socket://host:4000`,
`loop://`) all go through `serial.serial_for_url`, exactly as esptool and mpremote
open them, so a tool tested against virtual nodes runs the same code on hardware.

A virtual node may also be named by its id (`n01` or `sim:n01`); `resolve_port`
looks up its current pty in the `canopy sim` state file, because a simulated unplug
can bring it back at a new path.

Usage::

    from canopy_host.transport import open_port
    with open_port("/dev/pts/7") as port:
        port.write(b"\\r\\x03")
        print(port.read(100))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import serial

from .errors import CanopyError

DEFAULT_BAUD = 115200
DEFAULT_STATE_FILE = Path("var/sim/state.json")
STATE_FILE_ENV = "CANOPY_SIM_STATE"


def is_url(port: str) -> bool:
    """True for pyserial URLs such as `socket://host:4000` or `rfc2217://...`."""
    return "://" in port


def open_port(url_or_path: str, baud: int = DEFAULT_BAUD, *, timeout: float | None = 0.1,
              exclusive: bool = False) -> serial.Serial:
    """Open a node's serial port; a missing or busy port becomes a clear CanopyError.

    `timeout` is pyserial's read timeout in seconds (None blocks). `exclusive` takes
    an advisory lock like mpremote does, so two tools cannot interleave commands.
    """
    if not url_or_path:
        raise CanopyError("no serial port given (e.g. /dev/ttyUSB0, COM3, or a path from `canopy sim`)")
    try:
        port = serial.serial_for_url(url_or_path, baudrate=baud, timeout=timeout,
                                     do_not_open=True)
        if exclusive and not is_url(url_or_path):
            port.exclusive = True  # left unset otherwise: Windows rejects exclusive=False
        port.open()
    except (serial.SerialException, OSError, ValueError) as exc:
        hint = ""
        if not is_url(url_or_path) and not os.path.exists(url_or_path):
            hint = " (no such device: is the board plugged in, or the virtual node running?)"
        raise CanopyError(f"cannot open serial port {url_or_path!r}: {exc}{hint}") from exc
    return port


def state_file_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The `canopy sim` state file: `path`, else $CANOPY_SIM_STATE, else var/sim/state.json."""
    if path:
        return Path(path)
    env = os.environ.get(STATE_FILE_ENV)
    return Path(env) if env else DEFAULT_STATE_FILE


def load_sim_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read the state file `canopy sim` keeps up to date (node ids, ptys, pids)."""
    p = state_file_path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise CanopyError(f"no virtual nodes: {p} does not exist (start them with `canopy sim`)") from exc
    except (OSError, ValueError) as exc:
        raise CanopyError(f"cannot read the sim state file {p}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise CanopyError(f"{p} is not a `canopy sim` state file")
    return data


def resolve_port(port_or_node: str, state_file: str | os.PathLike[str] | None = None) -> str:
    """Turn `sim:n01` (or a bare node id listed in the state file) into its current pty path.

    Anything else (a device path, `COM3`, a URL) comes back unchanged.
    """
    explicit = port_or_node.startswith("sim:")
    name = port_or_node[4:] if explicit else port_or_node
    if not explicit and (os.sep in name or is_url(name) or not state_file_path(state_file).exists()):
        return port_or_node
    try:
        nodes = load_sim_state(state_file)["nodes"]
    except CanopyError:
        if explicit:
            raise
        return port_or_node
    for node in nodes:
        if isinstance(node, dict) and node.get("node_id") == name:
            if not node.get("port"):
                raise CanopyError(
                    f"virtual node {name} has no port right now (state: {node.get('state')}); "
                    "it may be simulating an unplugged cable"
                )
            return str(node["port"])
    if explicit:
        raise CanopyError(f"no virtual node named {name!r} in {state_file_path(state_file)}")
    return port_or_node
