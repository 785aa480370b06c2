"""`canopy consensus`: one fault-tolerant verdict per zone, quantity and time window.

Reads readings as JSON lines (file or stdin) or from a monitor database (--db) and
prints one JSON verdict per line. Formats, units and rules: docs/consensus.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, TextIO

from .consensus import DEFAULT_WINDOW, QUANTITIES, Reading, reduce_window, window_of, zone_verdict
from .errors import CanopyError
from .faults import ACTUATORS, SECURITY_EVENTS, FaultTracker

SENSORS = ("p", "t", "h")  # pressure first: the microclimate test looks at it
UNASSIGNED = "unassigned"
# Store columns are protocol integers: t in 0.01 °C, p in Pa, h in 1/1024 %RH.
STORE_SCALE = {"t": 100.0, "p": 100.0, "h": 1024.0}
# Seconds per node tick: the firmware's default tick_ms (1000). The store keeps the tick
# count, not the node's tick period; a node configured faster or slower has its slews
# scaled by the same factor.
NODE_TICK_S = 1.0
HELD_FAILSAFE, HELD_QUARANTINE = 1, 2  # the reading's failsafe bits (docs/protocol.md)
SENSOR_MISSING = 1  # the reading's faults bit: no sensor, no measurement

EPILOG = """\
input (one JSON object per line; units: t °C, p hPa, h %RH, shade/mist/fan %):
  {"node": "n01", "zone": "A", "time": 1795636800.5, "quantity": "t", "value": 24.31, "accuracy": 1.0}
  {"node": "n01", "zone": "A", "time": 1795636800.5, "quantity": "mist", "value": 0, "setpoint": 40}
  {"node": "n03", "zone": "A", "time": 1764100801, "event": "mac_failure"}

examples:
  canopy consensus readings.jsonl
  some-exporter | canopy consensus --window 300 --allowance t=0.5 --skip-bad
  canopy consensus --db canopy-monitor.db --since 1h --zone A
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "consensus",
        help="fault-tolerant zone values and per-node fault classes",
        description=(
            "Fuse the nodes of each zone into one value per time window (Marzullo intervals, NTP-style "
            "truechimer/falseticker labelling) and classify each node's faults. One JSON verdict per "
            "zone, quantity and window on stdout."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", nargs="?", default="-", metavar="FILE",
                   help="JSON lines file (default: stdin); not with --db")
    p.add_argument("--db", metavar="FILE", help="read the readings recorded by `canopy monitor --db FILE`")
    p.add_argument("--since", metavar="TIME", help="--db only: from this time (ISO or relative: 10m, 2h)")
    p.add_argument("--until", metavar="TIME", help="--db only: up to this time")
    p.add_argument("--window", type=float, default=DEFAULT_WINDOW, metavar="SECONDS",
                   help=f"window length; windows are aligned to multiples of it in Unix time (default {DEFAULT_WINDOW:g})")
    p.add_argument("--allowance", action="append", default=[], metavar="Q=X",
                   help="zone allowance per quantity in its units, repeatable (defaults: "
                   + ", ".join(f"{q}={v['allowance']:g}" for q, v in QUANTITIES.items()) + ")")
    p.add_argument("--max-faulty", type=int, metavar="F",
                   help="fault budget per zone (default: the most a majority can outvote, (n-1)//2)")
    p.add_argument("--offsets", metavar="FILE", help='JSON {"node": {"t": 0.4}}: known offsets to subtract')
    p.add_argument("--quarantined", action="append", default=[], metavar="NODE",
                   help="a quarantined node: excluded from the vote, watched for release (repeatable); "
                        "with --db, a node is also out of the vote in each window its readings say it was "
                        "quarantined (failsafe bit 2)")
    p.add_argument("--zone", action="append", metavar="Z", help="only this zone (repeatable)")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad input lines instead of stopping")
    p.set_defaults(func=run)


# -- input --------------------------------------------------------------------------------


def _num(obj: dict[str, Any], key: str, *, required: bool) -> float | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise ValueError(f"missing {key!r}")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{key!r} must be a finite number, not {v!r}")
    return float(v)


def _time(v: Any) -> float:
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"'time' {v!r} is neither Unix seconds nor an ISO time") from None
        if dt.tzinfo is None:
            raise ValueError(f"'time' {v!r} has no time zone (add Z or +00:00)")
        return dt.timestamp()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"'time' must be Unix seconds or an ISO time, not {v!r}")
    return float(v)


