"""`canopy sim`: run virtual nodes on real pseudo-terminals until Ctrl-C or --duration."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .errors import CanopyError
from .sim import FAULT_KINDS, SimConfig, Supervisor, parse_fault, weather_kinds

EXAMPLES = """\
examples:
  canopy sim --nodes 3                      # three nodes, ports printed, Ctrl-C stops them
  canopy sim --nodes 6 --zones 2 --speed 60 --weather humid --seed 7
  canopy sim --nodes 2 --fault n02:stuck@300/120 --fault n01:drift=0.05@60
  canopy sim --nodes 2 --fault n01:disconnect@30/10 --fault all:garbage=32@5
  canopy sim --nodes 1 --duration 60 --json  # state as JSON on stdout, stop after a minute
  mpremote connect /dev/pts/7 fs cp main.py :main.py + reset   # deploy to a virtual node

fault kinds: drift (VALUE C/s), stuck, spike (VALUE C, one-shot), sensor_off are simulated
by the firmware's world; disconnect (unplug for DURATION), reboot (power cut for DURATION),
garbage (VALUE random bytes, repeated for DURATION) and garbage_inline (the same, spliced
into the middle of the next frame line) by this supervisor. T and DURATION are
simulated seconds since boot (wall seconds = simulated / --speed).

