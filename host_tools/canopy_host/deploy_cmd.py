"""`canopy deploy`: the app, board file, identity and key onto nodes, then an acceptance test."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from . import deploy
from .boards import load_board
from .errors import CanopyError
from .flash_cmd import finish_on_interrupt
from .paths import FIRMWARE_DIR
from .ports import ports_for_board
from .provision import default_master_key_path, load_master_key
from .registry import Registry
from .transport import is_url, load_sim_state, resolve_port, state_file_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="copy the app (compiled for the board) to nodes, provision them, check they are healthy",
        description=(
            "Compile firmware/ with mpy-cross for the board's architecture (virtual nodes get the "
            ".py sources), hash every file on the node and copy only what differs, write board.json, "
            "the node identity and its mesh key, then run an acceptance test (BME280 chip id, "
            "plausible readings, the control loop ticking, a status ping to the running app, and "
            "with a mesh gateway a status ping through it over the mesh). "
            "'flashed' (files verified) and 'healthy' (acceptance passed) are reported separately. "
            "Ports run in parallel; a JSON report per node goes to stdout."
        ),
        epilog=(
            "examples:\n"
            "  canopy deploy --board esp32-devkitc --port /dev/ttyUSB0 --zone A\n"
            "  canopy deploy --board esp32-devkitc --all\n"
            "  canopy sim --nodes 3 &  canopy deploy --board unix-sim --all\n"
            "  canopy deploy --board esp32-devkitc --port /dev/ttyUSB1 --gateway /dev/ttyUSB0\n"
            "  canopy sim --nodes 3 --mesh line &  canopy deploy --board unix-sim --port sim:n03"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--board", required=True, help="board name from boards/ (e.g. esp32-devkitc, unix-sim)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--port", action="append", metavar="PORT",
                        help="serial port, URL or sim:NODE (repeat for several nodes)")
    target.add_argument("--all", action="store_true",
                        help="every port whose USB id matches --board (unix-sim: every running virtual node)")
    p.add_argument("--zone", help="zone to record for new nodes (kept for known ones)")
    p.add_argument("--node-id", help="node id for a new board (one --port only); known boards keep theirs")
    p.add_argument("--no-check", action="store_true", help="skip the acceptance test (the node is then not marked healthy)")
    p.add_argument("--registry", type=Path, help="node registry file (default $CANOPY_REGISTRY or ~/.config/canopy/nodes.json)")
    p.add_argument("--master-key", type=Path, metavar="FILE",
                   help="mesh master key file (default $CANOPY_MASTER_KEY_FILE or ~/.config/canopy/mesh_master.key; created if missing)")
    p.add_argument("--counter-file", type=Path, metavar="FILE",
                   help="persisted host command counter for the authenticated ping (default var/security/counter.json)")
    p.add_argument("--gateway", metavar="PORT",
                   help="port (or sim:NODE) of the mesh gateway: the acceptance test also pings each node "
                        "through it over the mesh (virtual nodes: default the gateway `canopy sim --mesh` marks)")
    p.add_argument("--sim-state", metavar="FILE", help="`canopy sim` state file for sim:NODE ports and --all with unix-sim")
    p.add_argument("--firmware-dir", type=Path, default=FIRMWARE_DIR, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the report")
    p.set_defaults(func=run)


class _Bar(deploy.Progress):
    def __init__(self, progress: Progress, port: str) -> None:
        self._p = progress
        self._task: TaskID = progress.add_task(port, total=None, port=port, status="waiting")

    def stage(self, text: str) -> None:
        self._p.update(self._task, status=text[:60])

    def total(self, nbytes: int) -> None:
        self._p.update(self._task, total=max(nbytes, 1), completed=0 if nbytes else 1)

    def advance(self, nbytes: int) -> None:
        self._p.advance(self._task, nbytes)


CTRL_C = ("canopy deploy: Ctrl-C: letting the deploys under way finish (a node cut off mid-deploy is left "
          "at its prompt, not running its app); Ctrl-C again to abandon them",
          "canopy deploy: abandoned; deploy those nodes again (they may not be running their app)")


def missing_port(port: str) -> str | None:
    """Why `port` cannot be opened if it is a device path that is not there (a typo or an
    unplugged board), else None: the transport would call it a port in use."""
    if port.startswith("/") and not is_url(port) and not Path(port).exists():
        return (f"cannot open {port}: it does not exist (see `canopy ports`; virtual nodes: sim:NODE, "
                "or --all with --board unix-sim)")
    return None


def check_ports_exist(ports: list[str]) -> None:
    for port in ports:
        why = missing_port(port)
        if why:
            raise CanopyError(why)


def master_key(path: Path | None) -> bytes:
    """The mesh master key. The default file is created on first use (and that is said);
    a --master-key naming a missing file is a mistake: a fresh key there would re-key the
    node away from the rest of the mesh."""
    if path is not None and not path.exists():
        raise CanopyError(f"--master-key {path}: no such file (omit --master-key to use the default "
                          f"{default_master_key_path()}, created on first use)")
    default = path or default_master_key_path()
    existed = default.exists()
    key = load_master_key(path)
    if not existed:
        print(f"canopy: created a new mesh master key at {default}; every node keyed from now on needs it "
              "(docs/security.md)", file=sys.stderr)
    return key


def check_host_files(registry_path: Path | None, counter_file: Path | None = None) -> None:
    """Read the registry (and the command counter) before any node is touched: found broken
    after the copy, they would leave a node half deployed."""
    Registry.load(registry_path, strict=True)
    if counter_file is not None:
        from .security import CommandCounter

        if counter_file.is_dir():
            raise CanopyError(f"--counter-file {counter_file} is a directory; name a file")
        CommandCounter(counter_file).peek()


def _ports(args: argparse.Namespace, board_name: str, virtual: bool) -> list[str]:
    if not args.all:
        return [resolve_port(p, args.sim_state) for p in args.port]
    if virtual:
        nodes = load_sim_state(args.sim_state)["nodes"]
        ports = [n["port"] for n in nodes if isinstance(n, dict) and n.get("port")]
        if not ports:
            raise CanopyError("--all: no running virtual node has a port (start them with `canopy sim`)")
        return ports
    board = load_board(board_name)
    ports = [p.device for p in ports_for_board(board)]
    if not ports:
        ids = ", ".join(str(u) for u in board.usb)
        raise CanopyError(f"--all found no connected port with a {board.name} USB id ({ids}); see `canopy ports`")
    return ports


def _gateway(args: argparse.Namespace, ports: list[str], virtual: bool) -> deploy.Gateway | None:
    """--gateway, else (virtual nodes) the gateway marked in the sim state of a mesh the
    deployed nodes belong to; None = no mesh ping."""
    state = None
    if state_file_path(args.sim_state).exists():
        try:
            state = load_sim_state(args.sim_state)
        except CanopyError:
            state = None  # an unreadable state file only costs the hop count
    if args.gateway:
        port = resolve_port(args.gateway, args.sim_state)
        return (deploy.gateway_from_sim_state(state, port) if state else None) or deploy.Gateway(port)
    if not virtual or state is None:
        return None
    in_mesh = {str(n.get("port")) for n in state["nodes"]
               if isinstance(n, dict) and isinstance(n.get("mesh"), dict) and n.get("port")}
    if not any(p in in_mesh for p in ports):
        return None
    return deploy.gateway_from_sim_state(state)


def _mesh_text(r: deploy.NodeReport) -> str:
    m = r.mesh_ping
    if isinstance(m, str):
        return f"mesh ping {m}"
    hops = f", {m['hops']} hop(s)" if m.get("hops") is not None else ""
    return f"mesh ping {m.get('rtt_ms')} ms via {m['via'].get('node') or m['via'].get('port')}{hops}"


def _summary(console: Console, reports: list[deploy.NodeReport]) -> None:
    for r in reports:
        what = f"{r.node_id or '?'} ({r.mac or 'no MAC'}): {len(r.copied)} copied, {r.unchanged} unchanged"
        if r.removed:
            what += f", {len(r.removed)} removed"
        if r.healthy:
            console.print(f"[green]healthy[/green]  {r.port}: {what}, ping {r.ping.get('rtt_ms')} ms, "
                          f"{_mesh_text(r)} ({r.seconds:.1f}s)")
        elif r.flashed:
            why = "; ".join(r.problems) or r.error or "acceptance skipped"
            console.print(f"[yellow]flashed[/yellow]  {r.port}: {what}; NOT healthy: {why}")
        else:
            console.print(f"[red]failed[/red]   {r.port}: {r.error}")
        for w in r.warnings:
            console.print(f"         warning: {w}")


def run(args: argparse.Namespace) -> int:
    board = load_board(args.board)
    virtual = board.chip == "unix"
    if args.node_id and (args.all or len(args.port) > 1):
        raise CanopyError("--node-id names one node: use it with a single --port")
    ports = _ports(args, board.name, virtual)
    check_host_files(args.registry, args.counter_file)
    if args.report is not None and args.report.is_dir():
        raise CanopyError(f"--report {args.report} is a directory; name a file")
    gateway = _gateway(args, ports, virtual) if not args.no_check else None
    master = master_key(args.master_key)
    console = Console(stderr=True, emoji=False)  # a MAC's ':cd:' is not an emoji
    kw = dict(zone=args.zone, node_id=args.node_id, registry_path=args.registry, check=not args.no_check,
              firmware_dir=args.firmware_dir, counter_file=args.counter_file, gateway=gateway)
    if args.quiet:
        reports, interrupted = finish_on_interrupt(lambda: deploy.deploy_nodes(ports, board, master, **kw),
                                                   lambda text: print(text, file=sys.stderr, flush=True), CTRL_C)
    else:
        columns = (TextColumn("{task.fields[port]}", style="bold"), BarColumn(), DownloadColumn(),
                   TextColumn("{task.fields[status]}"))
        with Progress(*columns, console=console, transient=False) as progress:
            reports, interrupted = finish_on_interrupt(
                lambda: deploy.deploy_nodes(ports, board, master, make_progress=lambda p: _Bar(progress, p), **kw),
                lambda text: progress.console.print(text, markup=False, highlight=False), CTRL_C)
    for r in reports:  # one missing port fails its node only; the others are deployed
        why = None if r.flashed else missing_port(r.port)
        if why:
            r.error = why
    _summary(console, reports)
    doc = {"board": board.name, "nodes": [r.to_json() for r in reports]}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.report:
        try:
            args.report.write_text(text + "\n")
        except OSError as exc:
            raise CanopyError(f"could not write the report to {args.report}: {exc.strerror}") from None
    bad = [r for r in reports if not (r.healthy or (args.no_check and r.flashed))]
    if bad:
        console.print(f"[red]{len(bad)} of {len(reports)} node(s) not healthy[/red]")
    if interrupted:
        console.print("canopy deploy: interrupted (the deploys under way were finished; see the report)")
        return 130
    return 1 if bad else 0
