"""Check a firmware file is an ESP application/bootloader image for the right chip.

The layout (ESP-IDF ``esp_app_format.h``): a 24-byte header — magic 0xE9, segment
count, SPI mode, SPI speed/size, entry point, then the extended header whose
``chip_id`` names the target — followed by segments (load address, length, bytes) and
a one-byte XOR checksum (seed 0xEF) at the end of a 16-byte-aligned block.
MicroPython's ``ESP32_GENERIC*-*.bin`` downloads start with the second-stage
bootloader image, so checking the head of the file checks the whole download's target.

Usage::

    image = read_image(Path("ESP32_GENERIC-20250415-v1.25.0.bin"))
    image.chip          # "ESP32"
    check_for_chip(image, "ESP32-S3")   # raises CanopyError: built for ESP32
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CanopyError

IMAGE_MAGIC = 0xE9
CHECKSUM_SEED = 0xEF
HEADER_LEN = 24
MAX_SEGMENTS = 16
SPI_MODES = ("QIO", "QOUT", "DIO", "DOUT", "FAST_READ", "SLOW_READ")

# esp_chip_id_t from ESP-IDF
CHIP_IDS = {
    0x0000: "ESP32",
    0x0002: "ESP32-S2",
    0x0005: "ESP32-C3",
    0x0009: "ESP32-S3",
    0x000C: "ESP32-C2",
    0x000D: "ESP32-C6",
    0x0010: "ESP32-H2",
    0x0012: "ESP32-P4",
}

# What a wrong file usually is, by how it starts
_LOOKALIKES = (
    (b"\x7fELF", "an ELF file (the linker output); flash the .bin built from it instead"),
    (b"UF2\n", "a UF2 file (for drag-and-drop bootloaders); download the .bin for ESP32 boards"),
    (b"PK\x03\x04", "a zip archive; unpack it and pass the .bin inside"),
    (b"<", "text/HTML (a download error page?); download the .bin again"),
    (b"\xff\xff\xff\xff", "erased flash (all 0xFF): a flash dump read from the wrong offset?"),
)


@dataclass(frozen=True)
class EspImage:
    path: Path | None
    data: bytes
    chip_id: int
    chip: str | None  # None: an id this tool does not know
    spi_mode: str
    segments: int
    image_len: int  # header + segments + checksum of the first image

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


def parse_image(data: bytes, name: str = "image") -> EspImage:
    """Validate the head of ``data``; the error says what the file looks like instead."""
    if len(data) < HEADER_LEN + 8:
        raise CanopyError(f"{name} is {len(data)} bytes: too short to be an ESP firmware image")
    if data[0] != IMAGE_MAGIC:
        what = next((desc for prefix, desc in _LOOKALIKES if data.startswith(prefix)), None)
        hint = f"; it looks like {what}" if what else ""
        raise CanopyError(
            f"{name} is not an ESP firmware image (first byte 0x{data[0]:02X}, expected 0xE9){hint}. "
            "Download the .bin for your board from https://micropython.org/download/"
        )
    magic, nseg, spi_mode, _speed_size, _entry = struct.unpack_from("<BBBBI", data, 0)
    _wp, _d0, _d1, _d2, chip_id, _min_rev, _min_full, _max_full = struct.unpack_from("<BBBBHBHH", data, 8)
    if not 1 <= nseg <= MAX_SEGMENTS:
        raise CanopyError(f"{name}: header claims {nseg} segments (valid: 1-{MAX_SEGMENTS}); the file is corrupt or not an ESP image")
    if spi_mode >= len(SPI_MODES):
        raise CanopyError(f"{name}: header has unknown SPI flash mode {spi_mode}; the file is corrupt or not an ESP image")
    pos = HEADER_LEN
    state = CHECKSUM_SEED
    for i in range(nseg):
        if pos + 8 > len(data):
            raise CanopyError(f"{name} is truncated: segment {i} header is past the end of the file (download it again)")
        _load, length = struct.unpack_from("<II", data, pos)
        pos += 8
        if pos + length > len(data):
            raise CanopyError(
                f"{name} is truncated or corrupt: segment {i} claims {length} bytes but only "
                f"{len(data) - pos} remain (download it again)"
            )
        for b in data[pos : pos + length]:
            state ^= b
        pos += length
    pos += 15 - pos % 16  # the checksum is the last byte of a 16-byte block
    if pos >= len(data):
        raise CanopyError(f"{name} is truncated: the image checksum is missing (download it again)")
    if data[pos] != state:
        raise CanopyError(
            f"{name} is corrupt: image checksum is 0x{data[pos]:02X}, contents give 0x{state:02X} (download it again)"
        )
    return EspImage(
        path=None,
        data=bytes(data),
        chip_id=chip_id,
        chip=CHIP_IDS.get(chip_id),
        spi_mode=SPI_MODES[spi_mode],
        segments=nseg,
        image_len=pos + 1,
    )


def read_image(path: Path) -> EspImage:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CanopyError(f"firmware file {path} does not exist") from None
    except IsADirectoryError:
        raise CanopyError(f"{path} is a directory; pass the firmware .bin file") from None
    except OSError as exc:
        raise CanopyError(f"cannot read firmware file {path}: {exc.strerror}") from None
    image = parse_image(data, str(path))
    return EspImage(**{**image.__dict__, "path": path})


def check_for_chip(image: EspImage, chip: str) -> None:
    """Refuse an image built for another chip (it would not boot, or worse, half-boot)."""
    if image.chip == chip:
        return
    built_for = image.chip or f"unknown chip id {image.chip_id}"
    name = image.path or "the image"
    raise CanopyError(
        f"{name} is built for {built_for}, but the target is {chip}. "
        f"Download the {chip} build (see docs/flashing.md for the file names)."
    )


def check_fits(image: EspImage, offset: int, flash_size: int) -> None:
    if offset + image.size > flash_size:
        raise CanopyError(
            f"{image.path or 'the image'} is {image.size} bytes; at offset {offset:#x} it needs "
            f"{offset + image.size} bytes but the detected flash is only {flash_size} bytes "
            f"({flash_size // (1024 * 1024)} MB). Use a build for a smaller flash, or a board with more flash."
        )