def parse_line(text: str) -> Reading | tuple[str, str, float, str]:
    """A reading, or ('event', node, time, kind) ... as (node, zone, time, kind). Raises ValueError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    for key in ("node", "zone"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ValueError(f"{key!r} must be a non-empty string")
    if "time" not in obj:
        raise ValueError("missing 'time'")
    t = _time(obj["time"])
    if "event" in obj:
        if obj["event"] not in SECURITY_EVENTS:
            raise ValueError(f"unknown event {obj['event']!r} (known: {', '.join(SECURITY_EVENTS)})")
        return (obj["node"], obj["zone"], t, obj["event"])
    q = obj.get("quantity")
    if q not in QUANTITIES and q not in ACTUATORS:
        raise ValueError(f"'quantity' must be one of {', '.join([*QUANTITIES, *ACTUATORS])}, not {q!r}")
    value = _num(obj, "value", required=True)
    acc = _num(obj, "accuracy", required=False)
    if acc is not None and acc < 0:
        raise ValueError("'accuracy' must be >= 0")
    sp = _num(obj, "setpoint", required=False)
    node_time = _num(obj, "node_time", required=False)
    held = obj.get("quarantined")
    if held is not None and not isinstance(held, bool):
        raise ValueError(f"'quarantined' must be true or false, not {held!r}")
    return Reading(obj["node"], obj["zone"], t, q, value, acc, sp, node_time, held)  # type: ignore[arg-type]


def read_lines(lines: Iterable[str], *, skip_bad: bool, source: str) -> tuple[list[Any], int, str]:
    items: list[Any] = []
    bad = 0
    first = ""
    for no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            items.append(parse_line(text))
        except ValueError as exc:
            msg = f"{source} line {no}: {exc}"
            if not skip_bad:
                raise CanopyError(msg + " (use --skip-bad to skip bad lines)") from None
            bad += 1
            first = first or msg
    return items, bad, first


class NodeClock:
    """A node's own time in seconds from its frames' tick counts, continued across
    reboots (the tick restarts at 0): the time a reboot took is bridged on the receive
    clock, scaled by the node's ticks per receive second measured before it."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float, float]] = {}  # node -> (boot, rx, node time)
        self._base: dict[str, float] = {}
        self._first: dict[str, tuple[float, float]] = {}  # node -> (rx, node time) at its boot's start

    def at(self, node: str, boot: int, tick: int | None, rx: float) -> float | None:
        if tick is None:
            return None
        last = self._last.get(node)
        if last is None:
            self._base[node] = 0.0
            self._first[node] = (rx, tick * NODE_TICK_S)
        elif last[0] != boot or tick * NODE_TICK_S + self._base[node] < last[2]:
            rx0, nt0 = self._first[node]
            rate = (last[2] - nt0) / (last[1] - rx0) if last[1] > rx0 and last[2] > nt0 else 1.0
            self._base[node] = last[2] + max(0.0, rx - last[1]) * rate - tick * NODE_TICK_S
            self._first[node] = (rx, tick * NODE_TICK_S + self._base[node])
        nt = tick * NODE_TICK_S + self._base[node]
        self._last[node] = (boot, rx, nt)
        return nt


def read_store(path: str, since: float | None, until: float | None) -> list[Any]:
    """Readings (converted to JSON units, with the node's own clock and quarantine state)
    and the monitor's authentication rejects. Readings taken in the node's own failsafe
    (it repeats its last values, zeros before its first reading) or without a sensor are
    not measurements and are left out: the node is `offline` for the consensus then."""
    from .store import iter_frames, open_db

    con = open_db(path, create=False)
    try:
        zones = {n: z for n, z in con.execute("SELECT node, zone FROM nodes")}
        out: list[Any] = []
        clock = NodeClock()
        for row in iter_frames(con, since=since, until=until):
            node = row["node"]
            held = row["failsafe"] if isinstance(row["failsafe"], int) else 0
            nt = clock.at(node, row["boot"], row["tick"], row["rx_time"])
            if held & HELD_FAILSAFE or (row["faults"] or 0) & SENSOR_MISSING:
                continue
            zone = zones.get(node) or UNASSIGNED
            for q, scale in STORE_SCALE.items():
                v = row[q]
                if v is not None:
                    out.append(Reading(node, zone, row["rx_time"], q, v / scale, None, None, nt,
                                       bool(held & HELD_QUARANTINE)))
        # `security` link events (monitor --master-key): detail = "<verdict> <raw line>".
        sql = "SELECT rx_time, node, detail FROM link_events WHERE kind = 'security' AND node IS NOT NULL"
        args: list[Any] = []
        if since is not None:
            sql += " AND rx_time >= ?"
            args.append(since)
        if until is not None:
            sql += " AND rx_time <= ?"
            args.append(until)
        for rx_time, node, detail in con.execute(sql, args):
            verdict = (detail or "").split(" ", 1)[0]
            if verdict in SECURITY_EVENTS:
                out.append((node, zones.get(node) or UNASSIGNED, rx_time, verdict))
        return out
    finally:
        con.close()


