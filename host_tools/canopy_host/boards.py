"""Board data from ``boards/*.json``: chip, flash offset, USB ids, pins.

Usage::

    from canopy_host.boards import load_board, all_boards, guess_board
    board = load_board("esp32-devkitc")
    board.chip, hex(board.flash_offset)          # ('ESP32', '0x1000')
    [b.name for b in guess_board(0x10C4, 0xEA60)] # every board sold with a CP210x bridge

Adding a board is adding a JSON file; nothing here branches on board names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CanopyError
from .paths import BOARDS_DIR

# Chips the host toolchain knows how to treat; "unix" is the virtual node.
KNOWN_CHIPS = ("ESP32", "ESP32-S2", "ESP32-S3", "ESP32-C3", "ESP32-C6", "unix")


@dataclass(frozen=True)
class UsbId:
    vid: int
    pid: int
    bridge: str

    def __str__(self) -> str:
        return f"{self.vid:04X}:{self.pid:04X}"


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    chip: str
    flash_offset: int | None  # None: nothing to flash (virtual node)
    mpy_arch: str | None
    firmware_pattern: str | None
    usb: tuple[UsbId, ...]
    i2c: dict[str, int] = field(default_factory=dict)
    pins: dict[str, int] = field(default_factory=dict)
    status_led_kind: str = "gpio"
    path: Path | None = None

    @property
    def flashable(self) -> bool:
        return self.flash_offset is not None


# field name -> (accepted types, required)
_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True),
    "description": ((str,), True),
    "chip": ((str,), True),
    "flash_offset": ((int, type(None)), True),
    "mpy_arch": ((str, type(None)), True),
    "firmware_pattern": ((str, type(None)), True),
    "usb": ((list,), True),
    "i2c": ((dict,), False),
    "pins": ((dict,), False),
    "status_led_kind": ((str,), False),
}


def _hex16(value: Any, what: str, where: str) -> int:
    try:
        number = int(str(value), 16)
    except ValueError:
        raise CanopyError(f"{where}: {what} {value!r} is not a hex USB id like \"10C4\"") from None
    if not 0 <= number <= 0xFFFF:
        raise CanopyError(f"{where}: {what} {value!r} is out of range (0000-FFFF)")
    return number


def parse_board(data: Any, where: str = "<board>") -> Board:
    """Validate one board's JSON object; errors name the file and the field."""
    if not isinstance(data, dict):
        raise CanopyError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key, (types, required) in _SCHEMA.items():
        if key not in data:
            if required:
                raise CanopyError(f"{where}: missing field {key!r}")
            continue
        if not isinstance(data[key], types) or isinstance(data[key], bool):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CanopyError(f"{where}: field {key!r} must be {names}, got {data[key]!r}")
    unknown = set(data) - set(_SCHEMA)
    if unknown:
        raise CanopyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if data["chip"] not in KNOWN_CHIPS:
        raise CanopyError(f"{where}: chip {data['chip']!r} is not one of {', '.join(KNOWN_CHIPS)}")
    offset = data["flash_offset"]
    if offset is not None and (offset < 0 or offset % 0x1000):
        raise CanopyError(f"{where}: flash_offset {offset} must be a multiple of 4096 (a flash sector)")
    usb = []
    for i, entry in enumerate(data["usb"]):
        if not isinstance(entry, dict) or not {"vid", "pid", "bridge"} <= set(entry):
            raise CanopyError(f"{where}: usb[{i}] needs vid, pid and bridge")
        usb.append(UsbId(_hex16(entry["vid"], "vid", where), _hex16(entry["pid"], "pid", where), str(entry["bridge"])))
    return Board(
        name=data["name"],
        description=data["description"],
        chip=data["chip"],
        flash_offset=offset,
        mpy_arch=data["mpy_arch"],
        firmware_pattern=data["firmware_pattern"],
        usb=tuple(usb),
        i2c=dict(data.get("i2c", {})),
        pins=dict(data.get("pins", {})),
        status_led_kind=data.get("status_led_kind", "gpio"),
    )


def _load_file(path: Path) -> Board:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CanopyError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    board = parse_board(data, str(path))
    if board.name != path.stem:
        raise CanopyError(f"{path}: \"name\" is {board.name!r} but the file is {path.stem}.json; make them match")
    return Board(**{**board.__dict__, "path": path})


def all_boards(boards_dir: Path | None = None) -> list[Board]:
    """Every board in ``boards/``, sorted by name."""
    directory = boards_dir or BOARDS_DIR
    return [_load_file(p) for p in sorted(directory.glob("*.json"))]


def load_board(name: str, boards_dir: Path | None = None) -> Board:
    directory = boards_dir or BOARDS_DIR
    path = directory / f"{name}.json"
    if "/" in name or "\\" in name or not path.is_file():
        known = ", ".join(p.stem for p in sorted(directory.glob("*.json")))
        raise CanopyError(f"unknown board {name!r}; known boards: {known} (add one as boards/NAME.json)")
    return _load_file(path)


def guess_board(vid: int | None, pid: int | None, boards_dir: Path | None = None) -> list[Board]:
    """Boards sold with this USB VID:PID, best guess first (boards listing it earliest).

    Bridge chips are shared (a CP2102 sits on many boards), so this is a list of
    candidates; an empty list means nothing in ``boards/`` uses that id.
    """
    if vid is None or pid is None:
        return []
    ranked = []
    for board in all_boards(boards_dir):
        for rank, usb in enumerate(board.usb):
            if (usb.vid, usb.pid) == (vid, pid):
                ranked.append((rank, board.name, board))
                break
    return [b for _, _, b in sorted(ranked, key=lambda t: (t[0], t[1]))]


def bridge_name(vid: int | None, pid: int | None, boards_dir: Path | None = None) -> str | None:
    """The USB-serial bridge a VID:PID denotes, as the board data names it."""
    for board in guess_board(vid, pid, boards_dir):
        for usb in board.usb:
            if (usb.vid, usb.pid) == (vid, pid):
                return usb.bridge
    return None


def boards_for_chip(chip: str, boards_dir: Path | None = None) -> list[Board]:
    return [b for b in all_boards(boards_dir) if b.chip == chip]
