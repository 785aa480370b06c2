"""`canopy demo`: a mesh of virtual canopy nodes, watched live, with no hardware.

Starts a handful of virtual nodes (the real firmware in the MicroPython unix port,
`canopy_host.sim`) spread over zones that share a microclimate, follows them with the
monitor (`canopy_host.monitor`, the same collector `canopy monitor` uses) on a live
dashboard, stores every frame in a SQLite file under ./var/demo/, and ends with a
summary: frames, gaps, reboots and CRC errors per node, sensor faults and failsafe
events, each zone's temperature and humidity against its setpoint, and the zone
consensus' verdict on every node. By default one node's sensor is sabotaged (a slow
drift) and another node is briefly unplugged, so the summary has something to detect.

    canopy demo                                  # 6 nodes, 2 zones, ~60 s
    canopy demo --single                         # the one-node text demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import CanopyError
from .paths import FIRMWARE_DIR, micropython_command
from .unixport import micropython_env

DEFAULT_DURATION_S = 60.0  # wall seconds: room for the repair's trim steps to end 'repaired'
DEFAULT_SPEED = 60.0  # simulated seconds per wall second: 60 s of wall time = one simulated hour
DEFAULT_NODES = 6
DEFAULT_ZONES = 2
PLAIN_EVERY_S = 2.0  # status line period when stdout is not a terminal
CONSENSUS_WINDOW_S = 60.0  # simulated seconds per consensus window
SABOTAGE_C = 5.0  # the sabotaged sensor's error once its drift has settled
CHECK_S = 1.0  # wall seconds between the repair loop's consensus checks (detection, release)
# Link events worth a line of their own in the plain output.
LOUD_EVENTS = ("fault", "failsafe", "recovered", "boot")

MESH_EXAMPLES = """\
examples:
  canopy demo                              6 nodes in 2 zones for ~60 s: n05's sensor drifts,
                                           n02 is unplugged, n04 loses its sensor for a while
  canopy demo --nodes 9 --zones 3 --duration 40
  canopy demo --fault n01:stuck@300 --fault n04:reboot@600
                                           your own faults instead of the default ones
  canopy demo --no-faults --weather humid  a quiet run
  canopy demo --plain > demo.log           status lines instead of the live table
  canopy demo --single --fault disconnect  the one-node text demo (old behaviour)

--fault NODE:KIND[=VALUE][@T][/DURATION] is passed to `canopy sim` (see its --help);
T and DURATION are simulated seconds. Without --fault the demo picks two faults that
scale with the run: a drifting sensor in zone A (the consensus should single it out as
a falseticker) and a short unplug in zone B (the monitor shows the gap and reconnects).
Everything is stored in the SQLite file printed at the start; the summary ends with
the commands that explore it (canopy export, canopy plot, canopy consensus).

--single runs one node in a plain text log instead (options --minutes, --every and a
--fault of: stuck, disconnect, spike, drift). Its columns: time is simulated (mm:ss
since boot); T/H show the conditioned value and (in brackets) the raw sensor reading;
shade/mist/fan are actuator commands in %. faults: 1 = sensor missing, 2 = stuck,
4 = out of range. FS = failsafe (shade to its safe position, mist off) until the
sensor is healthy again.
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v > 24 * 60:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 1440 (one day)")
    return v


def _duration(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(v) and 0 < v <= 24 * 3600):
        raise argparse.ArgumentTypeError("must be more than 0 and at most 86400 seconds")
    return v


