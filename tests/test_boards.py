"""boards/*.json loading and validation."""

from __future__ import annotations

import json

import pytest

from canopy_host.boards import all_boards, bridge_name, guess_board, load_board
from canopy_host.errors import CanopyError


def test_repository_boards_load():
    boards = {b.name: b for b in all_boards()}
    assert {"esp32-devkitc", "esp32s3-devkitc", "esp32c3-devkitm", "unix-sim"} <= set(boards)
    # offsets MicroPython's downloads are built for
    assert boards["esp32-devkitc"].flash_offset == 0x1000
    assert boards["esp32s3-devkitc"].flash_offset == 0
    assert boards["esp32c3-devkitm"].flash_offset == 0
    assert boards["unix-sim"].flash_offset is None and not boards["unix-sim"].flashable
    assert load_board("esp32-devkitc").chip == "ESP32"


def test_guess_board_ranks_boards_listing_the_id_first():
    cp210x = [b.name for b in guess_board(0x10C4, 0xEA60)]
    assert cp210x[0] == "esp32-devkitc"  # its primary bridge
    assert set(cp210x) == {"esp32-devkitc", "esp32s3-devkitc", "esp32c3-devkitm"}
    assert [b.name for b in guess_board(0x1A86, 0x7523)] == ["esp32-devkitc"]
    assert guess_board(0x1234, 0x5678) == []
    assert guess_board(None, None) == []
    assert bridge_name(0x1A86, 0x7523) == "CH340"


def write_board(tmp_path, **override):
    data = json.loads((load_board("esp32-devkitc").path).read_text())
    data.update(override)
    data = {k: v for k, v in data.items() if v is not ...}
    (tmp_path / f"{data.get('name', 'x')}.json").write_text(json.dumps(data))
    return data.get("name", "x")


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"chip": "ESP8266"}, "chip 'ESP8266'"),
        ({"flash_offset": 100}, "multiple of 4096"),
        ({"flash_offset": "0x1000"}, "'flash_offset' must be int"),
        ({"usb": [{"vid": "XYZ", "pid": "0001", "bridge": "?"}]}, "not a hex USB id"),
        ({"usb": [{"vid": "10C4"}]}, "usb[0] needs"),
        ({"mpy_arch": ...}, "missing field 'mpy_arch'"),
        ({"colour": "green"}, "unknown field"),
    ],
)
def test_invalid_board_files_name_the_problem(tmp_path, override, needle):
    name = write_board(tmp_path, **override)
    with pytest.raises(CanopyError) as exc:
        load_board(name, tmp_path)
    assert needle in str(exc.value)
    assert str(tmp_path) in str(exc.value)


def test_name_must_match_file_and_json_must_parse(tmp_path):
    write_board(tmp_path, name="other")
    (tmp_path / "other.json").rename(tmp_path / "mine.json")
    with pytest.raises(CanopyError, match="make them match"):
        load_board("mine", tmp_path)
    (tmp_path / "broken.json").write_text("{ nope")
    with pytest.raises(CanopyError, match="not valid JSON"):
        load_board("broken", tmp_path)


def test_unknown_board_lists_known_ones():
    with pytest.raises(CanopyError) as exc:
        load_board("esp8266-nodemcu")
    assert "esp32-devkitc" in str(exc.value)
    with pytest.raises(CanopyError):
        load_board("../boards/esp32-devkitc")
