"""Find the serial ports canopy nodes may sit on, and say what each one probably is.

Usage::

    for p in list_candidate_ports():
        print(p.device, p.usb_id, p.bridge, [b.name for b in p.boards], p.node_id)

The board guess comes from the ``usb`` lists in ``boards/*.json``; the node id from the
node registry (a JSON file written when nodes are provisioned), if there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serial.tools import list_ports

from . import registry
from .boards import Board, guess_board

# Cheap bridges often ship with one serial number for every unit, so a serial like
# "0001" says nothing about which board is which; fall back to the USB port path.
GENERIC_SERIALS = registry.GENERIC_SERIALS


@dataclass
class PortInfo:
    device: str
    vid: int | None
    pid: int | None
    serial_number: str | None
    description: str
    location: str | None
    bridge: str | None = None
    boards: list[Board] = field(default_factory=list)
    node_id: str | None = None

    @property
    def usb_id(self) -> str:
        return f"{self.vid:04X}:{self.pid:04X}" if self.vid is not None and self.pid is not None else "-"

    @property
    def serial_is_generic(self) -> bool:
        return (self.serial_number or "") in GENERIC_SERIALS

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "usb_id": self.usb_id if self.vid is not None else None,
            "serial_number": self.serial_number,
            "serial_is_generic": self.serial_is_generic,
            "location": self.location,
            "description": self.description,
            "bridge": self.bridge,
            "boards": [b.name for b in self.boards],
            "node_id": self.node_id,
        }


def default_registry_path() -> Path:
    return registry.default_path()


def load_registry(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """node id -> its registry record (mac, usb_serial, location, ...). Missing/broken file: empty."""
    return registry.Registry.load(path).nodes


def lookup_node_id(port: PortInfo, nodes: dict[str, dict[str, Any]]) -> str | None:
    """The node seen on this port before, from USB data alone (see `registry.Registry.by_usb`):
    a unique serial number, else the USB location. Boards sharing a factory serial are
    told apart for certain only by MAC, which `canopy provision` reads from the chip."""
    return registry.Registry(default_registry_path(), nodes).by_usb(port.serial_number, port.location)


def _bridge(vid: int | None, pid: int | None, boards: list[Board]) -> str | None:
    names = []
    for board in boards:
        for usb in board.usb:
            if (usb.vid, usb.pid) == (vid, pid) and usb.bridge not in names:
                names.append(usb.bridge)
    return " / ".join(names) if names else None


def list_candidate_ports(include_non_usb: bool = False, registry_path: Path | None = None) -> list[PortInfo]:
    """USB serial ports (and, if asked, built-in UARTs), with bridge, board and node guesses."""
    registry = load_registry(registry_path)
    found = []
    for raw in sorted(list_ports.comports(), key=lambda p: p.device):
        if raw.vid is None and not include_non_usb:
            continue
        boards = guess_board(raw.vid, raw.pid)
        info = PortInfo(
            device=raw.device,
            vid=raw.vid,
            pid=raw.pid,
            serial_number=raw.serial_number,
            description=raw.description or "",
            location=raw.location,
            bridge=_bridge(raw.vid, raw.pid, boards),
            boards=boards,
        )
        info.node_id = lookup_node_id(info, registry)
        found.append(info)
    return found


def ports_for_board(board: Board, include_non_usb: bool = False) -> list[PortInfo]:
    return [p for p in list_candidate_ports(include_non_usb) if any(b.name == board.name for b in p.boards)]
