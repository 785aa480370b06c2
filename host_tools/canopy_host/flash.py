"""Flash MicroPython onto ESP32-family nodes with esptool's Python API, several at once.

One worker thread per port runs esptool in-process: detect the chip, refuse a chip or
image that does not match the board, load the stub, raise the baud rate, write the
image compressed at the board's offset, verify its MD5, reset. Transfer errors are
retried at lower baud rates. esptool logs through a process-wide logger; a routing
logger hands each thread's messages and progress to that port's sink.

Usage::

    board = load_board("esp32-devkitc")
    image = read_image(Path("ESP32_GENERIC-v1.25.0.bin"))
    reports = flash_nodes(["/dev/ttyUSB0", "/dev/ttyUSB1"], board, image, baud=921600)
    [r.result for r in reports]   # ["ok", "ok"]
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Protocol

import esptool.cmds as esp_cmds
import esptool.loader as esp_loader
from esp_pylib.logger import EspLog, EspLogBase
from esptool.loader import ESPLoader
from esptool.util import FatalError, flash_size_bytes
from serial import SerialException

from .boards import Board, boards_for_chip
from .errors import CanopyError
from .esp_image import EspImage, check_fits, check_for_chip

ROM_BAUD = ESPLoader.ESP_ROM_BAUD  # every ESP ROM talks 115200 after reset
STANDARD_BAUDS = (115200, 230400, 460800, 921600, 1500000, 2000000)
DEFAULT_BAUD = 460800
DEFAULT_CONNECT_ATTEMPTS = 7


class NodeSink(Protocol):
    """Where one node's esptool output goes (a progress bar row, a list, ...)."""

    def message(self, text: str) -> None: ...

    def progress(self, done: int, total: int, text: str) -> None: ...


class Refused(CanopyError):
    """Checked before writing: nothing was written to the node."""


class Failed(CanopyError):
    """Went wrong while talking to the node; carries a hint on what to try."""

    def __init__(self, message: str, hint: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.hint = hint
        self.retryable = retryable


@dataclass
class Attempt:
    baud: int
    error: str | None = None


@dataclass
class NodeReport:
    port: str
    board: str
    result: str = "failed"  # ok | failed | refused
    chip: str | None = None
    chip_description: str | None = None
    mac: str | None = None
    revision: str | None = None
    flash_size: int | None = None
    offset: int | None = None
    image: str | None = None
    image_sha256: str | None = None
    image_size: int | None = None
    baud: int | None = None
    duration_s: float = 0.0
    error: str | None = None
    hint: str | None = None
    attempts: list[Attempt] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- logging
def _plain(args: tuple[Any, ...]) -> str:
    text = " ".join(str(a) for a in args)
    try:
        from rich.text import Text

        return Text.from_markup(text).plain
    except Exception:  # not markup after all (e.g. "[" in a hex dump)
        return text


class _RoutingLogger(EspLogBase):
    """esptool's logger for the duration of a flash run: each thread to its own sink."""

    def __init__(self, fallback: EspLogBase | None) -> None:
        self._local = threading.local()
        self._fallback = fallback

    @contextlib.contextmanager
    def route(self, sink: NodeSink) -> Iterator[None]:
        self._local.sink = sink
        try:
            yield
        finally:
            self._local.sink = None

    def _sink(self) -> NodeSink | None:
        return getattr(self._local, "sink", None)

    def _emit(self, prefix: str, args: tuple[Any, ...]) -> None:
        sink = self._sink()
        text = _plain(args).strip()
        if sink is not None:
            if text and text != ".":
                sink.message(prefix + text)
        elif self._fallback is not None and text:
            self._fallback.print(prefix + text)

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._emit("", args)

    def err(self, *args: Any, suggestion: str | None = None) -> None:
        self._emit("error: ", args)

    def warn(self, *args: Any, suggestion: str | None = None) -> None:
        self._emit("warning: ", args)

    def note(self, *args: Any) -> None:
        self._emit("note: ", args)

    def hint(self, *args: Any) -> None:
        self._emit("hint: ", args)

    def debug(self, *args: Any) -> None:
        pass

    def set_verbosity(self, mode: int | str) -> None:
        pass

    def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "", suffix: str = "", bar_length: int = 30) -> None:
        sink = self._sink()
        if sink is not None:
            sink.progress(cur_iter, total_iters, prefix.strip())


class _UnformattedHex(esp_loader.HexFormatter):
    """esptool 5.6 builds its trace strings with f-strings, which format a hex dump of
    every 16 KB block even with tracing off: seconds of CPU per image, and with the
    GIL shared by all flashing threads it was what stopped 8 nodes scaling. We never
    enable tracing, so the dump is reduced to its length."""

    def __str__(self) -> str:
        return f"<{len(self._s)} bytes>"


