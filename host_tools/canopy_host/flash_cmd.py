"""`canopy flash`: write a MicroPython image to one or many nodes, in parallel, verified."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from .boards import load_board
from .errors import CanopyError
from .esp_image import read_image
from .flash import DEFAULT_BAUD, DEFAULT_CONNECT_ATTEMPTS, NodeReport, flash_nodes
from .ports import ports_for_board


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flash",
        help="flash a MicroPython .bin onto one or more nodes (parallel, MD5-verified)",
        description=(
            "Detect each node's chip, refuse a chip or image that does not match --board, write "
            "the image compressed at the board's flash offset, verify it, and reset. Ports are "
            "flashed in parallel; the run ends with a JSON report per node on stdout."
        ),
        epilog=(
            "examples:\n"
            "  canopy flash --board esp32-devkitc --firmware ESP32_GENERIC-v1.25.0.bin --port /dev/ttyUSB0\n"
            "  canopy flash --board esp32-devkitc --firmware fw.bin --all --erase --report flash.json\n"
            "\n"
            "Images: download the .bin for the board's chip from https://micropython.org/download/\n"
            "(ESP32_GENERIC, ESP32_GENERIC_S3, ESP32_GENERIC_C3); the offset comes from boards/*.json.\n"
            "Progress bars count the compressed bytes sent. Ctrl-C lets the writes under way finish\n"
            "(a board cut off mid-write does not boot); a second Ctrl-C abandons them. Without a\n"
            "board: the fake ROM bootloader in tests/fake_esp (docs/flashing.md, 'Trying it without\n"
            "hardware'). Exit status: 0 every node ok, 1 some node failed or was refused."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--board", required=True, help="board name from boards/ (e.g. esp32-devkitc)")
    p.add_argument("--firmware", required=True, type=Path, metavar="IMAGE.bin", help="MicroPython firmware .bin")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--port", action="append", metavar="PORT",
                        help="serial port or pyserial URL such as socket://host:port (repeat for several nodes)")
    target.add_argument("--all", action="store_true", help="every connected port whose USB id matches --board")
    p.add_argument("--erase", action="store_true", help="erase the whole flash first (wipes the filesystem)")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD, help=f"transfer baud rate (default {DEFAULT_BAUD}); lower rates are tried on errors")
    p.add_argument("--connect-attempts", type=int, default=DEFAULT_CONNECT_ATTEMPTS, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the report")
    p.set_defaults(func=run)


class _BarSink:
    """One progress-bar row, fed by one node's esptool messages and progress."""

    def __init__(self, progress: Progress, port: str) -> None:
        self._progress = progress
        self._task: TaskID = progress.add_task(port, total=None, port=port, status="waiting")
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def message(self, text: str) -> None:
        with self._lock:
            self.lines.append(text)
        self._progress.update(self._task, status=text[:70])

    def progress(self, done: int, total: int, text: str) -> None:
        self._progress.update(self._task, completed=done, total=total, status=text[:70])


class _QuietSink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def progress(self, done: int, total: int, text: str) -> None:
        pass


def _validate(args: argparse.Namespace) -> None:
    if not 9600 <= args.baud <= 5_000_000:
        raise CanopyError(f"--baud {args.baud} is out of range; use a rate like 115200, 460800 or 921600")
    if args.connect_attempts < 1:
        raise CanopyError("--connect-attempts must be at least 1")


def _summary(console: Console, reports: list[NodeReport]) -> None:
    for r in reports:
        if r.result == "ok":
            console.print(f"[green]ok[/green]      {r.port}: {r.chip} {r.mac} rev {r.revision}, {r.image_size} bytes at {r.offset:#x}, {r.baud} baud, {r.duration_s:.1f}s")
        else:
            console.print(f"[red]{r.result}[/red]  {r.port}: {r.error}")
            if r.hint:
                console.print(f"        try: {r.hint}")


T = TypeVar("T")

FLASH_CTRL_C = ("canopy flash: Ctrl-C: letting the writes under way finish (a board cut off mid-write does not "
                "boot until flashed again); Ctrl-C again to abandon them",
                "canopy flash: abandoned; flash the boards again (`canopy flash ...`) before using them")


def finish_on_interrupt(work: Callable[[], T], say: Callable[[str], None],
                        texts: tuple[str, str] = FLASH_CTRL_C) -> tuple[T, bool]:
    """Run `work` (the per-node threads) in a thread of its own. The first Ctrl-C lets the
    node operations under way finish and says so (`texts[0]`): cut short, they leave a
    node that does not boot or does not run its app; the caller then still reports what
    was done. A second Ctrl-C says `texts[1]` and leaves at once. Returns work's result
    and whether Ctrl-C was pressed."""
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: a join cut by Ctrl-C can misreport the thread (3.11)

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="canopy-nodes", daemon=True).start()
    interrupted = False
    while not done.is_set():
        try:
            done.wait(0.2)
        except KeyboardInterrupt:
            if interrupted:
                say(texts[1])
                sys.stderr.flush()
                os._exit(130)  # the per-node threads cannot be cancelled; leave without them
            interrupted = True
            say(texts[0])
    if "error" in box:
        raise box["error"]
    return box["result"], interrupted


def run(args: argparse.Namespace) -> int:
    _validate(args)
    board = load_board(args.board)
    if not board.flashable:
        raise CanopyError(f"board {board.name} is a virtual node: there is nothing to flash (try `canopy demo`)")
    image = read_image(args.firmware)  # not an image / corrupt: refused before any port is opened
    if args.all:
        ports = [p.device for p in ports_for_board(board)]
        if not ports:
            ids = ", ".join(str(u) for u in board.usb)
            raise CanopyError(f"--all found no connected port with a {board.name} USB id ({ids}); see `canopy ports`")
    else:
        ports = args.port
    if args.report is not None and args.report.is_dir():
        raise CanopyError(f"--report {args.report} is a directory; name a file")
    console = Console(stderr=True)
    if args.quiet:
        sinks: dict[str, _QuietSink | _BarSink] = {}
        reports, interrupted = finish_on_interrupt(
            lambda: flash_nodes(ports, board, image, args.baud, args.erase, args.connect_attempts,
                                make_sink=lambda p: sinks.setdefault(p, _QuietSink())),
            lambda text: print(text, file=sys.stderr, flush=True))
    else:
        columns = (
            TextColumn("{task.fields[port]}", style="bold"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            reports, interrupted = finish_on_interrupt(
                lambda: flash_nodes(ports, board, image, args.baud, args.erase, args.connect_attempts,
                                    make_sink=lambda p: _BarSink(progress, p)),
                lambda text: progress.console.print(text, markup=False, highlight=False))
    _summary(console, reports)
    doc = {"board": board.name, "firmware": str(args.firmware), "nodes": [r.to_json() for r in reports]}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.report:
        try:
            args.report.write_text(text + "\n")
        except OSError as exc:
            raise CanopyError(f"could not write the report to {args.report}: {exc.strerror}") from None
    failed = [r for r in reports if r.result != "ok"]
    if failed:
        console.print(f"[red]{len(failed)} of {len(reports)} node(s) not flashed[/red]")
    if interrupted:
        console.print("canopy flash: interrupted (the writes under way were finished; see the report)")
        return 130
    return 1 if failed else 0
