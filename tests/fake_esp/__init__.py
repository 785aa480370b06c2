"""A fake ESP32 / ESP32-S3 / ESP32-C3 ROM bootloader for end-to-end flashing tests.

It speaks Espressif's serial protocol (SLIP frames; SYNC, READ_REG/WRITE_REG,
SPI_ATTACH, SPI_SET_PARAMS, FLASH_*, MEM_* with the "OHAI" stub greeting, then the
stub's FLASH_DEFL_*, SPI_FLASH_MD5, ERASE_*, CHANGE_BAUDRATE, READ_FLASH) over a
loopback TCP port that the real esptool opens as ``socket://127.0.0.1:PORT``. Flash
lives in memory so tests can compare it byte for byte. Faults: no SYNC reply,
corrupted writes (MD5 mismatch), a connection that drops mid-write; and any modelled
chip can stand in for the "wrong" one.

Usage::

    from fake_esp import FakeEsp, FakeConfig, Faults
    with FakeEsp(FakeConfig(chip="ESP32-S3", initial_baud=2_000_000)) as dev:
        ...  # flash dev.url with esptool / canopy
        assert bytes(dev.flash[0:len(img)]) == img

Run ``python -m fake_esp --count 4`` (from tests/) to get ports for manual trials.
"""

from .chips import CHIPS
from .device import FakeConfig, FakeEspDevice, Faults
from .server import FakeEsp

__all__ = ["CHIPS", "FakeConfig", "FakeEsp", "FakeEspDevice", "Faults"]
