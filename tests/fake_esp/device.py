"""The fake ESP ROM bootloader (and flasher stub) as a packet-in, packets-out state machine.

Espressif's serial protocol: every command is a SLIP frame holding
``<BBHI`` (direction 0x00, opcode, data length, checksum) + data; every response is
``<BBHI`` (direction 0x01, same opcode, data length, 32-bit value) + data, where the
data ends with status bytes (4 from the ROM, 2 from the stub): status 0 = success,
otherwise the second byte is an error code.

Transport (TCP, baud pacing) lives in server.py; this module knows nothing about time.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

from .chips import CHIP_DETECT_MAGIC_REG, CHIPS, ChipModel

# Command opcodes (ROM and stub)
FLASH_BEGIN = 0x02
FLASH_DATA = 0x03
FLASH_END = 0x04
MEM_BEGIN = 0x05
MEM_END = 0x06
MEM_DATA = 0x07
SYNC = 0x08
WRITE_REG = 0x09
READ_REG = 0x0A
SPI_SET_PARAMS = 0x0B
SPI_ATTACH = 0x0D
READ_FLASH_SLOW = 0x0E
CHANGE_BAUDRATE = 0x0F
FLASH_DEFL_BEGIN = 0x10
FLASH_DEFL_DATA = 0x11
FLASH_DEFL_END = 0x12
SPI_FLASH_MD5 = 0x13
GET_SECURITY_INFO = 0x14
ERASE_FLASH = 0xD0
ERASE_REGION = 0xD1
READ_FLASH = 0xD2

# Error codes (ROM 0x05..0x0B, stub 0xC0..0xFF)
ROM_INVALID_MESSAGE = 0x05
ROM_FAILED = 0x06
ROM_BAD_CRC = 0x07
STUB_BAD_DATA_LEN = 0xC0
STUB_BAD_CHECKSUM = 0xC1
STUB_NOT_IN_FLASH_MODE = 0xC6
STUB_INFLATE_ERROR = 0xC7
STUB_TOO_MUCH_DATA = 0xC9
STUB_NOT_IMPLEMENTED = 0xFF

CHECKSUM_SEED = 0xEF
SECTOR = 0x1000

# SPI flash "user command" machinery
SPI_CMD_USR = 1 << 18
SPIFLASH_RDID = 0x9F
SPIFLASH_RDSFDP = 0x5A
SFDP_SIGNATURE = 0x50444653  # "SFDP"


class DropConnection(Exception):
    """The device vanishes (USB unplugged, brown-out) after the current packet."""


@dataclass
class Faults:
    """Ways the fake misbehaves, for error-path tests."""

    no_sync: bool = False  # never answers: chip not in download mode / TX line broken
    bad_write: bool = False  # flash keeps a flipped bit in every written block -> MD5 mismatch
    drop_after: int | None = None  # vanish once this many flash-data bytes were received


@dataclass
class FakeConfig:
    chip: str = "ESP32"
    flash_size: int = 4 * 1024 * 1024
    mac: bytes = bytes.fromhex("24a160123456")
    revision: tuple[int, int] = (3, 0)
    jedec_vendor: int = 0xC8  # GigaDevice
    jedec_type: int = 0x40
    initial_baud: int = 115200
    faults: Faults = field(default_factory=Faults)


def checksum(data: bytes) -> int:
    """XOR of all bytes, seeded with 0xEF. Folded as one big integer (halves XORed
    together) because a per-byte loop is too slow for several paced fakes at once."""
    width = 1
    while width < len(data):
        width *= 2
    value = int.from_bytes(data, "little")
    while width > 1:
        width //= 2
        value = (value >> (8 * width)) ^ (value & ((1 << (8 * width)) - 1))
    return CHECKSUM_SEED ^ value


class FakeEspDevice:
    """One chip: registers, in-memory NOR flash, ROM or stub mode."""

    def __init__(self, config: FakeConfig) -> None:
        if config.chip not in CHIPS:
            raise ValueError(f"fake chip {config.chip!r} not modelled; choose from {sorted(CHIPS)}")
        if config.flash_size & (config.flash_size - 1):
            raise ValueError("flash_size must be a power of two (JEDEC capacity code)")
        self.config = config
        self.chip: ChipModel = CHIPS[config.chip]
        self.flash = bytearray(b"\xff" * config.flash_size)
        self.baud = config.initial_baud
        self.log: list[str] = []  # opcodes seen, for tests that check the conversation
        self.reset()

    # ---- lifecycle -------------------------------------------------------------
    def reset(self) -> None:
        """Power-on / EN reset: back to the ROM loader, registers to their reset values."""
        self.stub = False
        self.baud = self.config.initial_baud
        self.regs: dict[int, int] = {}
        if self.chip.magic is not None:
            self.regs[CHIP_DETECT_MAGIC_REG] = self.chip.magic
        self.regs.update(self.chip.efuse_words(self.config.mac, self.config.revision))
        self._mem: dict | None = None
        self._write: dict | None = None
        self.flash_data_received = 0
        self.attached = False
        self.spi_params_size: int | None = None

    # ---- framing helpers -------------------------------------------------------
    def _status(self, ok: bool, err: int = 0) -> bytes:
        st = bytes([0 if ok else 1, 0 if ok else err])
        return st if self.stub else st + b"\x00\x00"

    def _resp(self, op: int, value: int = 0, data: bytes = b"", ok: bool = True, err: int = 0) -> bytes:
        body = data + self._status(ok, err)
        return struct.pack("<BBHI", 1, op, len(body), value) + body

    def _fail(self, op: int, err: int) -> list[bytes]:
        return [self._resp(op, ok=False, err=err)]

    # ---- entry point -----------------------------------------------------------
    def handle(self, packet: bytes) -> tuple[list[bytes], int | None]:
        """Answer one host packet. Returns (response frames, new baud to apply after sending)."""
        if self.config.faults.no_sync:
            return [], None
        if len(packet) < 8 or packet[0] != 0x00:
            return [], None  # READ_FLASH acks and line noise: the ROM ignores them
        _, op, size, chk = struct.unpack("<BBHI", packet[:8])
        data = packet[8:]
        self.log.append(f"{op:#04x}")
        if len(data) != size:
            return self._fail(op, STUB_BAD_DATA_LEN if self.stub else ROM_INVALID_MESSAGE), None
        handler = self._HANDLERS.get(op)
        if handler is None or (op in self._STUB_ONLY and not self.stub) or (
            op == GET_SECURITY_INFO and self.chip.chip_id is None
        ):
            # ESP32's ROM predates GET_SECURITY_INFO; it answers "invalid message"
            return self._fail(op, STUB_NOT_IMPLEMENTED if self.stub else ROM_INVALID_MESSAGE), None
        return handler(self, op, data, chk)

    # ---- commands --------------------------------------------------------------
    def _sync(self, op, data, chk):
        if data != b"\x07\x07\x12\x20" + 32 * b"\x55":
            return [], None
        # The ROM answers a SYNC eight times (one per 0x55 burst it locks on to), value
        # non-zero; a running stub answers with value 0, which is how esptool spots it.
        value = 0 if self.stub else 0x20120707
        return [self._resp(op, value)] * 8, None

    def _read_reg(self, op, data, chk):
        (addr,) = struct.unpack("<I", data[:4])
        if addr == self.chip.uart_clkdiv_reg:
            return [self._resp(op, round(40_000_000 / self.baud))], None
        return [self._resp(op, self.regs.get(addr, 0))], None

    def _write_reg(self, op, data, chk):
        for i in range(0, len(data) - 15, 16):
            addr, value, mask, _delay = struct.unpack("<IIII", data[i : i + 16])
            old = self.regs.get(addr, 0)
            self.regs[addr] = (old & ~mask) | (value & mask)
            self._spi_poke(addr)
        return [self._resp(op)], None

    def _spi_poke(self, addr: int) -> None:
        """Writing SPI_CMD_USR runs the programmed user command against the flash chip."""
        base = self.chip.spi_base
        if addr != base or not self.regs.get(base, 0) & SPI_CMD_USR:
            return
        command = self.regs.get(base + self.chip.spi_usr2_offs, 0) & 0xFF
        spi_addr = self.regs.get(base + 4, 0) >> 8  # 24-bit address, MSB-aligned
        if command == SPIFLASH_RDID:
            capacity = self.config.flash_size.bit_length() - 1  # JEDEC: log2(bytes)
            result = self.config.jedec_vendor | self.config.jedec_type << 8 | capacity << 16
        elif command == SPIFLASH_RDSFDP:
            result = SFDP_SIGNATURE if spi_addr == 0 else 0
        else:
            result = 0  # status registers: not busy, no protection
        self.regs[base + self.chip.spi_w0_offs] = result
        self.regs[base] &= ~SPI_CMD_USR  # command done

    def _security_info(self, op, data, chk):
        # flags, flash_crypt_cnt, 7 key purposes, chip_id, api_version
        body = struct.pack("<IBBBBBBBBII", 0, 0, 0, 0, 0, 0, 0, 0, 0, self.chip.chip_id, 0)
        return [self._resp(op, data=body)], None

    def _ack(self, op, data, chk):
        return [self._resp(op)], None

    def _spi_attach(self, op, data, chk):
        self.attached = True
        return [self._resp(op)], None

    def _spi_set_params(self, op, data, chk):
        _id, total, _blk, _sec, _page, _mask = struct.unpack("<IIIIII", data[:24])
        self.spi_params_size = total
        return [self._resp(op)], None

    def _change_baud(self, op, data, chk):
        new, _old = struct.unpack("<II", data[:8])
        if not self.stub:
            # ESP32 ROM is given a rate pre-scaled for its 8 MHz clock drift; with our
            # zeroed calibration registers esptool sends the rate unchanged or scaled to 0.
            new = new or self.baud
        return [self._resp(op)], new  # answered at the old rate, then switch

    def _mem_begin(self, op, data, chk):
        size, blocks, blocksize, offset = struct.unpack("<IIII", data[:16])
        self._mem = {"size": size, "blocks": blocks, "got": 0, "seq": 0}
        return [self._resp(op)], None

    def _mem_data(self, op, data, chk):
        if self._mem is None:
            return self._fail(op, ROM_FAILED), None
        length, seq, _, _ = struct.unpack("<IIII", data[:16])
        payload = data[16:]
        if len(payload) != length or checksum(payload) != chk:
            return self._fail(op, ROM_BAD_CRC), None
        self._mem["got"] += length
        return [self._resp(op)], None

    def _mem_end(self, op, data, chk):
        no_entry, entry = struct.unpack("<II", data[:8])
        frames = [self._resp(op)]
        if not no_entry and self._mem is not None:
            # "Jump" to the uploaded stub: it greets with OHAI and takes over the UART.
            self.stub = True
            frames.append(b"OHAI")
        self._mem = None
        return frames, None

    def _erase(self, offset: int, size: int) -> None:
        start = offset - offset % SECTOR
        end = min(len(self.flash), -(-(offset + size) // SECTOR) * SECTOR)
        self.flash[start:end] = b"\xff" * (end - start)

    def _program(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.flash):
            raise IndexError
        # NOR flash: programming can only clear bits; unerased sectors corrupt the data
        old = self.flash[offset:end]
        if old.count(0xFF) == len(old):
            self.flash[offset:end] = data
        else:
            merged = int.from_bytes(old, "little") & int.from_bytes(data, "little")
            self.flash[offset:end] = merged.to_bytes(len(data), "little")
        if self.config.faults.bad_write and data:
            self.flash[offset] ^= 0x01

    def _flash_begin(self, op, data, chk):
        erase_size, blocks, blocksize, offset = struct.unpack("<IIII", data[:16])
        deflate = op == FLASH_DEFL_BEGIN
        if offset + (erase_size if not deflate else 0) > len(self.flash):
            return self._fail(op, STUB_TOO_MUCH_DATA if self.stub else ROM_FAILED), None
        # the stub is given the uncompressed size, the ROM the rounded-up erase size;
        # either way the sectors covering it are erased before programming
        self._erase(offset, erase_size)
        self._write = {
            "offset": offset, "pos": offset, "seq": 0, "blocksize": blocksize,
            "inflate": zlib.decompressobj() if deflate else None,
        }
        return [self._resp(op)], None

    def _flash_data(self, op, data, chk):
        w = self._write
        deflate = op == FLASH_DEFL_DATA
        if w is None or (w["inflate"] is not None) != deflate:
            return self._fail(op, STUB_NOT_IN_FLASH_MODE if self.stub else ROM_FAILED), None
        length, seq, _, _ = struct.unpack("<IIII", data[:16])
        payload = data[16:]
        if len(payload) != length:
            return self._fail(op, STUB_BAD_DATA_LEN if self.stub else ROM_INVALID_MESSAGE), None
        if checksum(payload) != chk:
            return self._fail(op, STUB_BAD_CHECKSUM if self.stub else ROM_BAD_CRC), None
        self.flash_data_received += length
        drop_after = self.config.faults.drop_after
        if drop_after is not None and self.flash_data_received >= drop_after:
            raise DropConnection
        if deflate:
            try:
                chunk = w["inflate"].decompress(payload)
            except zlib.error:
                return self._fail(op, STUB_INFLATE_ERROR), None
        else:
            chunk = payload
        try:
            self._program(w["pos"], chunk)
        except IndexError:
            return self._fail(op, STUB_TOO_MUCH_DATA if self.stub else ROM_FAILED), None
        w["pos"] += len(chunk)
        w["seq"] = seq + 1
        return [self._resp(op)], None

    def _flash_end(self, op, data, chk):
        self._write = None
        return [self._resp(op)], None

    def _md5(self, op, data, chk):
        addr, size, _, _ = struct.unpack("<IIII", data[:16])
        if addr + size > len(self.flash):
            return self._fail(op, STUB_TOO_MUCH_DATA if self.stub else ROM_FAILED), None
        digest = hashlib.md5(self.flash[addr : addr + size])
        # the ROM answers in hex text, the stub in raw bytes
        body = digest.digest() if self.stub else digest.hexdigest().encode()
        return [self._resp(op, data=body)], None

    def _erase_flash(self, op, data, chk):
        self.flash[:] = b"\xff" * len(self.flash)
        return [self._resp(op)], None

    def _erase_region(self, op, data, chk):
        offset, size = struct.unpack("<II", data[:8])
        if offset % SECTOR or size % SECTOR or offset + size > len(self.flash):
            return self._fail(op, STUB_BAD_DATA_LEN), None
        self._erase(offset, size)
        return [self._resp(op)], None

    def _read_flash(self, op, data, chk):
        offset, length, block, _in_flight = struct.unpack("<IIII", data[:16])
        content = bytes(self.flash[offset : offset + length])
        frames = [self._resp(op)]
        # data packets then the MD5 digest; the host's acks are ignored by handle()
        frames += [content[i : i + block] for i in range(0, length, block)]
        frames.append(hashlib.md5(content).digest())
        return frames, None

    def _read_flash_slow(self, op, data, chk):
        offset, length = struct.unpack("<II", data[:8])
        content = bytes(self.flash[offset : offset + length]).ljust(64, b"\xff")
        return [self._resp(op, data=content)], None

    _HANDLERS = {
        SYNC: _sync,
        READ_REG: _read_reg,
        WRITE_REG: _write_reg,
        GET_SECURITY_INFO: _security_info,
        SPI_ATTACH: _spi_attach,
        SPI_SET_PARAMS: _spi_set_params,
        CHANGE_BAUDRATE: _change_baud,
        MEM_BEGIN: _mem_begin,
        MEM_DATA: _mem_data,
        MEM_END: _mem_end,
        FLASH_BEGIN: _flash_begin,
        FLASH_DATA: _flash_data,
        FLASH_END: _flash_end,
        FLASH_DEFL_BEGIN: _flash_begin,
        FLASH_DEFL_DATA: _flash_data,
        FLASH_DEFL_END: _flash_end,
        SPI_FLASH_MD5: _md5,
        ERASE_FLASH: _erase_flash,
        ERASE_REGION: _erase_region,
        READ_FLASH: _read_flash,
        READ_FLASH_SLOW: _read_flash_slow,
    }
    _STUB_ONLY = {ERASE_FLASH, ERASE_REGION, READ_FLASH}
