"""ESP image checks, against images laid out by esptool's own image writer."""

from __future__ import annotations

import pytest
from esptool.bin_image import LoadFirmwareImage

from canopy_host.errors import CanopyError
from canopy_host.esp_image import check_fits, check_for_chip, parse_image
from fake_esp.images import build_image


@pytest.mark.parametrize("chip", ["ESP32", "ESP32-S3", "ESP32-C3"])
def test_chip_and_layout_agree_with_esptool(chip):
    data = build_image(chip, 20_000, code_size=3001)
    image = parse_image(data)
    reference = LoadFirmwareImage(chip, data)  # esptool's reader
    assert image.chip == chip
    assert image.chip_id == reference.chip_id
    assert image.segments == len(reference.segments)
    check_for_chip(image, chip)


def test_wrong_chip_is_refused():
    image = parse_image(build_image("ESP32-C3"))
    with pytest.raises(CanopyError, match="built for ESP32-C3.*target is ESP32"):
        check_for_chip(image, "ESP32")


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d[:40], "truncated"),
        (lambda d: b"\xe9\x00" + d[2:], "0 segments"),
        (lambda d: b"\xe9\x11" + d[2:], "17 segments"),
        (lambda d: d[:2] + b"\x09" + d[3:], "SPI flash mode"),
        (lambda d: b"UF2\n" + d[4:], "UF2"),
        (lambda d: b"PK\x03\x04" + d[4:], "zip"),
    ],
)
def test_damaged_or_foreign_files_are_refused(mutate, needle):
    with pytest.raises(CanopyError, match=needle):
        parse_image(mutate(build_image("ESP32", 10_000)))


def test_checksum_catches_a_flipped_bit():
    data = bytearray(build_image("ESP32"))
    data[100] ^= 0x04
    with pytest.raises(CanopyError, match="checksum"):
        parse_image(bytes(data))


def test_fits():
    image = parse_image(build_image("ESP32", 1 << 20))
    check_fits(image, 0x1000, 2 << 20)
    with pytest.raises(CanopyError, match="only 1048576 bytes"):
        check_fits(image, 0x1000, 1 << 20)
