"""`canopy ports`, with pyserial's port list replaced by ListPortInfo records."""

from __future__ import annotations

import json

import pytest
from serial.tools import list_ports, list_ports_common

from canopy_host import cli
from canopy_host.ports import list_candidate_ports


def port(device, vid=None, pid=None, serial=None, location=None, desc="n/a"):
    info = list_ports_common.ListPortInfo(device, skip_link_detection=True)
    info.vid, info.pid, info.serial_number, info.location, info.description = vid, pid, serial, location, desc
    return info


@pytest.fixture
def fake_ports(monkeypatch, tmp_path):
    ports = [
        port("/dev/ttyUSB1", 0x10C4, 0xEA60, "0001", "1-1.2", "CP2102 USB to UART"),
        port("/dev/ttyUSB0", 0x10C4, 0xEA60, "0001", "1-1.1", "CP2102 USB to UART"),
        port("/dev/ttyACM0", 0x303A, 0x1001, "F4:12:FA:00:11:22", "1-2", "USB JTAG/serial debug unit"),
        port("/dev/ttyUSB2", 0x1A86, 0x7523, None, "1-3", "USB Serial"),
        port("/dev/ttyS0", desc="ttyS0"),
    ]
    monkeypatch.setattr(list_ports, "comports", lambda *a, **k: ports)
    registry = tmp_path / "nodes.json"
    registry.write_text(json.dumps({"nodes": {
        "bench-3": {"usb_serial": "F4:12:FA:00:11:22"},
        "canopy-7": {"usb_serial": "0001", "location": "1-1.1"},
    }}))
    monkeypatch.setenv("CANOPY_REGISTRY", str(registry))
    return ports


def test_usb_ports_with_bridge_board_and_node(fake_ports):
    found = {p.device: p for p in list_candidate_ports()}
    assert sorted(found) == ["/dev/ttyACM0", "/dev/ttyUSB0", "/dev/ttyUSB1", "/dev/ttyUSB2"]
    usb2 = found["/dev/ttyUSB2"]
    assert usb2.usb_id == "1A86:7523" and usb2.bridge == "CH340"
    assert [b.name for b in usb2.boards] == ["esp32-devkitc"]
    acm = found["/dev/ttyACM0"]
    assert {b.name for b in acm.boards} == {"esp32s3-devkitc", "esp32c3-devkitm"}
    assert "USB-Serial/JTAG" in acm.bridge
    assert acm.node_id == "bench-3"
    # identical "0001" serials: told apart by USB location, not by serial number
    assert found["/dev/ttyUSB0"].node_id == "canopy-7"
    assert found["/dev/ttyUSB1"].node_id is None
    assert found["/dev/ttyUSB0"].serial_is_generic


def test_non_usb_ports_on_request(fake_ports):
    assert "/dev/ttyS0" in [p.device for p in list_candidate_ports(include_non_usb=True)]


def test_cli_json_and_table(fake_ports, capsys):
    assert cli.main(["ports", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_dev = {r["device"]: r for r in rows}
    assert by_dev["/dev/ttyUSB2"]["boards"] == ["esp32-devkitc"]
    assert by_dev["/dev/ttyUSB0"]["node_id"] == "canopy-7"
    assert cli.main(["ports"]) == 0
    out, err = capsys.readouterr()
    assert "/dev/ttyACM0" in out and "bench-3" in out
    assert "shared factory serial" in err


def test_missing_or_broken_registry_is_not_an_error(fake_ports, monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    monkeypatch.setenv("CANOPY_REGISTRY", str(bad))
    assert all(p.node_id is None for p in list_candidate_ports())
    monkeypatch.setenv("CANOPY_REGISTRY", str(tmp_path / "absent.json"))
    assert all(p.node_id is None for p in list_candidate_ports())


def test_no_ports_says_what_to_check(monkeypatch, capsys):
    monkeypatch.setattr(list_ports, "comports", lambda *a, **k: [])
    assert cli.main(["ports"]) == 0
    assert "data USB cable" in capsys.readouterr().err


def test_flash_all_with_no_matching_port_is_a_clear_error(fake_ports, monkeypatch, capsys, tmp_path):
    from fake_esp.images import build_image

    ch340_only = [p for p in fake_ports if p.vid == 0x1A86]  # a bridge only esp32-devkitc uses
    monkeypatch.setattr(list_ports, "comports", lambda *a, **k: ch340_only)

    fw = tmp_path / "fw.bin"
    fw.write_bytes(build_image("ESP32-S3"))
    rc = cli.main(["flash", "--board", "esp32s3-devkitc", "--firmware", str(fw), "--all"])
    assert rc == 2
    assert "--all found no connected port" in capsys.readouterr().err
