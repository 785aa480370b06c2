"""`canopy provision`: identity and mesh key onto a node; the host registry maps MAC -> node."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import registry
from .boards import load_board
from .deploy import SCAN_TIMEOUT_S, connect, guarded, usb_info
from .errors import CanopyError
from .deploy_cmd import check_ports_exist, master_key
from .provision import check_board_fits, provision_node, read_facts
from .transport import resolve_port


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provision",
        help="give a node its id, zone and mesh key; remember the board by MAC",
        description=(
            "Read the node's MAC over the raw REPL (machine.unique_id(); virtual nodes have a "
            "stable fake one), choose its id (the registry's for a known MAC, else --node-id, else "
            "the id the app calls itself: a virtual node's id, an ESP32's MAC in hex), write "
            "identity.json and the key file (docs/security.md), "
            "and record MAC, id, zone, board and key id in the node registry. USB serial numbers "
            "are recorded too but never trusted alone: every CP2102 says 0001."
        ),
        epilog=(
            "examples:\n"
            "  canopy provision --port /dev/ttyUSB0 --board esp32-devkitc --node-id n07 --zone B\n"
            "  canopy provision --port sim:n01 --board unix-sim\n"
            "  canopy provision --list"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--port", metavar="PORT", help="serial port, URL or sim:NODE")
    target.add_argument("--list", action="store_true", help="print the registry as JSON")
    p.add_argument("--board", help="board name from boards/ (default: the registry's for a known MAC)")
    p.add_argument("--node-id", help="id for a new board (a known MAC keeps its id)")
    p.add_argument("--zone", help="zone (default: kept)")
    p.add_argument("--usb-serial", help=argparse.SUPPRESS)
    p.add_argument("--registry", type=Path, help="node registry file (default $CANOPY_REGISTRY or ~/.config/canopy/nodes.json)")
    p.add_argument("--master-key", type=Path, metavar="FILE",
                   help="mesh master key file (default $CANOPY_MASTER_KEY_FILE or ~/.config/canopy/mesh_master.key; created if missing)")
    p.add_argument("--sim-state", metavar="FILE", help="`canopy sim` state file for sim:NODE ports")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        reg = registry.Registry.load(args.registry, strict=True)
        print(json.dumps({"registry": str(reg.path), "nodes": reg.nodes}, indent=2, sort_keys=True))
        return 0
    if args.board:
        load_board(args.board)  # an unknown board name is an error before the port is touched
    port = resolve_port(args.port, args.sim_state)
    check_ports_exist([port])
    reg = registry.Registry.load(args.registry, strict=True)
    master = master_key(args.master_key)
    serial_no, location = usb_info(port)
    t = connect(port, soft_reset=False)
    try:
        with guarded(t, SCAN_TIMEOUT_S, "reading the node's MAC"):
            facts = read_facts(t)
        board = args.board or reg.nodes.get(reg.by_mac(facts.mac) or "", {}).get("board")
        if not board:
            raise CanopyError(f"new board (MAC {facts.mac}): say which it is with --board")
        check_board_fits(load_board(board), facts.platform)
        with guarded(t, SCAN_TIMEOUT_S, "provisioning"):
            result = provision_node(t, board, master, zone=args.zone, node_id=args.node_id,
                                    registry_path=args.registry, usb_serial=args.usb_serial or serial_no,
                                    location=location, facts=facts)
    finally:
        try:
            t.exit_raw_repl()
            # Soft reset even after a failure: connecting stopped the app, and a node left
            # at the REPL runs no control loop (and looks unplugged to the monitor).
            t.serial.write(b"\x04")  # the app restarts, with its new identity and key if ok
        except Exception:
            pass
        try:  # always: an open handle keeps mpremote's exclusive lock on the port
            t.close()
        except Exception:
            pass
    doc = result.to_json() | {"port": port}
    print(json.dumps(doc, indent=2))
    if result.warning:
        print(f"canopy provision: warning: {result.warning}", file=sys.stderr)
    verb = "re-provisioned" if result.was_known else "provisioned"
    print(f"{verb} {result.node_id} (MAC {result.mac}, zone {result.zone or '-'}, key {result.key_id}); "
          "the app restarted with it", file=sys.stderr)
    return 0