def _speed(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = as fast as possible, --single only)")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2**31:
        raise argparse.ArgumentTypeError("must be 0 .. 2147483647")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="virtual nodes in zones, monitored live, with a summary (no hardware)",
        description=__doc__.split("\n\n")[1],
        epilog=MESH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=_duration, default=None, metavar="S",
                   help=f"wall seconds to run (default {DEFAULT_DURATION_S:g})")
    p.add_argument("--nodes", type=_count, default=None, metavar="N",
                   help=f"virtual nodes (default {DEFAULT_NODES})")
    p.add_argument("--zones", type=_count, default=None, metavar="Z",
                   help=f"zones the nodes are spread over, round robin (default {DEFAULT_ZONES})")
    p.add_argument("--speed", type=_speed, default=None, metavar="X",
                   help=f"simulated seconds per wall second (default {DEFAULT_SPEED:g}; "
                        "--single: 'auto' or 0 = as fast as possible)")
    p.add_argument("--seed", type=_seed, default=1, help="run seed: sites, weather, sensor noise (default 1)")
    p.add_argument("--weather", choices=WEATHER, default=None,
                   help="weather of the zones (default mild)")
    p.add_argument("--fault", action="append", default=[], metavar="NODE:KIND[=V][@T][/D]",
                   help="inject a fault (repeatable; replaces the default faults); "
                        "--single: one of " + ", ".join(sorted(FAULTS)))
    p.add_argument("--no-faults", action="store_true", help="no default faults: a quiet run")
    p.add_argument("--no-repair", action="store_true",
                   help="detect only: do not quarantine, recalibrate or release nodes")
    p.add_argument("--dir", default="var/demo", metavar="DIR",
                   help="folder for the database and the virtual nodes' flash (default var/demo)")
    p.add_argument("--db", default=None, metavar="FILE",
                   help="SQLite file to write (default DIR/demo-<UTC time>.db)")
    p.add_argument("--plain", action="store_true",
                   help="periodic status lines instead of the live table (automatic when not a terminal)")
    p.add_argument("--single", action="store_true", help="one node, readings as a text log (the old demo)")
    p.add_argument("--minutes", type=_positive_float, default=None,
                   help="--single: simulated minutes to run (default 30)")
    p.add_argument("--every", type=int, default=None, metavar="N",
                   help="--single: show every N-th reading (default: about 30 rows)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.single:
        wrong = [o for o, v in (("--duration", args.duration), ("--nodes", args.nodes), ("--zones", args.zones),
                                ("--db", args.db), ("--no-faults", args.no_faults or None)) if v is not None]
        if wrong:
            raise CanopyError(f"{', '.join(wrong)}: not with --single (it runs one node for --minutes)")
        if len(args.fault) > 1:
            raise CanopyError("--single takes at most one --fault")
        if args.fault and args.fault[0] not in FAULTS:
            raise CanopyError(f"--single --fault {args.fault[0]!r}: invalid choice (one of {', '.join(sorted(FAULTS))})")
        args.fault = args.fault[0] if args.fault else None
        args.minutes = 30.0 if args.minutes is None else args.minutes
        args.every = 0 if args.every is None else args.every
        args.weather = args.weather or "mild"
        return run_single(args)
    wrong = [o for o, v in (("--minutes", args.minutes), ("--every", args.every)) if v is not None]
    if wrong:
        raise CanopyError(f"{', '.join(wrong)}: only with --single (the mesh demo runs for --duration wall seconds)")
    return run_mesh(args)


# -- the mesh demo ------------------------------------------------------------------------


def zone_members(nodes: int, zones: int) -> dict[str, list[str]]:
    """zone -> node ids, the round robin `canopy sim` uses (n01 -> A, n02 -> B, ...)."""
    from .sim import node_id, zone_name

    out: dict[str, list[str]] = {}
    for i in range(1, nodes + 1):
        out.setdefault(zone_name((i - 1) % zones), []).append(node_id(i, nodes))
    return out


@dataclass
class Injected:
    text: str
    role: str  # what the summary calls it


def default_faults(nodes: int, zones: int, sim_s: float) -> list[Injected]:
    """The default demo's faults, scaled to the run so every --duration/--speed shows them.

    A sensor in zone A drifts by SABOTAGE_C over 10 % of the run from 15 % on, then
    keeps that error: the node itself sees nothing wrong (the reading stays plausible,
    and its control loop even holds the WRONG value on target), only a comparison with
    its neighbours can tell. The last node of zone A is picked so that with >= 3 nodes there the
    consensus has a majority to single it out. A node of another zone is unplugged for
    8 % of the run around the middle: the monitor must record the missing frames and
    reconnect. A third node loses its sensor for 5 % of the run: failsafe, recovery."""
    members = zone_members(nodes, zones)
    out: list[Injected] = []
    zone_a = members["A"]
    sabotaged = zone_a[-1]
    # A drift that settles: +rate from `start`, and -rate from `start + ramp` cancels its
    # growth, leaving a constant SABOTAGE_C error (a knocked or contaminated sensor),
    # which is what a recalibration can really fix.
    start, ramp = 0.15 * sim_s, 0.1 * sim_s
    rate = SABOTAGE_C / ramp
    role = f"sabotaged sensor: drifts {SABOTAGE_C:+g} °C from {_sim_clock(start)} to {_sim_clock(start + ramp)}"
    if len(zone_a) < 3:
        role += "; zone A has fewer than 3 nodes, so no majority can single it out"
    out.append(Injected(f"{sabotaged}:drift={rate:.4g}@{start:.0f}", role))
    out.append(Injected(f"{sabotaged}:drift={-rate:.4g}@{start + ramp:.0f}", "stops the drift: the error stays"))
    # Other zones first: zone A's remaining nodes are the majority that outvotes the drift.
    others = [n for _, ids in sorted(members.items(), key=lambda kv: kv[0] == "A") for n in ids if n != sabotaged]
    if others:
        out.append(Injected(f"{others[0]}:disconnect@{0.45 * sim_s:.0f}/{max(1.0, 0.08 * sim_s):.0f}",
                            "unplugged cable"))
    if len(others) > 1:
        # The node's own health check catches this one: failsafe, then recovery.
        out.append(Injected(f"{others[1]}:sensor_off@{0.65 * sim_s:.0f}/{max(1.0, 0.05 * sim_s):.0f}",
                            "sensor unplugged from the I2C bus"))
    return out


def read_setpoints() -> dict[str, float]:
    """The firmware's default setpoints (°C, %RH), asked from the firmware itself."""
    from .unixport import run_code

    code = ("from canopy.config import DEFAULT_CONFIG as c\n"
            "print(c['t_setpoint'], c['mist_t_setpoint'], c['h_setpoint'])")
    try:
        proc = run_code(code, timeout=20)
        t, mist, h = (int(x) for x in proc.stdout.split())
    except Exception:  # the summary then shows values without a setpoint
        return {}
    return {"t": t / 100, "mist_t": mist / 100, "h": h / 1024}


def _sim_clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _status_line(collector: Any, elapsed: float, speed: float) -> str:
    nodes, _ = collector.snapshot()
    parts = []
    for n in nodes:
        r = n.last_reading
        if not n.connected:
            state = "DOWN"
        elif not r:
            state = "..."
        elif (r.get("failsafe") or 0) & ~2:
            state = f"FAILSAFE {r.get('faults', 0)}" + (" QUARANTINED" if r["failsafe"] & 2 else "")
        elif r.get("failsafe"):  # 2: held by the repair agent, the readings stay real
            state = f"QUARANTINED {r.get('t', 0) / 100:.1f}C"
        else:
            state = f"{r.get('t', 0) / 100:.1f}C {r.get('h', 0) / 1024:.0f}%" + (f" f{r['faults']}" if r.get("faults") else "")
        parts.append(f"{n.node}{'/' + n.zone if n.zone else ''} {state}")
    return f"[{elapsed:5.1f} s, sim {_sim_clock(elapsed * speed)}] " + " | ".join(parts)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_mesh(args: argparse.Namespace) -> int:
    from .monitor import Collector, PortReader, sim_specs
    from .sim import SimConfig, Supervisor, parse_fault
    from .store import Store

    speed = DEFAULT_SPEED if args.speed is None else args.speed
    if not speed > 0:
        raise CanopyError("--speed must be more than 0 for the mesh demo (0 = as fast as possible is --single only)")
    duration = args.duration or DEFAULT_DURATION_S
    nodes = args.nodes or DEFAULT_NODES
    zones = args.zones or DEFAULT_ZONES
    if nodes > 50:
        raise CanopyError("--nodes: at most 50 in the demo (each node is a process); `canopy sim` runs more")
    if zones > nodes:
        raise CanopyError(f"--zones {zones} is more than --nodes {nodes}: every zone needs a node")
    if args.fault and args.no_faults:
        raise CanopyError("--fault and --no-faults contradict each other")
    sim_s = duration * speed
    if args.fault:
        injected = [Injected(t, "") for t in args.fault]
    elif args.no_faults:
        injected = []
    else:
        injected = default_faults(nodes, zones, sim_s)
    faults = [parse_fault(f.text) for f in injected]
    directory = Path(args.dir)
    db = Path(args.db) if args.db else directory / f"demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.db"
    if db.exists():
        raise CanopyError(f"{str(db)!r} already exists; name a new --db (the demo does not mix runs)")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CanopyError(f"cannot create {str(db.parent)!r}: {exc.strerror}") from None
    # The real authenticated path (docs/security.md): a master key of the demo's own
    # (made once, kept in DIR so `canopy monitor --sim-state DIR/sim/state.json` can
    # verify too), every node strict with its derived key, every frame checked by the
    # monitor, every repair command tagged with a persisted counter.
    from .provision import load_master_key
    from .security import HostAuth

    key_file = directory / "mesh.key"
    counter_file = directory / "security" / "counter.json"
    master = load_master_key(key_file, create=True)
    cfg = SimConfig(nodes=nodes, zones=zones, seed=args.seed, speed=speed, weather=args.weather or "mild",
                    faults=faults, directory=directory / "sim", fresh=True, master_key=master,
                    master_key_file=key_file)
    notes: list[str] = []  # supervisor messages, appended from relay threads
    sup = Supervisor(cfg, on_message=notes.append)  # validates cfg
    setpoints = read_setpoints()
    live = not args.plain and sys.stdout.isatty()

    print(f"canopy demo: {nodes} virtual nodes in {zones} zone(s), {cfg.weather} weather, seed {args.seed}, "
          f"{duration:g} s at {speed:g}x ({_sim_clock(sim_s)} simulated)")
    for f in injected:
        print(f"  fault: {f.text}" + (f"  ({f.role})" if f.role else ""))
    # One attack on the authenticated link with the default faults: a node that no fault
    # touches gets a tagged command, then the very same bytes again (a recorded command
    # played back). The node must refuse the second; the monitor counts its refusal.
    attack = None
    if not args.fault and not args.no_faults:
        attack = next((n for n in sorted(zone_of_ids(nodes, zones))
                       if not any(f.text.startswith(n + ":") for f in injected)), None)
    if attack is not None:
        print(f"  attack: a command to {attack} replayed at {_sim_clock(ATTACK_AT * sim_s)} "
              "(the node must refuse it)")
    print(f"  database: {db}", flush=True)

    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    store = Store(db)
    collector = Collector(store, auth=HostAuth(master, counter_file))
    readers: dict[str, Any] = {}
    dash = None
    repairer: Any = None  # repair_loop.RepairLoop
    interrupted = False
    t0 = time.time()
    broken = False
    try:
        sup.start()  # t0 stays the moment the first node started: its simulated clock's zero
        for spec in sim_specs(cfg.state_path):
            readers[str(spec.node_hint)] = PortReader(collector.add_port(spec), collector)
        for r in readers.values():
            r.start()

        if not args.no_repair:
            # The library's continuous loop (the same as `canopy monitor --repair`): the
            # node under repair borrows its port from its reader, the others keep reading.
            from .repair import SerialClient
            from .repair_loop import RepairLoop, readers_lender

            def client_for(node: str) -> Any:
                # Tagged commands with the persisted counter when the nodes are strict.
                return SerialClient({node: f"sim:{node}"}, timeout=3.0, state_file=str(cfg.state_path),
                                    auth=collector.auth)

            repairer = RepairLoop(db, db.with_suffix(".shadow.json"), lend=readers_lender(readers.values),
                                  client_for=client_for, t0=t0, timescale=speed, window=CONSENSUS_WINDOW_S,
                                  zone_of={n: z for z, ids in zone_members(nodes, zones).items() for n in ids},
                                  say=lambda text: notes.append("sim " + text), flush=store.flush)
            repairer.start(every_s=CHECK_S)
        if live:
            from .dashboard import Dashboard

            dash = Dashboard(collector, title=f"canopy demo ({speed:g}x)")
            dash.__enter__()
        deadline = time.monotonic() + duration
        attack_at = time.monotonic() + ATTACK_AT * duration if attack is not None else None
        next_line = time.monotonic() + PLAIN_EVERY_S
        shown = 0
        while (now := time.monotonic()) < deadline:
            if attack_at is not None and now >= attack_at:
                attack_at = None
                threading.Thread(target=replay_command, daemon=True,
                                 args=(cfg.state_path, HostAuth(master, counter_file), attack, notes.append)).start()
            while shown < len(notes):
                note = notes[shown]
                shown += 1
                if dash is not None:
                    collector.messages.append(note)
                else:
                    print(f"  {note}", flush=True)
            if dash is not None:
                dash.refresh()
            elif now >= next_line:
                next_line += PLAIN_EVERY_S
                print(_status_line(collector, time.time() - t0, speed), flush=True)
            time.sleep(max(0.0, min(0.25, deadline - time.monotonic())))
    except KeyboardInterrupt:
        interrupted = True
    except BrokenPipeError:
        # `canopy demo | head`: nobody reads any more; stop as cleanly as on Ctrl-C.
        broken = True
    finally:
        # A second Ctrl-C must not abort the shutdown: nodes left running or an unflushed store.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if repairer is not None:
                repairer.stop()  # a repair under way finishes first: it holds a lent port
            for r in readers.values():
                r.stop()
            for r in readers.values():
                r.join(timeout=5)
            if dash is not None:
                try:
                    dash.__exit__(None, None, None)
                except Exception:
                    pass
            sup.stop()
            store.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    wall = time.time() - t0
    if broken:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if store.error is not None:
        raise CanopyError(f"writing {str(db)!r} failed: {store.error}")
    report = build_report(db, collector.summary(), t0=t0, speed=speed, members=zone_members(nodes, zones))
    report.repairs = repairer.events + repairer.unfinished() if repairer is not None else []
    report.auth = collector.auth is not None
    report.attack = attack
    print()
    if interrupted:
        print(f"interrupted after {wall:.1f} s: nodes stopped, everything received is in the database")
    for line in format_report(report, db=db, wall=wall, speed=speed, setpoints=setpoints, injected=injected):
        print(line)
    return 130 if interrupted else 0


# -- detection and repair while the demo runs -------------------------------------------


def load_readings(db: Path, *, t0: float, speed: float, zone_of: dict[str, str]) -> list[Any]:
    """Consensus inputs from the database, timed in simulated seconds (repair_loop's)."""
    from .repair_loop import load_readings as load

    return load(db, t0=t0, timescale=speed, zone_of=zone_of)


def zone_verdicts(items: list[Any]) -> list[dict[str, Any]]:
    from .repair_loop import zone_verdicts as judge

    return judge(items, CONSENSUS_WINDOW_S)


# -- the summary ------------------------------------------------------------------------


@dataclass
class NodeReport:
    node: str
    zone: str
    frames: int = 0  # received by the monitor
    stored: int = 0  # rows in the database
    readings: int = 0
    gaps: int = 0
    missing: int = 0
    reboots: int = 0
    crc_errors: int = 0
    disconnects: int = 0
    fault_events: int = 0
    failsafe_events: int = 0
    recovered_events: int = 0
    quarantined_readings: int = 0  # readings whose failsafe field says held by quarantine
    quarantined_at_end: bool = False  # its last reading did
    falseticker_windows: int = 0
    judged_windows: int = 0
    first_flagged: float | None = None  # simulated seconds since the start
    first_alarm: float | None = None  # first temperature fault class other than ok
    classes: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    sec_rejects: dict[str, int] = field(default_factory=dict)  # frames the monitor refused, by verdict
    refused_commands: int = 0  # commands the node refused (its E code=security)


@dataclass
class Report:
    nodes: dict[str, NodeReport]
    zone_windows: dict[str, int]
    zone_no_quorum: dict[str, int]
    sim_s: float
    # zone -> quantity -> the last OK verdict (value, truechimers, falsetickers, window_start)
    zone_last: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    repairs: list[Any] = field(default_factory=list)  # repair_loop.RepairEvent
    auth: bool = False  # the monitor verified every frame's tag
    attack: str | None = None  # the node a replayed command was sent to


def build_report(db: Path, summary: dict[str, Any], *, t0: float, speed: float,
                 members: dict[str, list[str]]) -> Report:
    """Everything the summary says, from the monitor's counters and the database it wrote."""
    from .store import decode_fields, iter_frames

    zone_of = {n: z for z, ids in members.items() for n in ids}
    nodes = {n: NodeReport(n, z) for n, z in sorted(zone_of.items())}
    for name, s in summary["nodes"].items():
        r = nodes.setdefault(name, NodeReport(name, "?"))
        r.frames, r.readings, r.gaps, r.missing = s["frames"], s["readings"], s["gaps"], s["missing"]
        r.reboots, r.crc_errors, r.disconnects = s["reboots"], s["crc_errors"], s["disconnects"]
        r.sec_rejects = dict(s.get("security", {}))
        r.refused_commands = s.get("node_sec_rejects", 0)
    last_rx = t0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for node, count in con.execute("SELECT node, COUNT(*) FROM frames GROUP BY node"):
            nodes.setdefault(node, NodeReport(node, "?")).stored = count
        for row in iter_frames(con, kind="event"):
            code = decode_fields(row).get("code")
            r = nodes.setdefault(row["node"], NodeReport(row["node"], "?"))
            if code == "fault":
                r.fault_events += 1
            elif code == "failsafe":
                r.failsafe_events += 1
            elif code == "recovered":
                r.recovered_events += 1
        for row in iter_frames(con, kind="reading"):
            r = nodes.setdefault(row["node"], NodeReport(row["node"], "?"))
            last_rx = max(last_rx, row["rx_time"])
            # failsafe bit 2: the repair agent holds the actuators (docs/protocol.md).
            q = bool((row["failsafe"] or 0) & 2)
            r.quarantined_readings += q
            r.quarantined_at_end = q
    finally:
        con.close()
    zone_windows: Counter[str] = Counter()
    no_quorum: Counter[str] = Counter()
    zone_last: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    sim_end = (last_rx - t0) * speed
    for v in zone_verdicts(load_readings(db, t0=t0, speed=speed, zone_of=zone_of)):
        zone = v["zone"]
        # The zone's value comes from the last COMPLETE window: the run's last seconds
        # hold only the readings of whichever nodes were read last.
        if v["status"] == "OK" and v["value"] is not None and v["window_start"] + CONSENSUS_WINDOW_S <= sim_end:
            zone_last[zone][v["quantity"]] = v
        if v["quantity"] == "t":
            zone_windows[zone] += 1
            if v["status"] != "OK":
                no_quorum[zone] += 1
            for n in v["truechimers"] + v["falsetickers"]:
                nodes[n].judged_windows += 1
            for n in v["falsetickers"]:
                nodes[n].falseticker_windows += 1
                if nodes[n].first_flagged is None:
                    nodes[n].first_flagged = v["window_start"]
        for n, f in v.get("faults", {}).items():
            # The verdict column is about temperature, the quantity the nodes control on.
            if f.get("alarm") and n in nodes and v["quantity"] == "t":
                nodes[n].classes[f"{v['quantity']}:{f['class']}"] += 1
                if v["quantity"] == "t" and f["class"] != "spike" and nodes[n].first_alarm is None:
                    nodes[n].first_alarm = v["window_start"]
                kind = f.get("action", {}).get("kind")
                if kind and kind != "none" and f.get("actionable"):
                    nodes[n].actions[kind] += 1
    return Report(nodes, dict(zone_windows), dict(no_quorum), sim_end, dict(zone_last))


ATTACK_AT = 0.3  # fraction of the run at which the replayed command is sent


def zone_of_ids(nodes: int, zones: int) -> list[str]:
    return [n for ids in zone_members(nodes, zones).values() for n in ids]


def replay_command(state_file: Path, auth: Any, node: str, say: Any) -> None:
    """Send `node` a tagged status command, then the same bytes again, on a second handle
    of its port (the monitor keeps reading it, so the replies and the refusal are stored)."""
    from .transport import open_port, resolve_port

    try:
        port = open_port(resolve_port(f"sim:{node}", str(state_file)))
        try:
            line = auth.command(node, "status")
            port.write(line)
            time.sleep(0.5)
            port.write(line)  # the recording, played back
            time.sleep(0.2)
        finally:
            port.close()
    except (CanopyError, OSError) as exc:
        say(f"{node}: replay attack not sent: {exc}")
        return
    say(f"{node}: a tagged status command, then the same bytes again (replay attack)")


def security_lines(rep: Report) -> list[str]:
    """What the authenticated link refused: frames the monitor rejected, commands nodes refused."""
    if not rep.auth:
        return ["authentication: off (frames not verified)"]
    rejected = sum(sum(r.sec_rejects.values()) for r in rep.nodes.values())
    refused = sum(r.refused_commands for r in rep.nodes.values())
    lines = [f"authentication: every node strict (HMAC-SHA256 tag on every frame and command); "
             f"{rejected} frame(s) rejected by the monitor, {refused} command(s) refused by the nodes"]
    if rep.attack is not None:
        r = rep.nodes.get(rep.attack)
        got = r.refused_commands if r is not None else 0
        lines.append(f"  replay attack on {rep.attack}: " + ("refused by the node (err=auth msg=replay)"
                                                              if got else "NOT seen refused"))
    for r in rep.nodes.values():
        if r.sec_rejects or r.refused_commands:
            what = ", ".join(f"{k} {v}" for k, v in sorted(r.sec_rejects.items()))
            lines.append(f"  {r.node}: " + "; ".join(x for x in (
                f"rejected {what}" if what else "", f"refused {r.refused_commands} command(s)"
                if r.refused_commands else "") if x) + " (security events in the database)")
    return lines


def _verdict_text(r: NodeReport) -> str:
    if not r.judged_windows:
        return "not judged"
    parts = []
    if r.falseticker_windows:
        parts.append(f"FALSETICKER {r.falseticker_windows}/{r.judged_windows} windows, "
                     f"first at {_sim_clock(r.first_flagged or 0)}")
    else:
        parts.append(f"truechimer {r.judged_windows}/{r.judged_windows}")
    if r.classes:
        top = ", ".join(f"{c.split(':', 1)[1]} x{k}" for c, k in r.classes.most_common(2))
        parts.append(top)
    if r.actions:
        parts.append("-> " + ", ".join(sorted(r.actions)))
    return "; ".join(parts)


def format_report(rep: Report, *, db: Path, wall: float, speed: float, setpoints: dict[str, float],
                  injected: list[Injected]) -> list[str]:
    total = sum(r.frames for r in rep.nodes.values())
    stored = sum(r.stored for r in rep.nodes.values())
    lines = [
        f"summary: {len(rep.nodes)} nodes, {total} frames received, {stored} stored, "
        f"{wall:.1f} s wall = {_sim_clock(rep.sim_s)} simulated ({speed:g}x)",
        "",
        f"{'node':<5} {'zone':<4} {'frames':>6} {'stored':>6} {'gaps (missing)':>14} {'reboots':>7} {'crc':>4} "
        f"{'unplugs':>7} {'faults':>6} {'failsafe/rec':>12} {'quarantined':>11}  consensus (temperature)",
    ]
    for r in rep.nodes.values():
        # Readings sent while quarantined; "now" if the run ended with the node still held.
        quar = f"{r.quarantined_readings}{' now' if r.quarantined_at_end else ''}" if r.quarantined_readings else "-"
        lines.append(
            f"{r.node:<5} {r.zone:<4} {r.frames:>6} {r.stored:>6} {f'{r.gaps} ({r.missing})':>14} {r.reboots:>7} "
            f"{r.crc_errors:>4} {r.disconnects:>7} {r.fault_events:>6} {f'{r.failsafe_events}/{r.recovered_events}':>12} "
            f"{quar:>11}  {_verdict_text(r)}"
        )
    held = [r.node for r in rep.nodes.values() if r.quarantined_at_end]
    if held:
        lines.append(f"quarantined at the end: {' '.join(held)} (actuators held at failsafe, out of consensus)")
    lines.append("")
    zones = sorted({r.zone for r in rep.nodes.values()})
    for z in zones:
        last = rep.zone_last.get(z, {})
        windows = rep.zone_windows.get(z, 0)
        nq = rep.zone_no_quorum.get(z, 0)
        tail = f"; consensus windows {windows}" + (f", no quorum in {nq}" if nq else "")
        vt, vh = last.get("t"), last.get("h")
        if vt is None:
            lines.append(f"zone {z}: no consensus value (too few healthy nodes agreed){tail}")
            continue
        # The zone's value is the consensus of its nodes in the last window, so a
        # sabotaged sensor does not drag it: the falsetickers are named, not averaged in.
        sp_t, sp_h = setpoints.get("t"), setpoints.get("h")
        t = float(vt["value"])
        text = f"zone {z}: T {t:.2f} °C" + (f" (setpoint {sp_t:.2f}, {t - sp_t:+.2f})" if sp_t is not None else "")
        if vh is not None:
            h = float(vh["value"])
            text += f", RH {h:.1f} %" + (f" (fan setpoint {sp_h:.0f} %)" if sp_h is not None else "")
        text += f" at {_sim_clock(float(vt['window_start']))}, agreed by {' '.join(vt['truechimers'])}"
        if vt["falsetickers"]:
            text += f", voted out: {' '.join(vt['falsetickers'])}"
        lines.append(text + tail)
    detected = [r for r in rep.nodes.values() if r.falseticker_windows]
    for f in injected:
        if f.role.startswith("sabotaged"):
            node = f.text.split(":")[0]
            hit = rep.nodes.get(node)
            found = []
            if hit is not None and hit.falseticker_windows:
                found.append(f"voted out by its zone from {_sim_clock(hit.first_flagged or 0)}")
            if hit is not None and hit.first_alarm is not None:
                t_classes = [c.split(":", 1)[1] for c, _ in hit.classes.most_common() if c != "t:spike"]
                found.append(f"classed {t_classes[0] if t_classes else 'faulty'} from {_sim_clock(hit.first_alarm)}"
                             + (f" (action: {', '.join(sorted(hit.actions))})" if hit.actions else ""))
            if found:
                lines.append(f"detected: the sabotaged {node} was " + " and ".join(found) + " (simulated time)")
            else:
                lines.append(f"not detected: the sabotaged {node} was never singled out "
                             "(run longer, or with more nodes in its zone)")
    lines += security_lines(rep)
    if rep.repairs:
        lines += ["", "repair (journaled in the database; simulated time; the monitor lets go of a node's port "
                      "while it is repaired, so its gaps include the repair):"]
        for ev in rep.repairs:
            lines.append(f"  {_sim_clock(ev.at)} {ev.node}: {ev.text}" + ("" if ev.ok else "  <- FAILED"))
    wrongly = [r.node for r in detected if not any(f.text.startswith(r.node + ":") for f in injected)]
    if wrongly:
        lines.append(f"also voted out at times: {' '.join(wrongly)}")
    zone = zones[0] if zones else "A"
    window = CONSENSUS_WINDOW_S / speed
    lines += [
        "",
        "explore the data:",
        f"  canopy export --db {db} | head",
        f"  canopy plot --db {db} --zone {zone} -o zone-{zone.lower()}.png",
        f"  canopy consensus --db {db} --window {window:g}     # {CONSENSUS_WINDOW_S:g} simulated s per window",
    ]
    if rep.repairs:
        lines.append(f"  canopy audit --db {db}")
    return lines


# -- the one-node demo (--single) -----------------------------------------------------------

FAULTS = {
    # demo name -> sim.json fault kind
    "stuck": "stuck",
    "disconnect": "sensor_off",
    "spike": "spike",
    "drift": "drift",
}
WEATHER = ("mild", "hot", "humid", "cool")
TARGET_WALL_S = 8.0  # --speed auto aims the whole run at about this much wall time
ROWS = 30  # readings shown; events are always shown
BAND_C = 0.5  # "on target" band for the summary

_READING = re.compile(
    r"^R t=(?P<t>\d+)s T=(?P<T>-?[\d.]+)C \(raw (?P<Traw>-?[\d.]+)\) P=(?P<P>-?\d+)Pa "
    r"\(raw (?P<Praw>-?\d+)\) H=(?P<H>-?[\d.]+)% \(raw (?P<Hraw>-?[\d.]+)\) "
    r"shade=(?P<shade>[\d.]+)% mist=(?P<mist>[\d.]+)% fan=(?P<fan>[\d.]+)% "
    r"faults=(?P<faults>\d+) failsafe=(?P<failsafe>\d)"
)
_EVENT = re.compile(r"^E t=(?P<t>\d+)s event=(?P<code>\w+) arg=(?P<arg>-?\d+)")
_SETPOINT = re.compile(r"T=(?P<t>-?[\d.]+)C")


@dataclass
class Summary:
    setpoint_c: float | None = None
    readings: list[dict[str, float]] = field(default_factory=list)
    events: list[tuple[int, str, int]] = field(default_factory=list)


def build_sim(args: argparse.Namespace) -> dict:
    run_s = int(args.minutes * 60)
    sim: dict = {
        "node_id": "demo",
        "zone": "demo",
        "seed": args.seed,
        "zone_seed": args.seed,
        "weather": args.weather,
        "board": "unix-sim",
        "faults": [],
    }
    if args.fault:
        sim["faults"].append({
            "at_s": run_s // 3,
            "kind": FAULTS[args.fault],
            "duration_s": max(30, run_s // 4),
        })
    return sim


def _fmt_time(s: int) -> str:
    return f"{s // 60:3d}:{s % 60:02d}"


def _row(r: dict[str, float]) -> str:
    fs = " FS" if r["failsafe"] else ""
    return (
        f"{_fmt_time(int(r['t']))}  {r['T']:6.2f} ({r['Traw']:6.2f})  {r['P']:7.0f}  "
        f"{r['H']:5.1f} ({r['Hraw']:5.1f})  {r['shade']:6.1f} {r['mist']:6.1f} {r['fan']:6.1f}  "
        f"{int(r['faults']):>2d}{fs}"
    )


HEADER = (
    "  time   T C (raw)         P Pa    H % (raw)     shade   mist    fan  faults\n"
    "  ----   ---------------  -------  ------------  ------ ------ ------  ------"
)


def summarise(s: Summary, run_s: int, wall_s: float) -> list[str]:
    rs = s.readings
    # Failsafe readings repeat the last good values (or zeros before the first one).
    healthy = [r for r in rs if not r["failsafe"]]
    if not healthy:
        return [f"no healthy readings in {len(rs)} ticks: the sensor never answered"]
    temps = [r["T"] for r in healthy]
    lines = [
        f"simulated {run_s // 60} min {run_s % 60} s in {wall_s:.1f} s wall "
        f"({run_s / max(wall_s, 1e-6):.0f}x real time), {len(rs)} ticks",
        f"temperature (healthy ticks): start {temps[0]:.2f} C, end {temps[-1]:.2f} C, "
        f"min {min(temps):.2f} C, max {max(temps):.2f} C",
    ]
    if s.setpoint_c is not None:
        sp = s.setpoint_c
        inside = sum(1 for r in healthy if abs(r["T"] - sp) <= BAND_C)
        first = next((int(r["t"]) for r in healthy if abs(r["T"] - sp) <= BAND_C), None)
        lines.append(
            f"setpoint {sp:.2f} C: within +-{BAND_C} C for {100 * inside / max(len(healthy), 1):.0f}% "
            "of healthy ticks"
            + (f", first reached at {_fmt_time(first).strip()}" if first is not None else ", not reached")
        )
    mist_on = sum(1 for r in rs if r["mist"] > 0)
    lines.append(
        f"actuators (mean): shade {sum(r['shade'] for r in rs) / len(rs):.1f}%, "
        f"mist {sum(r['mist'] for r in rs) / len(rs):.1f}% (on {100 * mist_on / len(rs):.0f}% of ticks), "
        f"fan {sum(r['fan'] for r in rs) / len(rs):.1f}%"
    )
    # Ticks before the first reading are start-up, not a fault.
    first = next(i for i, r in enumerate(rs) if not r["failsafe"])
    fs = sum(1 for r in rs[first:] if r["failsafe"])
    faults = [e for e in s.events if e[1] == "fault"]
    lines.append(
        f"sensor faults: {len(faults)}; failsafe for {fs} ticks; "
        f"recoveries: {sum(1 for e in s.events if e[1] == 'recovered')}"
    )
    return lines


def run_single(args: argparse.Namespace) -> int:
    """The one-node text demo (`--single`)."""
    run_s = int(args.minutes * 60)
    if run_s < 1:
        raise CanopyError("--minutes is too short: run at least one simulated second")
    if args.every < 0:
        raise CanopyError("--every must be 0 (automatic) or a positive number of ticks")
    speed = args.speed if args.speed is not None else max(1.0, run_s / TARGET_WALL_S)
    every = args.every or max(1, run_s // ROWS)
    main_py = FIRMWARE_DIR / "main.py"
    if not main_py.is_file():
        raise CanopyError(f"the node firmware is missing: {main_py} not found")
    cmd = micropython_command() + [str(main_py)]
    summary = Summary()
    with tempfile.TemporaryDirectory(prefix="canopy-demo-") as folder:
        (Path(folder) / "sim.json").write_text(json.dumps(build_sim(args)))
        env = micropython_env()
        env.update({
            "CANOPY_RUN_S": str(run_s),
            "CANOPY_SPEED": repr(speed),
            "CANOPY_EVERY": "1",
            "CANOPY_LINK": "text",
        })
        fault = f", fault: {args.fault}" if args.fault else ""
        print(f"virtual canopy node: {args.weather} weather, seed {args.seed}, "
              f"{args.minutes:g} simulated min at {speed:g}x{fault}")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        try:
            shown_header = False
            for line in proc.stdout:
                line = line.rstrip("\n")
                m = _READING.match(line)
                if m:
                    r = {k: float(v) for k, v in m.groupdict().items()}
                    summary.readings.append(r)
                    first_healthy = not r["failsafe"] and not shown_header
                    if len(summary.readings) % every == 0 or first_healthy:
                        if not shown_header:
                            print(HEADER)
                            shown_header = True
                        print(_row(r), flush=True)
                    continue
                m = _EVENT.match(line)
                if m:
                    t, code, arg = int(m["t"]), m["code"], int(m["arg"])
                    summary.events.append((t, code, arg))
                    print(f"{_fmt_time(t)}  ** event: {code} ({arg})", flush=True)
                    continue
                if line.startswith("I "):
                    sp = _SETPOINT.search(line)
                    if sp:
                        summary.setpoint_c = float(sp["t"])
                    print(line[2:], flush=True)
                    continue
                if line.strip():
                    print(line, flush=True)
            stderr = proc.stderr.read() if proc.stderr else ""
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
        except BrokenPipeError:
            # `canopy demo | head`: the reader has gone, which is not an error.
            proc.kill()
            proc.wait()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        wall = time.monotonic() - start
    if rc != 0:
        tail = "\n".join(stderr.strip().splitlines()[-12:])
        raise CanopyError(f"the virtual node stopped with exit status {rc}:\n{tail}")
    print()
    for line in summarise(summary, run_s, wall):
        print(line)
    return 0