def quarantine_timeline(items: Iterable[Any], window: float) -> dict[float, dict[str, bool]]:
    """window start -> node -> held in quarantine, for the nodes whose readings say so
    (Reading.quarantined) and only those: a node's state in a window is the one its
    LAST reading there reports, so a node quarantined at time t is out of the vote from
    t's window on and votes in the windows before; a window without a word from the node
    keeps its previous state."""
    last: dict[float, dict[str, tuple[float, bool]]] = defaultdict(dict)
    ever: set[str] = set()
    for it in items:
        if isinstance(it, Reading) and it.quarantined is not None:
            ws = window_of(it.time, window)
            seen = last[ws].get(it.node)
            if seen is None or it.time >= seen[0]:
                last[ws][it.node] = (it.time, it.quarantined)
            if it.quarantined:
                ever.add(it.node)
    out: dict[float, dict[str, bool]] = {}
    state: dict[str, bool] = {}
    for ws in sorted(last):
        for node, (_t, held) in last[ws].items():
            if node in ever:
                state[node] = held
        out[ws] = dict(state)
    return out


# -- options ------------------------------------------------------------------------------


def parse_allowances(items: list[str]) -> dict[str, float]:
    out = {q: float(v["allowance"]) for q, v in QUANTITIES.items()}
    for item in items:
        q, sep, x = item.partition("=")
        q = q.strip()
        if not sep or q not in QUANTITIES:
            raise CanopyError(f"--allowance {item!r}: expected Q=X with Q one of {', '.join(QUANTITIES)}, e.g. t=0.5")
        try:
            val = float(x)
        except ValueError:
            raise CanopyError(f"--allowance {item!r}: {x.strip()!r} is not a number") from None
        if not math.isfinite(val) or val < 0:
            raise CanopyError(f"--allowance {item!r}: must be a number >= 0")
        out[q] = val
    return out


