"""`canopy audit`: the repair audit log (every planned, retried, skipped and finished step)."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from .errors import CanopyError

EPILOG = """\
examples:
  canopy audit                                  # everything in canopy-monitor.db
  canopy audit --node n03 --since 2h            # one node, last two hours
  canopy audit --since 2026-11-25T22:00 --json | jq .
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("audit", help="show the repair audit log (filter by node/time, JSON)",
                              description="Show what `canopy repair` did and why.", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="canopy-monitor.db", metavar="FILE", help="store file (default canopy-monitor.db)")
    p.add_argument("--node", help="only this node")
    p.add_argument("--since", metavar="TIME", help="ISO time (UTC), Unix seconds, or an age like 30m, 2h, 1d")
    p.add_argument("--until", metavar="TIME", help="same forms as --since")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def parse_time(text: str, now: float | None = None) -> float:
    now = time.time() if now is None else now
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if t and t[-1] in units:
        try:
            return now - float(t[:-1]) * units[t[-1]]
        except ValueError:
            pass
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise CanopyError(f"cannot read time {text!r}: use ISO (2026-11-25T22:00), Unix seconds or 30m/2h/1d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def run(args: argparse.Namespace) -> int:
    from .repair import audit_entries
    from .store import open_db

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    con = open_db(args.db, create=False)
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