@contextlib.contextmanager
def esptool_session() -> Iterator[_RoutingLogger]:
    """Install the routing logger (and cheap trace formatting); restore esptool's afterwards."""
    previous = EspLog.instance
    previous_hex = esp_loader.HexFormatter
    router = _RoutingLogger(previous)
    EspLog.set_logger(router)
    esp_loader.HexFormatter = _UnformattedHex
    try:
        yield router
    finally:
        EspLog.instance = previous
        esp_loader.HexFormatter = previous_hex


# --------------------------------------------------------------------------- policy
def fallback_bauds(baud: int) -> list[int]:
    """The requested rate, then the next standard rate below it, then the ROM's 115200."""
    lower = [b for b in STANDARD_BAUDS if b < baud]
    plan = [baud] + lower[-1:] + ([ROM_BAUD] if baud > ROM_BAUD else [])
    return list(dict.fromkeys(plan))


def _explain(exc: BaseException, phase: str, port: str) -> Failed:
    """Turn an esptool/pyserial exception into what happened and what to try."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = str(exc).lower()
    if phase == "open" or "could not open" in low:
        return Failed(
            f"cannot open {port}: {text}",
            "check the port name (`canopy ports`), that no other program (a serial monitor, "
            "`canopy monitor`) holds it, and on Linux that you are in the dialout group",
        )
    if phase == "connect":
        return Failed(
            f"no answer from the bootloader on {port} ({text})",
            "hold BOOT, tap EN/RESET, release BOOT, then retry; check it is a data (not "
            "charge-only) USB cable and the right port",
        )
    if "md5" in low or "does not match" in low or "verif" in low:
        return Failed(
            f"the flash contents did not verify after writing ({text})",
            "retry with a lower --baud (e.g. 115200) or a shorter USB cable; add --erase if "
            "it persists; a node that keeps failing may have worn-out flash",
            retryable=True,
        )
    if isinstance(exc, (SerialException, OSError)) or "serial" in low or "disconnect" in low:
        return Failed(
            f"lost the connection to {port} while {phase} ({text})",
            "the board reset or was unplugged: check the cable and power (brown-outs when "
            "the servo moves?), then flash again; the node will not boot until it is",
            retryable=True,
        )
    return Failed(
        f"esptool failed while {phase}: {text}",
        "retry with a lower --baud; if it repeats, run `esptool --port PORT flash-id` to see "
        "whether the flash chip answers",
        retryable=phase in ("changing baud rate", "writing", "verifying"),
    )


# --------------------------------------------------------------------------- one node
def _fmt_mac(mac: tuple[int, ...] | None) -> str | None:
    return ":".join(f"{b:02x}" for b in mac) if mac else None


def _attempt(
    port: str,
    board: Board,
    image: EspImage,
    baud: int,
    erase: bool,
    connect_attempts: int,
    report: NodeReport,
    sink: NodeSink,
) -> None:
    phase = "open"
    esp = None
    try:
        phase = "connect"
        sink.message(f"connecting at {ROM_BAUD} baud")
        try:
            esp = esp_cmds.detect_chip(port, ROM_BAUD, "default-reset", False, connect_attempts)
        except FatalError as exc:
            if "could not open" in str(exc).lower():
                phase = "open"
            raise
        report.chip = esp.CHIP_NAME
        if esp.CHIP_NAME != board.chip:
            fits = [b.name for b in boards_for_chip(esp.CHIP_NAME)]
            suggestion = f"use --board {fits[0]}" if fits else f"add a boards/*.json for {esp.CHIP_NAME}"
            raise Refused(
                f"{port} has an {esp.CHIP_NAME}, but board {board.name} is an {board.chip}; "
                f"nothing was written. Wrong port or wrong --board? ({suggestion})"
            )
        check_for_chip(image, esp.CHIP_NAME)  # raises CanopyError -> refused
        phase = "reading chip info"
        report.chip_description = esp.get_chip_description()
        report.mac = _fmt_mac(esp.read_mac())
        rev = esp.get_chip_revision()
        report.revision = f"v{rev // 100}.{rev % 100}"
        phase = "loading the flasher stub"
        esp = esp_cmds.run_stub(esp)
        # esptool's own recovery waits seconds for a reset that never comes over
        # TCP; the baud fallback below reconnects from scratch instead.
        esp.WRITE_FLASH_ATTEMPTS = 1
        if baud != ROM_BAUD:
            phase = "changing baud rate"
            esp.change_baud(baud)
        report.baud = baud
        phase = "attaching flash"
        esp_cmds.attach_flash(esp)
        size_name = esp_cmds.detect_flash_size(esp)
        if size_name is None:
            raise Failed(
                "the flash chip did not report its size (JEDEC id unreadable)",
                "check the board is not in a reset loop; try again with --baud 115200",
            )
        report.flash_size = flash_size_bytes(size_name)
        assert board.flash_offset is not None
        try:
            check_fits(image, board.flash_offset, report.flash_size)
        except CanopyError as exc:
            raise Refused(str(exc)) from None
        if erase:
            phase = "erasing"
            sink.message("erasing the whole flash")
            esp_cmds.erase_flash(esp)
        phase = "writing"
        # write_flash compresses (stub), writes, then compares the flash MD5 with the image's
        esp_cmds.write_flash(esp, [(board.flash_offset, image.data)], flash_size="keep", compress=True)
        phase = "resetting"
        esp_cmds.reset_chip(esp, "hard-reset")
    except (Refused, Failed):
        raise
    except CanopyError as exc:
        raise Refused(str(exc)) from None
    except (FatalError, SerialException, OSError, StopIteration, struct.error) as exc:
        raise _explain(exc, phase, port) from exc
    finally:
        if esp is not None:
            with contextlib.suppress(Exception):
                esp._port.close()


def flash_node(
    port: str,
    board: Board,
    image: EspImage,
    baud: int = DEFAULT_BAUD,
    erase: bool = False,
    connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
    sink: NodeSink | None = None,
) -> NodeReport:
    """Flash one node; never raises for device trouble, the report says what happened."""
    sink = sink or _NullSink()
    report = NodeReport(
        port=port,
        board=board.name,
        offset=board.flash_offset,
        image=str(image.path) if image.path else None,
        image_sha256=image.sha256,
        image_size=image.size,
    )
    start = time.monotonic()
    for rate in fallback_bauds(baud):
        attempt = Attempt(baud=rate)
        report.attempts.append(attempt)
        try:
            _attempt(port, board, image, rate, erase, connect_attempts, report, sink)
        except Refused as exc:
            attempt.error = str(exc)
            report.result, report.error, report.hint = "refused", str(exc), None
            break
        except Failed as exc:
            attempt.error = str(exc)
            if report.error is None or exc.retryable:
                report.error, report.hint = str(exc), exc.hint
            if not exc.retryable:
                break
            sink.message(f"failed at {rate} baud: {exc}; retrying slower")
            continue
        else:
            report.result, report.error, report.hint = "ok", None, None
            report.baud = rate
            break
    else:
        report.result = "failed"
    if report.result != "ok" and report.result != "refused":
        report.result = "failed"
    report.duration_s = round(time.monotonic() - start, 3)
    sink.message("done" if report.result == "ok" else f"{report.result}: {report.error}")
    return report


class _NullSink:
    def message(self, text: str) -> None:
        pass

    def progress(self, done: int, total: int, text: str) -> None:
        pass


class ListSink:
    """Keeps a node's messages (handy in tests and for --verbose dumps)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.last_progress: tuple[int, int] | None = None

    def message(self, text: str) -> None:
        self.lines.append(text)

    def progress(self, done: int, total: int, text: str) -> None:
        self.last_progress = (done, total)


