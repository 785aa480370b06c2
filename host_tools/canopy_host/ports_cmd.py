"""`canopy ports`: which serial ports look like canopy nodes, and which node is which."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .ports import list_candidate_ports


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ports",
        help="list serial ports with their USB bridge, likely board and node id",
        description=(
            "List USB serial ports: VID:PID, USB serial number, the bridge chip and board it "
            "probably is (from boards/*.json), and the node id if the node was seen before."
        ),
        epilog="example: canopy ports --json | jq '.[].device'",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="also list non-USB serial ports (built-in UARTs)")
    p.add_argument("--registry", type=Path, help="node registry file (default $CANOPY_REGISTRY or ~/.config/canopy/nodes.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ports = list_candidate_ports(include_non_usb=args.all, registry_path=args.registry)
    if args.json:
        print(json.dumps([p.to_json() for p in ports], indent=2))
        return 0
    if not ports:
        print(
            "no USB serial ports found. Plug a board in with a data USB cable; on Linux check "
            "`dmesg | tail` for the bridge driver (cp210x, ch341) and the dialout group.",
            file=sys.stderr,
        )
        return 0
    table = Table(title="serial ports")
    for col in ("port", "VID:PID", "USB serial", "bridge", "board guess", "node"):
        table.add_column(col)
    for p in ports:
        serial = p.serial_number or "-"
        if p.serial_number and p.serial_is_generic:
            serial += " (shared default)"
        boards = ", ".join(b.name for b in p.boards) or "-"
        table.add_row(p.device, p.usb_id, serial, p.bridge or "-", boards, p.node_id or "-")
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped: never cut device names to fit 80 columns
    console.print(table)
    if any(p.serial_is_generic and p.serial_number for p in ports):
        print("note: some bridges report a shared factory serial number; nodes on them are told apart by USB port.", file=sys.stderr)
    return 0