Each node's flash is DIR/<node>/ (kept between runs; --fresh wipes it). The state file
lists ports, pids and the key file, for `canopy monitor/deploy/repair --sim-state` and
`sim:NODE` port names. Stopping: Ctrl-C, or from another shell `kill PID` (SIGTERM), which
is what `kill %1` does for `canopy sim ... &`; a background job never sees Ctrl-C.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="run virtual nodes (real firmware in the unix port) on pseudo-terminals",
        description=(
            "Start N virtual canopy nodes: the real firmware in MicroPython unix-port processes,\n"
            "each with its own folder (its flash) and a pseudo-terminal that mpremote,\n"
            "`canopy monitor` and `canopy deploy` open like a USB serial port (docs/simulation.md)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", "-n", type=int, metavar="N", default=2, help="number of virtual nodes (default 2)")
    p.add_argument("--zones", type=int, metavar="Z", default=1, help="spread the nodes over Z zones sharing a microclimate (default 1)")
    p.add_argument("--seed", type=int, metavar="S", default=1, help="run seed: weather, sensor noise, garbage bytes (default 1)")
    p.add_argument("--speed", type=float, metavar="X", default=1.0, help="simulated seconds per wall second (default 1)")
    kinds = weather_kinds()
    p.add_argument("--weather", default="hot", metavar="W",
                   help="weather kind" + (f" ({', '.join(kinds)})" if kinds else "") + " (default hot)")
    p.add_argument("--fault", action="append", default=[], metavar="NODE:KIND[=VALUE][@T][/DURATION]",
                   help=f"inject a fault; KIND is one of {', '.join(FAULT_KINDS)}; NODE is an id (n01), "
                        "a number, or all; repeatable")
    p.add_argument("--dir", default="var/sim", metavar="DIR", help="folder holding one sub-folder per node (default var/sim)")
    p.add_argument("--state", metavar="FILE", default=None, help="state file for other tools (default DIR/state.json)")
    p.add_argument("--duration", type=float, metavar="SEC", default=None, help="stop after this many wall seconds (default: until Ctrl-C)")
    p.add_argument("--heapsize", metavar="SIZE", default=None, help="MicroPython heap per node, e.g. 128k (default: unix-port default)")
    p.add_argument("--fresh", action="store_true", help="wipe the node folders first (a factory-new flash)")
    p.add_argument("--json", action="store_true", help="print the state as JSON instead of a table")
    p.add_argument("--delivery-log", action="store_true",
                   help="record every frame line each node's relay forwarded or dropped, and every injected "
                        "fault, in DIR/<node>/delivery.jsonl (ground truth for tests, docs/simulation.md)")
    m = p.add_argument_group("mesh and security (docs/mesh.md, docs/security.md)")
    m.add_argument("--mesh", metavar="TOPOLOGY", choices=("line", "ring", "full"), default=None,
                   help="connect the nodes by a simulated ESP-NOW mesh: line, ring or full (default: no mesh)")
    m.add_argument("--gateway", metavar="NODE", default=None, help="the node wired to the host (default: the first)")
    m.add_argument("--mesh-loss", type=float, metavar="P", default=0.0, help="drop each radio packet with probability P")
    m.add_argument("--mesh-delay-ms", type=int, metavar="MS", default=0, help="radio delay in simulated ms")
    m.add_argument("--mesh-ttl", type=int, metavar="N", default=4, help="hops a frame may travel (default 4)")
    m.add_argument("--mesh-port", type=int, metavar="PORT", default=0, help="first UDP port (default: free ports)")
    m.add_argument("--master-key", metavar="FILE", default=None,
                   help="mesh master key (64 hex digits): every node gets its derived key and runs strict; "
                        "without it the nodes run in UNAUTHENTICATED DEV MODE")
    p.set_defaults(func=run)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def check_state_path(path: Path) -> None:
    """--state is rewritten all the time: refuse a path that is a folder or another file
    (a typo must not overwrite README.md), before any node starts."""
    if path.is_dir():
        raise CanopyError(f"--state {path} is a directory; name a file, e.g. {path / 'state.json'}")
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and isinstance(data.get("nodes"), list)):
        raise CanopyError(f"--state {path} exists and is not a `canopy sim` state file; name a new file")


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and not args.duration > 0:  # `not >` also refuses nan
        raise CanopyError("--duration must be a positive number of seconds")
    if not math.isfinite(args.speed):
        raise CanopyError(f"--speed must be a finite number (0 = as fast as possible), not {args.speed}")
    if args.state:
        check_state_path(Path(args.state))
    cfg = SimConfig(
        nodes=args.nodes, zones=args.zones, seed=args.seed, speed=args.speed, weather=args.weather,
        faults=[parse_fault(f) for f in args.fault], directory=Path(args.dir),
        state_file=Path(args.state) if args.state else None, heapsize=args.heapsize, fresh=args.fresh,
        delivery_log=args.delivery_log,
    )
    if args.mesh is not None:
        from .mesh_sim import MeshSpec

        cfg.mesh = MeshSpec(args.mesh, args.mesh_loss, args.mesh_delay_ms, args.mesh_ttl, args.gateway,
                            args.mesh_port)
    if args.master_key is not None:
        from .security import load_master_key

        cfg.master_key = load_master_key(Path(args.master_key))
        cfg.master_key_file = Path(args.master_key)

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr if args.json else sys.stdout, flush=True)

    # SIGTERM (kill, CI) and SIGHUP (terminal closed) stop the nodes as cleanly as Ctrl-C.
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    sup = Supervisor(cfg, on_message=say)
    try:
        # Ctrl-C at any point, even while the nodes are starting, is a clean stop.
        sup.start()
        if args.json:
            print(json.dumps(sup.state(), indent=1), flush=True)
        else:
            print(f"{len(sup.nodes)} virtual node(s), seed {cfg.seed}, speed {cfg.speed:g}x, weather {cfg.weather}")
            for n in sup.nodes:
                print(f"  {n.node_id}  zone {n.zone}  {n.port}  serial {n.serial_number}  pid {n.pid}  {n.folder}")
            if cfg.master_key is None:
                print("auth: UNAUTHENTICATED DEV MODE (no --master-key): commands are not checked")
            if cfg.mesh is not None:
                gw = [n.node_id for n in sup.nodes if (n.sim.get("mesh") or {}).get("gateway")]
                print(f"mesh: {cfg.mesh.topology}, gateway {', '.join(gw)}, loss {cfg.mesh.loss:g}, "
                      f"ttl {cfg.mesh.ttl}; `canopy mesh` partitions or silences nodes")
            print(f"state file: {cfg.state_path}")
            print("Ctrl-C stops all nodes." if args.duration is None else f"Stopping after {args.duration:g} s.",
                  flush=True)
        sup.run(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say(f"stopped {len(sup.nodes)} virtual node(s)")
    return 0
