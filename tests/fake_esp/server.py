"""Serve a FakeEspDevice on ``socket://127.0.0.1:PORT``, timed like a real UART.

esptool, mpremote and pyserial open ports with ``serial.serial_for_url``, so a TCP
listener on loopback stands in for a USB serial bridge. Bytes in both directions are
paced at the device's current baud rate (10 bit times per byte: start, 8 data, stop),
and CHANGE_BAUDRATE changes the pace, so a flash takes as long as it would on the wire.
Over a socket esptool cannot toggle DTR/RTS, so it never resets the chip: the fake
starts in (and stays in) download mode, as if BOOT had been held.
"""

from __future__ import annotations

import socket
import threading
import time

from .device import DropConnection, FakeConfig, FakeEspDevice

def slip_encode(payload: bytes) -> bytes:
    return b"\xc0" + payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


class SlipDecoder:
    """Split a byte stream into SLIP frames (whole-buffer operations: a paced transfer of
    megabytes to several fakes must not be limited by a per-byte Python loop)."""

    def __init__(self) -> None:
        self._partial: bytes | None = None  # bytes after an opening END, frame not closed yet

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pieces = data.split(b"\xc0")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self._partial is None:
                if not last:
                    self._partial = b""  # an END opens a frame; bytes before it are noise
                continue
            if last:
                self._partial += piece  # no closing END in this buffer yet
                continue
            raw = self._partial + piece
            if raw:
                out.append(raw.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb"))
                self._partial = None
            else:
                self._partial = b""  # back-to-back END: the second one opens the next frame
        return out


class Wire:
    """One direction of a UART: a byte takes 10 bit times at the current baud rate."""

    def __init__(self, baud: int) -> None:
        self.baud = baud
        self._free_at = time.monotonic()

    def carry(self, nbytes: int) -> None:
        now = time.monotonic()
        self._free_at = max(self._free_at, now) + nbytes * 10 / self.baud
        delay = self._free_at - now
        if delay > 0.0005:  # batch tiny waits; the debt is kept in _free_at
            time.sleep(delay)


class FakeEsp:
    """A fake ESP32-family chip in download mode behind a loopback TCP port.

    Usage::

        with FakeEsp(FakeConfig(chip="ESP32")) as dev:
            esptool.cmds.detect_chip(dev.url)   # ... flash ...
            assert dev.flash[0x1000:0x1000 + n] == image
    """

    def __init__(self, config: FakeConfig | None = None, pace: bool = True, reset_on_connect: bool = False) -> None:
        self.device = FakeEspDevice(config or FakeConfig())
        self.pace = pace
        # like a dev board's auto-reset circuit: opening the port puts the chip back in the ROM
        self.reset_on_connect = reset_on_connect
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"socket://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fake-esp-{self.port}", daemon=True)
        self.connections = 0
        self.unplugged = False

    @property
    def flash(self) -> bytearray:
        return self.device.flash

    def start(self) -> "FakeEsp":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeEsp":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            if self.reset_on_connect:
                self.device.reset()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    self._session(conn)
                except DropConnection:
                    # gone like an unplugged board: no more connections either
                    self.unplugged = True
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self._listener.close()
                    return
                except OSError:
                    pass

    def _session(self, conn: socket.socket) -> None:
        dev = self.device
        rx, tx = Wire(dev.baud), Wire(dev.baud)
        decoder = SlipDecoder()
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except socket.timeout:
                continue
            if not data:
                return  # host closed the port; the chip keeps its state (no reset over TCP)
            if self.pace:
                rx.carry(len(data))
            for packet in decoder.feed(data):
                frames, new_baud = dev.handle(packet)
                for frame in frames:
                    wire = slip_encode(frame)
                    if self.pace:
                        tx.carry(len(wire))
                    conn.sendall(wire)
                if new_baud:
                    dev.baud = rx.baud = tx.baud = new_baud
