"""`canopy monitor`: follow many nodes at once, store every frame, show a live table."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .errors import CanopyError

DEFAULT_DB = "canopy-monitor.db"

EPILOG = """\
examples:
  canopy monitor                              # every USB port that looks like a known board
  canopy monitor /dev/ttyUSB0 /dev/ttyUSB1    # these ports
  canopy monitor --sim-state var/sim/state.json --duration 30
  canopy monitor sim:n01 sim:n03                # virtual nodes by id ($CANOPY_SIM_STATE or var/sim/state.json)
  canopy monitor --json /dev/ttyACM0 | jq -c 'select(.kind=="event")'
  canopy monitor --master-key mesh.key /dev/ttyUSB0   # check every frame's tag (docs/security.md)
  canopy monitor --sim-state var/sim/state.json --repair var/shadow.json   # repair live (docs/repair.md)

Every frame goes into the SQLite file given by --db (default canopy-monitor.db in the
current folder; appended to, WAL mode, safe to read while the monitor runs), with link
events (connects, disconnects, reboots, gaps, CRC errors, garbage, free-text lines).
Read it back with `canopy export`, `canopy plot` and `canopy consensus`.
Ctrl-C stops cleanly: everything received so far is committed before exit.

On a terminal the monitor shows a live table, one row per node; when stdout is a pipe or
a file it prints notices (ports that cannot be opened, ...) on stderr as they happen and
a per-node summary at the end. A port that cannot be opened is retried (backoff up to 5 s)
until it appears: unplugging is normal, so only a port path that does not exist at the
start is an error.

