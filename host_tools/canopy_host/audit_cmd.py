"""`canopy audit`: the repair audit log (every planned, retried, skipped and finished step)."""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone

from .errors import CanopyError

EPILOG = """\
examples:
  canopy audit                                  # everything in canopy-monitor.db
  canopy audit --node n03 --since 2h            # one node, last two hours
  canopy audit --db var/demo/demo-20261125-233118.db   # what the demo's repair loop did
  canopy audit --since 2026-11-25T22:00 --json | jq .

One line per journal entry, oldest first: time (UTC), node, job number ("plan" for a
decision of the repair loop), action (push_config, recalibrate, quarantine, release, ...),
event (planned, retry, skipped, state -> PENDING/ACTIVATED/VERIFIED/FAILED/ROLLED_BACK)
and its details as JSON. The journal is written by `canopy repair`, `canopy monitor
--repair` and `canopy demo` into their --db file (docs/repair.md).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("audit", help="show the repair audit log (filter by node/time, JSON)",
                              description="Show what `canopy repair` (and the repair loop of `canopy monitor "
                                          "--repair` and `canopy demo`) did to which node, and why.", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="canopy-monitor.db", metavar="FILE", help="store file (default canopy-monitor.db)")
    p.add_argument("--node", help="only this node (default: every node)")
    p.add_argument("--since", metavar="TIME",
                   help="from this time: ISO (2026-11-25T22:00 local, ...Z for UTC), Unix seconds, "
                        "or an age like 30m, 2h, 1d")
    p.add_argument("--until", metavar="TIME", help="same forms as --since")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def parse_time(text: str, now: float | None = None, option: str = "--since") -> float:
    """Unix seconds, else the forms `canopy export` takes (ISO, naive = local time; 30m, 2h, 1d ago)."""
    from .export_cmd import parse_time as parse_export_time

    try:
        value = float(text.strip())
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise CanopyError(f"cannot read time {text!r} for {option}: not a finite number")
        return value
    try:
        return parse_export_time(text, now=now, option=option)
    except CanopyError:
        raise CanopyError(f"cannot read time {text!r} for {option}: use ISO (2026-11-25T22:00, local time; "
                          "...Z for UTC), Unix seconds, or an age like 30m, 2h, 1d") from None


def run(args: argparse.Namespace) -> int:
    from .export_cmd import open_reader
    from .repair import audit_entries

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until, option="--until") if args.until else None
    if since is not None and until is not None and until < since:
        raise CanopyError("--until is before --since")
    con = open_reader(args.db)
    try:
        rows = audit_entries(con, node=args.node, since=since, until=until)
    finally:
        con.close()
    try:
        for e in rows:
            if args.json:
                print(json.dumps(e, sort_keys=True))
            else:
                ts = datetime.fromtimestamp(e["time"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                job = f"job {e['job']}" if e["job"] is not None else "plan"
                state = f" -> {e['state']}" if e["event"] == "state" else ""
                print(f"{ts} {e['node']:<16} {job:<8} {e['action']:<12} {e['event']}{state} "
                      f"{json.dumps(e['detail'], sort_keys=True)}")
        if not rows and not args.json:
            print("no audit entries match")
    except BrokenPipeError:
        pass
    return 0