def load_offsets(path: str | None) -> dict[str, dict[str, float]]:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise CanopyError(f"--offsets {path!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CanopyError(f"--offsets {path!r}: not JSON ({exc.msg}, line {exc.lineno})") from None
    ok = isinstance(data, dict) and all(
        isinstance(m, dict) and all(q in QUANTITIES and isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for q, v in m.items()) for m in data.values())
    if not ok:
        raise CanopyError(f'--offsets {path!r}: expected {{"node": {{"t": 0.4, "h": -1.5}}}} with numbers')
    return {n: {q: float(v) for q, v in m.items()} for n, m in data.items()}


# -- the run ------------------------------------------------------------------------------


def verdicts(items: list[Any], *, window: float, allowance: dict[str, float], max_faulty: int | None,
             offsets: dict[str, dict[str, float]], quarantined: list[str],
             zones: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """JSON verdicts in window order, then zone, then quantity (p, t, h, shade, mist, fan)."""
    grouped: dict[tuple[float, str], dict[str, dict[str, list[Reading]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    events: dict[tuple[float, str], dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for it in items:
        if isinstance(it, Reading):
            if zones and it.zone not in zones:
                continue
            grouped[(window_of(it.time, window), it.zone)][it.quantity][it.node].append(it)
        else:
            node, zone, t, kind = it
            if zones and zone not in zones:
                continue
            ev = events[(window_of(t, window), zone)][node]
            ev[kind] = ev.get(kind, 0) + 1
            grouped[(window_of(t, window), zone)]  # noqa: B018 (a window with events only still reports)
    tracker = FaultTracker(allowance=allowance, quarantined=quarantined, offsets=offsets)
    # Per window, the nodes the store says were quarantined then (not the latest state:
    # a node quarantined at the end of a run voted, rightly, in the windows before).
    timeline = quarantine_timeline(items, window)
    told = set(quarantined)  # --quarantined: the user's word holds until the tracker releases
    held_now: dict[str, bool] = {}
    for key in sorted(grouped):
        ws, zone = key
        for node, held in timeline.get(ws, held_now).items():
            if node in told:
                continue
            if held:
                tracker.quarantined.add(node)
            elif held_now.get(node):
                tracker.release_held(node)
        held_now = timeline.get(ws, held_now)
        by_q = grouped[key]
        sec = events.get(key, {})
        humidity: dict[str, float] = {}
        for q in (*SENSORS, *ACTUATORS):
            if q not in by_q:
                continue
            if q in QUANTITIES:
                acc = QUANTITIES[q]["accuracy"]
                wins = {n: reduce_window(rs, acc) for n, rs in by_q[q].items()}
                v = zone_verdict(zone, q, ws, wins, allowance=allowance[q],
                                 offsets=tracker.offsets_for(zone, q, wins), max_faulty=max_faulty,
                                 exclude=tracker.quarantined)
                findings = tracker.observe(v, wins, security=sec)
                v.faults = {f.node: f.to_json() for f in findings}
                if q == "h":
                    humidity = {n: w.value for n, w in wins.items()}
                yield v.to_json()
            else:
                wins = {n: reduce_window(rs, 0.0) for n, rs in by_q[q].items()}
                findings = tracker.observe_actuator(zone, q, ws, wins, humidity)
                yield {"zone": zone, "window_start": ws, "quantity": q, "value": None, "low": None, "high": None,
                       "tight": False, "status": "OK", "truechimers": [], "falsetickers": [],
                       "faults": {f.node: f.to_json() for f in findings}, "n": len(wins), "actionable": True}


def _open_input(path: str) -> TextIO:
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise CanopyError(f"cannot read {path!r}: {exc.strerror}") from None


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.window) and args.window > 0):
        raise CanopyError(f"--window must be a positive number of seconds, not {args.window:g}")
    if args.max_faulty is not None and args.max_faulty < 0:
        raise CanopyError("--max-faulty must be >= 0")
    allowance = parse_allowances(args.allowance)
    offsets = load_offsets(args.offsets)
    if args.db:
        if args.input != "-":
            raise CanopyError("give either an input FILE or --db, not both")
        from .export_cmd import time_range

        since, until = time_range(args)
        items: list[Any] = read_store(args.db, since, until)
        windows: dict[str, int] = defaultdict(int)
        timeline = quarantine_timeline(items, args.window)
        for state in timeline.values():
            for node, was_held in state.items():
                windows[node] += was_held and node not in args.quarantined
        held = ", ".join(f"{n} ({k} of {len(timeline)} windows)" for n, k in sorted(windows.items()) if k)
        if held:
            print(f"canopy consensus: quarantined per the store (out of the vote): {held}", file=sys.stderr)
        quarantined = list(args.quarantined)
        bad, first = 0, ""
    else:
        if args.since or args.until:
            raise CanopyError("--since/--until work with --db; filter JSON input before piping it in")
        fh = _open_input(args.input)
        try:
            items, bad, first = read_lines(fh, skip_bad=args.skip_bad,
                                           source="stdin" if args.input == "-" else args.input)
        except UnicodeDecodeError:
            raise CanopyError(f"{args.input!r} is not UTF-8 text (expected JSON lines)") from None
        finally:
            if fh is not sys.stdin:
                fh.close()
        quarantined = list(args.quarantined)
    n = 0
    try:
        for verdict in verdicts(items, window=args.window, allowance=allowance, max_faulty=args.max_faulty,
                                offsets=offsets, quarantined=quarantined,
                                zones=set(args.zone) if args.zone else None):
            sys.stdout.write(json.dumps(verdict, ensure_ascii=False, separators=(", ", ": ")) + "\n")
            n += 1
        sys.stdout.flush()
    except BrokenPipeError:  # `canopy consensus ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if bad:
        print(f"canopy consensus: skipped {bad} bad line(s); first: {first}", file=sys.stderr)
    if n == 0:
        print("canopy consensus: no readings (nothing to judge)", file=sys.stderr)
    return 0
