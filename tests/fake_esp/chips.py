"""Per-chip facts the fake ROM needs, as data.

Addresses and bit positions come from Espressif's Technical Reference Manuals and the
serial-protocol docs (the same facts esptool's targets/*.py encode). Only what a
flashing session touches is modelled: the chip-detect magic word or the
GET_SECURITY_INFO chip id, the eFuse words holding the MAC and revision, and the SPI
flash controller registers used for "user commands" (JEDEC id, SFDP, status).
"""

from __future__ import annotations

from dataclasses import dataclass

CHIP_DETECT_MAGIC_REG = 0x40001000


@dataclass(frozen=True)
class ChipModel:
    name: str
    magic: int | None  # value at CHIP_DETECT_MAGIC_REG; None: ROM answers with a chip id
    chip_id: int | None  # GET_SECURITY_INFO chip id (ESP32-S3 and later)
    spi_base: int
    spi_usr2_offs: int
    spi_w0_offs: int
    efuse_mac_base: int  # where the two MAC-holding eFuse words start
    uart_clkdiv_reg: int | None = None  # ROM runs the UART from the 40 MHz crystal

    def efuse_words(self, mac: bytes, revision: tuple[int, int]) -> dict[int, int]:
        """Register values that encode `mac` (6 bytes) and (major, minor) revision."""
        major, minor = revision
        regs: dict[int, int] = {}
        if self.name == "ESP32":
            # EFUSE_BLK0_RDATA1/2 hold the MAC (with a CRC byte we leave 0); the major
            # revision is spread over RDATA3 bit 15, RDATA5 bit 20 and APB_CTL_DATE bit 31.
            base = self.efuse_mac_base
            regs[base + 4] = int.from_bytes(mac[2:6], "big")
            regs[base + 8] = int.from_bytes(mac[0:2], "big")
            bits = {0: 0b000, 1: 0b001, 2: 0b011, 3: 0b111}[major]
            regs[base + 12] = (bits & 1) << 15
            regs[base + 20] = ((bits >> 1) & 1) << 20 | (minor & 3) << 24
            regs[0x3FF6607C] = ((bits >> 2) & 1) << 31
            regs[base + 12] |= 1 << 9  # package: D0WD
            # 8 MHz clock calibration: RTCCALICFG1 value x 15625 x EFUSE_RD_CK8M_FREQ / 40
            # is what the ROM measured the 40 MHz crystal as (esptool's stub reads it)
            regs[base + 16] = 128
            regs[0x3FF5F06C] = 800 << 7
        else:
            # EFUSE_RD_MAC_SPI_SYS_0/1 then the wafer version fields in the same block
            base = self.efuse_mac_base
            regs[base] = int.from_bytes(mac[2:6], "big")
            regs[base + 4] = int.from_bytes(mac[0:2], "big")
            regs[base + 12] = (minor & 7) << 18
            regs[base + 20] = ((minor >> 3) & 1) << 23 | (major & 3) << 24
        return regs


CHIPS: dict[str, ChipModel] = {
    "ESP32": ChipModel("ESP32", 0x00F01D83, None, 0x3FF42000, 0x24, 0x80, 0x3FF5A000, 0x3FF40014),
    "ESP32-S3": ChipModel("ESP32-S3", None, 9, 0x60002000, 0x20, 0x58, 0x60007044),
    "ESP32-C3": ChipModel("ESP32-C3", None, 5, 0x60002000, 0x20, 0x58, 0x60008844),
}
