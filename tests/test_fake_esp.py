"""The fake ROM bootloader, judged by the real esptool (not by canopy code)."""

from __future__ import annotations

import contextlib
import io

import esptool
import esptool.cmds as cmds
import pytest
from esptool.util import FatalError

from fake_esp import FakeConfig, FakeEsp, Faults
from fake_esp.images import build_image

FAST = 3_000_000  # fake's starting baud: keeps paced transfers short in tests


def run_esptool(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        esptool.main(list(argv))
    return out.getvalue()


@pytest.mark.parametrize(
    "chip,revision,expect_rev",
    [("ESP32", (3, 0), 300), ("ESP32", (1, 0), 100), ("ESP32-S3", (0, 2), 2), ("ESP32-C3", (0, 4), 4)],
)
def test_esptool_detects_chip_mac_and_revision(chip, revision, expect_rev):
    mac = bytes.fromhex("30aea4c0ffee")
    with FakeEsp(FakeConfig(chip=chip, mac=mac, revision=revision, initial_baud=FAST)) as dev:
        esp = cmds.detect_chip(dev.url, 115200, "default-reset", False, 1)
        try:
            assert esp.CHIP_NAME == chip
            assert bytes(esp.read_mac()) == mac
            assert esp.get_chip_revision() == expect_rev
        finally:
            esp._port.close()


@pytest.mark.parametrize("size_mb", [2, 4, 16])
def test_esptool_reads_configured_flash_size(size_mb):
    with FakeEsp(FakeConfig(chip="ESP32-S3", flash_size=size_mb << 20, initial_baud=FAST)) as dev:
        esp = cmds.detect_chip(dev.url, 115200, "default-reset", False, 1)
        try:
            esp = cmds.run_stub(esp)
            cmds.attach_flash(esp)
            assert cmds.detect_flash_size(esp) == f"{size_mb}MB"
        finally:
            esp._port.close()


def test_esptool_cli_write_read_roundtrip_compressed_via_stub(tmp_path):
    image = build_image("ESP32", 40_000)
    src = tmp_path / "in.bin"
    src.write_bytes(image)
    back = tmp_path / "out.bin"
    with FakeEsp(FakeConfig(chip="ESP32", initial_baud=FAST)) as dev:
        out = run_esptool("--port", dev.url, "--baud", str(FAST), "write-flash", "0x1000", str(src))
        assert "Hash of data verified" in out
        assert bytes(dev.flash[0x1000 : 0x1000 + len(image)]) == image
        assert dev.flash[:0x1000] == b"\xff" * 0x1000
        assert "0x10" in dev.device.log and "0x11" in dev.device.log  # FLASH_DEFL_BEGIN/DATA
        run_esptool("--port", dev.url, "--baud", str(FAST), "read-flash", "0x1000", str(len(image)), str(back))
    assert back.read_bytes() == image


def test_esptool_uncompressed_rom_write_without_stub(tmp_path):
    image = build_image("ESP32-C3", 9_000)
    src = tmp_path / "in.bin"
    src.write_bytes(image)
    with FakeEsp(FakeConfig(chip="ESP32-C3", initial_baud=FAST)) as dev:
        out = run_esptool("--port", dev.url, "--no-stub", "write-flash", "--no-compress", "0x0", str(src))
        assert "Hash of data verified" in out
        assert bytes(dev.flash[: len(image)]) == image
        assert "0x03" in dev.device.log and not dev.device.stub  # FLASH_DATA, ROM only


def test_erase_region_and_nor_semantics(tmp_path):
    with FakeEsp(FakeConfig(chip="ESP32", initial_baud=FAST)) as dev:
        dev.flash[0x2000:0x4000] = b"\x00" * 0x2000
        run_esptool("--port", dev.url, "erase-region", "0x2000", "0x1000")
        assert dev.flash[0x2000:0x3000] == b"\xff" * 0x1000
        assert dev.flash[0x3000:0x4000] == b"\x00" * 0x1000


def test_bad_write_fault_fails_esptool_verification(tmp_path):
    image = build_image("ESP32", 8_000)
    src = tmp_path / "in.bin"
    src.write_bytes(image)
    with FakeEsp(FakeConfig(chip="ESP32", initial_baud=FAST, faults=Faults(bad_write=True))) as dev:
        with pytest.raises(FatalError, match="MD5"):
            run_esptool("--port", dev.url, "write-flash", "0x1000", str(src))


def test_no_sync_fault_means_esptool_cannot_connect():
    with FakeEsp(FakeConfig(faults=Faults(no_sync=True))) as dev:
        with pytest.raises(FatalError, match="Failed to connect"):
            cmds.detect_chip(dev.url, 115200, "default-reset", False, 1)


def test_change_baudrate_is_tracked():
    with FakeEsp(FakeConfig(chip="ESP32-S3", initial_baud=FAST)) as dev:
        esp = cmds.detect_chip(dev.url, 115200, "default-reset", False, 1)
        try:
            esp = cmds.run_stub(esp)
            esp.change_baud(460800)
            assert dev.device.baud == 460800
            assert esp.read_reg(0x40001000) == 0  # still answering at the new rate
        finally:
            esp._port.close()
