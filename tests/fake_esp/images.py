"""Build valid ESP firmware images for tests with esptool's own image writer.

The header, extended header (chip id), segments, checksum and digest are laid out by
esptool.bin_image, not by the code under test.
"""

from __future__ import annotations

import random

from esptool.bin_image import (
    ELFSection,
    ESP32C3FirmwareImage,
    ESP32FirmwareImage,
    ESP32S3FirmwareImage,
)

_IMAGE_CLASSES = {
    "ESP32": (ESP32FirmwareImage, 0x3FFB0000, 0x40080000),
    "ESP32-S3": (ESP32S3FirmwareImage, 0x3FC88000, 0x40378000),
    "ESP32-C3": (ESP32C3FirmwareImage, 0x3FC88000, 0x40380000),
}


def build_image(chip: str, total_size: int = 0, seed: int = 1, code_size: int = 6000) -> bytes:
    """A bootloader-like image for `chip`, padded with an incompressible-then-zero tail
    up to `total_size` bytes (like a merged MicroPython .bin: bootloader, then app)."""
    cls, dram, iram = _IMAGE_CLASSES[chip]
    rng = random.Random(seed)
    image = cls()
    image.entrypoint = iram
    image.segments = [
        ELFSection(b".dram0.data", dram, rng.randbytes(512), 0),
        ELFSection(b".iram0.text", iram, rng.randbytes(code_size), 0),
    ]
    data = image.save(None)
    assert data is not None
    if total_size > len(data):
        tail = total_size - len(data)
        noise = rng.randbytes(min(tail, 2048))
        data += noise + bytes(tail - len(noise))
    return data