# --------------------------------------------------------------------------- many nodes
def flash_nodes(
    ports: list[str],
    board: Board,
    image: EspImage,
    baud: int = DEFAULT_BAUD,
    erase: bool = False,
    connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
    make_sink: Callable[[str], NodeSink] | None = None,
) -> list[NodeReport]:
    """Flash every port in parallel (one thread each); reports in the order of ``ports``."""
    if not board.flashable:
        raise CanopyError(f"board {board.name} is a virtual node: there is nothing to flash (try `canopy demo`)")
    check_for_chip(image, board.chip)
    ports = list(dict.fromkeys(ports))
    if not ports:
        raise CanopyError("no ports to flash: pass --port PORT (see `canopy ports`) or --all")
    sinks = {p: (make_sink(p) if make_sink else _NullSink()) for p in ports}
    with esptool_session() as router:

        def one(port: str) -> NodeReport:
            with router.route(sinks[port]):
                try:
                    return flash_node(port, board, image, baud, erase, connect_attempts, sinks[port])
                except Exception as exc:  # a bug must still not read as success
                    return NodeReport(
                        port=port, board=board.name, result="failed",
                        error=f"internal error: {type(exc).__name__}: {exc}",
                        hint="please report this with the output of the run",
                        image_sha256=image.sha256,
                    )

        with ThreadPoolExecutor(max_workers=max(1, len(ports)), thread_name_prefix="flash") as pool:
            return list(pool.map(one, ports))
