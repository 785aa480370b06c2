"""`canopy export`: readings from a monitor database as CSV (stdout or -o FILE)."""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from .errors import CanopyError
from .store import READING_COLUMNS, check_db_file, decode_fields, iter_frames, known_nodes, open_db

DEFAULT_QUANTITIES = ("t", "p", "h", "shade", "mist", "fan", "faults", "failsafe")
_RELATIVE = re.compile(r"^-?\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)$", re.IGNORECASE)
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}

EPILOG = """\
units are the protocol's integers: t in 0.01 °C, p in Pa, h in 1/1024 %RH,
shade/mist/fan in 0.01 % (0..10000); t_raw/p_raw/h_raw are BME280 ADC counts.

Columns: time (UTC, ISO), rx_time (Unix seconds the host received the frame), node,
boot (the node's boot counter), seq (frame number within the boot), then the quantities.

examples:
  canopy export --db var/demo/demo-20261125-233118.db | head     # a demo run
  canopy export --db canopy-monitor.db > all.csv
  canopy export --db canopy-monitor.db --node n01 --since 2h --quantity t,h -o n01.csv
  canopy export --db canopy-monitor.db --since 2026-11-25T20:00 --until 2026-11-25T21:00Z
"""


def parse_time(text: str, *, now: float | None = None, option: str = "--since") -> float:
    """ISO 8601 (naive = local time) or relative ('90s', '10m', '2h', '1d' ago) -> Unix seconds."""
    s = text.strip()
    if now is None:
        now = datetime.now(timezone.utc).timestamp()
    if s.lower() == "now":
        return now
    m = _RELATIVE.match(s)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2).lower()]
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise CanopyError(
            f"{option} {text!r}: expected an ISO time (2026-11-25T21:30, 2026-11-25T21:30Z) "
            "or a relative one (30s, 10m, 2h, 1d = that long ago)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # naive: the user's local time, like `date`
    return dt.timestamp()


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_quantities(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_QUANTITIES)
    names = [q.strip() for q in text.split(",") if q.strip()]
    if not names:
        raise CanopyError("--quantity needs at least one name, e.g. --quantity t,h")
    for q in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", q):
            raise CanopyError(f"--quantity: {q!r} is not a field name (known: {', '.join(READING_COLUMNS)})")
    return names


def open_reader(path: str) -> sqlite3.Connection:
    """A store connection for the read-only verbs (export, plot, audit)."""
    check_db_file(path)
    return open_db(path, create=False)


def add_time_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="TIME",
                   help="from this time: ISO (2026-11-25T21:30 local time, ...Z for UTC) or an age (10m, 2h, 1d)")
    p.add_argument("--until", metavar="TIME", help="up to this time (same formats)")


def time_range(args: argparse.Namespace) -> tuple[float | None, float | None]:
    since = parse_time(args.since, option="--since") if args.since else None
    until = parse_time(args.until, option="--until") if args.until else None
    if since is not None and until is not None and until < since:
        raise CanopyError("--until is before --since")
    return since, until


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "export",
        help="export stored readings as CSV",
        description="Export readings recorded by `canopy monitor` as CSV, one row per reading frame.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, metavar="FILE",
                   help="database written by `canopy monitor` (or `canopy demo`, which prints its file)")
    p.add_argument("--node", action="append", metavar="N", help="only this node (repeat for several; default all)")
    add_time_filters(p)
    p.add_argument(
        "--quantity", metavar="Q,...", help=f"columns to export (default {','.join(DEFAULT_QUANTITIES)})"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout (overwritten)")
    p.set_defaults(func=run)


def check_nodes(con: Any, nodes: list[str] | None) -> None:
    if not nodes:
        return
    have = set(known_nodes(con))
    missing = [n for n in nodes if n not in have]
    if missing:
        listed = ", ".join(sorted(have)) or "none"
        raise CanopyError(f"node {', '.join(missing)} not in the database (nodes: {listed})")


def write_csv(con: Any, out: TextIO, *, nodes: list[str] | None, since: float | None, until: float | None,
              quantities: list[str]) -> int:
    columns = set(READING_COLUMNS)
    rows = iter_frames(con, nodes=nodes, since=since, until=until)
    first = next(rows, None)
    if first is not None:
        # Check names against a real reading BEFORE writing anything: a typo must not
        # leave a half-written CSV behind.
        present = set(decode_fields(first))
        unknown = [q for q in quantities if q not in columns and q not in present]
        if unknown:
            known = sorted(columns | present)
            raise CanopyError(f"--quantity: readings have no {', '.join(unknown)} (known: {', '.join(known)})")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["time", "rx_time", "node", "boot", "seq", *quantities])
    if first is None:
        return 0
    n = 0
    for row in itertools.chain((first,), rows):
        fields: dict[str, Any] | None = None
        values: list[Any] = []
        for q in quantities:
            if q in columns and row[q] is not None:
                v: Any = row[q]
            else:
                if fields is None:
                    fields = decode_fields(row)
                v = fields.get(q)
            values.append("" if v is None else v)
        writer.writerow([iso_utc(row["rx_time"]), f"{row['rx_time']:.6f}", row["node"], row["boot"], row["seq"], *values])
        n += 1
    return n


def run(args: argparse.Namespace) -> int:
    quantities = parse_quantities(args.quantity)
    since, until = time_range(args)
    con = open_reader(args.db)
    try:
        check_nodes(con, args.node)
        if args.output:
            try:
                out = open(args.output, "w", newline="", encoding="utf-8")
            except OSError as exc:
                raise CanopyError(f"cannot write {args.output!r}: {exc.strerror}") from None
            with out:
                n = write_csv(con, out, nodes=args.node, since=since, until=until, quantities=quantities)
            print(f"canopy export: {n} rows -> {args.output}", file=sys.stderr)
        else:
            try:
                n = write_csv(con, sys.stdout, nodes=args.node, since=since, until=until, quantities=quantities)
                sys.stdout.flush()
            except BrokenPipeError:  # `canopy export ... | head`: the reader has seen enough
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
        if n == 0:
            print("canopy export: no readings match (check --node/--since/--until)", file=sys.stderr)
    finally:
        con.close()
    return 0