With --master-key (or following a `canopy sim --master-key` through --sim-state, whose
state file names its key) every frame's HMAC tag and replay window are checked: a frame
that fails is not stored as data but as a `security` link event with its verdict and
raw bytes, and counted per node (docs/monitor.md "Authentication").
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "monitor",
        help="follow nodes live, store every frame in SQLite",
        description=(
            "Follow many nodes at once (physical USB serial ports or virtual nodes), store every "
            "frame in SQLite, detect gaps/duplicates/reboots, survive unplug and replug."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ports", nargs="*", metavar="PORT", help="serial port path, pyserial URL (socket://host:port) or sim:NODE")
    p.add_argument("--sim-state", metavar="FILE", help="state file written by `canopy sim`: follow its virtual nodes")
    p.add_argument("--db", default=DEFAULT_DB, metavar="FILE", help=f"SQLite file to append to (default {DEFAULT_DB})")
    p.add_argument("--json", action="store_true", help="write frames as JSON lines to stdout instead of the dashboard")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--baud", type=int, default=115200, help="baud rate for physical ports (default 115200)")
    p.add_argument("--commit-interval", type=float, default=0.2, metavar="S",
                   help="commit received frames at least every S seconds (default 0.2); larger = fewer "
                        "disk writes; Ctrl-C and exit always commit everything")
    p.add_argument("--master-key", metavar="FILE",
                   help="mesh master key file (64 hex digits): verify every frame's tag, store failures as "
                        "security events (default: the key named in the --sim-state file, if any)")
    p.add_argument("--no-auth", action="store_true",
                   help="do not verify tags even if the sim state file names a key")
    p.add_argument("--repair", metavar="SHADOW",
                   help="repair while monitoring: quarantine and recalibrate nodes the zone consensus finds "
                        "measurably wrong, release them once they agree again (the node under repair lends "
                        "its port, the others stay monitored); when the session ends, one `canopy repair` "
                        "pass with this shadow file over the nodes seen (journal in --db; docs/repair.md)")
    p.set_defaults(func=run)


def _json_writer(out: Any, broken: threading.Event) -> Any:
    def write(rx: float, port: str, f: Any) -> None:
        if broken.is_set():
            return
        line = json.dumps(
            {"rx_time": round(rx, 6), "port": port, "node": f.node, "boot": f.boot, "seq": f.seq,
             "kind": f.kind, "fields": f.fields},
            separators=(",", ":"),
            default=str,
        )
        try:
            out.write(line + "\n")
        except (BrokenPipeError, ValueError):  # reader of the pipe went away
            broken.set()

    return write


RESCAN_S = 2.0  # how often to look for newly plugged boards / newly started virtual nodes


def _spec_key(spec: Any) -> str:
    # Same identity rules as the readers: node id for virtual nodes, the USB serial
    # number when it is unique (it survives a replug), else the path.
    return str(spec.node_hint or (spec.usb_serial if spec.resolver else None) or spec.path)


def _new_specs(args: argparse.Namespace, auto_usb: bool, known: set[str]) -> list[Any]:
    from .monitor import discover_usb_specs, sim_specs

    found: list[Any] = []
    if args.sim_state:
        try:
            found += sim_specs(args.sim_state)
        except CanopyError:  # the sim is restarting or gone: keep following what we have
            pass
    if auto_usb:
        found += discover_usb_specs()
    return [s for s in found if _spec_key(s) not in known]


def _collect_specs(args: argparse.Namespace) -> list[Any]:
    from .monitor import discover_usb_specs, explicit_specs, sim_specs

    specs = explicit_specs(args.ports)
    if args.sim_state:
        specs += sim_specs(args.sim_state)
    if not specs:
        specs = discover_usb_specs()
        if not specs:
            raise CanopyError(
                "no ports given and no USB serial port matches a known board (boards/*.json usb hints); "
                "name ports (canopy monitor /dev/ttyUSB0) or follow virtual nodes (--sim-state FILE)"
            )
    kept, missing = [], []
    for spec in specs:
        if spec.must_exist and spec.path and not Path(spec.path).exists():
            missing.append(spec.path)
            continue
        kept.append(spec)
    if not kept:
        which = f"port {missing[0]!r} does not exist" if len(missing) == 1 else \
            f"none of the ports {', '.join(repr(m) for m in missing)} exists"
        raise CanopyError(f"{which} (see `canopy ports` for candidates, or --sim-state for virtual nodes)")
    for path in missing:
        print(f"canopy monitor: warning: port {path!r} does not exist; following the others", file=sys.stderr)
    return kept


def quarantined_nodes(collector: Any) -> list[str]:
    """Nodes whose latest reading says the repair agent holds their actuators."""
    from .dashboard import is_quarantined

    with collector.lock:
        return sorted(name for name, st in collector.nodes.items() if is_quarantined(st.last_reading))


def _print_summary(summary: dict[str, Any], db: str, out: Any, quarantined: list[str] | None = None) -> None:
    nodes = summary["nodes"]
    held = set(quarantined or ())
    print(
        f"canopy monitor: {summary['duration_s']:.1f} s, {len(nodes)} node(s), {summary['frames']} frames -> {db}",
        file=out,
    )
    for name, n in nodes.items():
        ranges = ", ".join(f"{a}..{b}" if a != b else str(a) for _, a, b in n["gap_ranges"][:5])
        gap = f"gaps {n['gaps']} (missing {n['missing']}{': ' + ranges if ranges else ''})"
        print(
            f"  {name:<8} frames {n['frames']:<6} readings {n['readings']:<6} {gap}  dup {n['duplicates']}  "
            f"reboots {n['reboots']}  crc {n['crc_errors']}  garbage {n['garbage_bytes']} B  "
            f"disconnects {n['disconnects']}"
            + (f"  auth rejects {n['sec_rejects']}" + "".join(f" {k}={v}" for k, v in sorted(n["security"].items()))
               if summary.get("auth") else "")
            + (f"  refused commands {n['node_sec_rejects']}" if n.get("node_sec_rejects") else "")
            + (f"  relayed copies {n['relayed']}" if n.get("relayed") else "")
            + ("  QUARANTINED" if name in held else ""),
            file=out,
        )
    if held:
        print(f"  quarantined at the end (actuators held at failsafe, out of consensus): {len(held)}: "
              + ", ".join(sorted(held)), file=out)
    if summary.get("auth"):
        print(f"  authentication: {summary['sec_rejects']} frame(s) rejected (security events in the store)",
              file=out)
    for path, p in summary["ports"].items():
        if p["node"] is None:
            print(f"  {path}: no frames (connects {p['connects']}, open failures {p['open_failures']})", file=out)


def master_key_file(args: argparse.Namespace) -> Path | None:
    """--master-key, else the key a followed `canopy sim --master-key` recorded, else None."""
    if getattr(args, "no_auth", False):
        return None
    if getattr(args, "master_key", None):
        return Path(args.master_key)
    if args.sim_state:
        try:
            named = json.loads(Path(args.sim_state).read_text()).get("master_key_file")
        except (OSError, ValueError, AttributeError):
            return None  # _collect_specs reports an unreadable state file
        if named:
            return Path(named)
    return None


def make_auth(args: argparse.Namespace) -> Any:
    """A HostAuth for the monitor (verify only: it never sends commands), or None."""
    path = master_key_file(args)
    if path is None:
        return None
    from .security import HostAuth, load_master_key

    auth = HostAuth(load_master_key(path))
    args.master_key = str(path)  # `--repair` after the session tags its commands with it
    return auth


def _repair_loop(args: argparse.Namespace, collector: Any, readers: list[Any], store: Any) -> Any:
    """The continuous repair loop (canopy_host.repair_loop) over this session's readings."""
    from .repair import SerialClient
    from .repair_loop import RepairLoop, readers_lender
    # Consensus windows are in the nodes' time: a `canopy sim --speed X` node lives X
    # simulated seconds per wall second (the fault classes' slew limits are physical).
    timescale = 1.0
    if args.sim_state:
        try:
            timescale = float(json.loads(Path(args.sim_state).read_text()).get("speed") or 1.0)
        except (OSError, ValueError, TypeError, AttributeError):
            timescale = 1.0
        if not timescale > 0:
            timescale = 1.0

    def port_of(node: str) -> str:
        if args.sim_state:
            return f"sim:{node}"
        with collector.lock:
            return next((p.path for p in collector.ports if p.node == node and p.path), f"sim:{node}")

    def client_for(node: str) -> Any:
        # Tagged commands (persisted counter) and verified replies when frames are verified.
        return SerialClient({node: port_of(node)}, timeout=3.0, state_file=args.sim_state, auth=collector.auth)

    def zones() -> dict[str, str]:
        with collector.lock:
            return {n: st.zone for n, st in collector.nodes.items() if st.zone}

    return RepairLoop(args.db, args.repair, lend=readers_lender(lambda: list(readers)), client_for=client_for,
                      t0=time.time(), timescale=timescale, zone_of=zones, say=collector.messages.append,
                      flush=store.flush)


def run(args: argparse.Namespace) -> int:
    from .monitor import Collector, PortReader
    from .store import Store

    if args.duration is not None and not args.duration > 0:
        raise CanopyError("--duration must be a positive number of seconds")
    if args.baud <= 0:
        raise CanopyError("--baud must be positive")
    if not 0 <= args.commit_interval <= 3600:
        raise CanopyError("--commit-interval must be between 0 and 3600 seconds")
    try:
        from . import protocol  # fail early, not inside every reader
    except ImportError as exc:
        raise CanopyError(f"the protocol module is not available: {exc}") from None
    from .store import check_db_file

    check_db_file(args.db, writing=True)  # before the ports: a typo must not cost a session
    specs = _collect_specs(args)
    auth = make_auth(args)
    if getattr(args, "repair", None):
        from .shadow import load_shadow

        load_shadow(args.repair)  # a missing or broken shadow file is a usage error, before anything starts
    store = Store(args.db, max_delay=args.commit_interval)
    broken = threading.Event()
    collector = Collector(store, on_frame=_json_writer(sys.stdout, broken) if args.json else None, auth=auth)
    if auth is None:
        collector.messages.append("tags not checked (no --master-key): frames are trusted as received")
    if protocol.FAST_SCAN != "compiled":
        collector.messages.append("compiled frame scanner not built (no C compiler when installed): ingest is "
                                  "about half as fast, results the same; see docs/troubleshooting.md")
    readers = [PortReader(collector.add_port(s), collector, baud=args.baud) for s in specs]
    loop = _repair_loop(args, collector, readers, store) if getattr(args, "repair", None) else None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    auto_usb = not args.ports and not args.sim_state
    known = {_spec_key(s) for s in specs}
    next_scan = time.monotonic() + RESCAN_S
    shown: set[str] = set()
    dash = None
    try:
        for r in readers:
            r.start()
        if loop is not None:
            loop.start()
        # Piped or redirected: no live table (it would be printed once, clipped, at the
        # end); the notices go to stderr as they come and the summary ends the output.
        if not args.json and sys.stdout.isatty():
            from .dashboard import Dashboard

            dash = Dashboard(collector)
            dash.__enter__()
        while deadline is None or time.monotonic() < deadline:
            if broken.is_set():
                break
            if (auto_usb or args.sim_state) and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + RESCAN_S
                for spec in _new_specs(args, auto_usb, known):
                    known.add(_spec_key(spec))
                    reader = PortReader(collector.add_port(spec), collector, baud=args.baud)
                    readers.append(reader)
                    reader.start()
                    collector.messages.append(f"following {spec.label} ({spec.path or 'no port yet'})")
            if dash is not None:
                dash.refresh()
            else:
                with collector.lock:
                    try:
                        sys.stdout.flush()
                    except (BrokenPipeError, ValueError):
                        broken.set()
                for m in list(collector.messages):  # bad ports: tell the user once
                    if m not in shown:
                        shown.add(m)
                        print(f"canopy monitor: {m}", file=sys.stderr)
            time.sleep(0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not abort the final flush.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if loop is not None:
                loop.stop()  # a repair under way finishes first: it holds a lent port
            for r in readers:
                r.stop()
            for r in readers:
                r.join(timeout=5)
            if dash is not None:
                try:
                    dash.__exit__(None, None, None)
                except Exception:
                    pass
            store.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    if args.json:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass
    _print_summary(collector.summary(), args.db, sys.stderr if args.json else sys.stdout,
                   quarantined_nodes(collector))
    if store.error is not None:
        raise CanopyError(f"writing {args.db!r} failed: {store.error}")
    if loop is not None:
        out = sys.stderr if args.json else sys.stdout
        for ev in loop.events:
            print(f"  repair: {ev.node}: {ev.text}" + ("" if ev.ok else "  <- FAILED"), file=out)
        if not loop.events:
            print(f"  repair: no node needed a repair ({loop.checks} consensus checks)", file=out)
    if getattr(args, "repair", None):
        # The loop only acts on consensus findings; this pass brings every node seen to
        # the shadow's desired state (configs included) now that the ports are free.
        from .repair_cmd import after_monitor

        seen = {p["node"]: path for path, p in collector.summary()["ports"].items() if p["node"]}
        return after_monitor(args, seen)
    return 0
