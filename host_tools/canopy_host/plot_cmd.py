"""`canopy plot`: one quantity over time for a node or a whole zone, as a PNG."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any

from .errors import CanopyError
from .export_cmd import add_time_filters, check_nodes, open_reader, parse_quantities, time_range
from .store import READING_COLUMNS, decode_fields, iter_frames, nodes_in_zone

# Protocol integers -> display units.
SCALES: dict[str, tuple[float, str]] = {
    "t": (100.0, "temperature (°C)"),
    "p": (100.0, "pressure (hPa)"),
    "h": (1024.0, "relative humidity (%)"),
    "shade": (100.0, "shade (%)"),
    "mist": (100.0, "mist (%)"),
    "fan": (100.0, "fan (%)"),
}

EPILOG = """\
examples:
  canopy plot --db var/demo/demo-20261125-233118.db --zone A -o zone-a.png   # a demo run
  canopy plot --db canopy-monitor.db --node n01 -o n01-temp.png
  canopy plot --db canopy-monitor.db --zone A --quantity h --since 1h -o zone-a-rh.png
  canopy plot --db canopy-monitor.db --node n01 --quantity t,shade -o n01.png
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "plot",
        help="plot stored readings to a PNG",
        description="Plot readings recorded by `canopy monitor` (one line per node, one panel per quantity).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, metavar="FILE",
                   help="database written by `canopy monitor` (or `canopy demo`, which prints its file)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--node", action="append", metavar="N", help="this node (repeat for several)")
    who.add_argument("--zone", metavar="Z", help="every node of this zone (as the database recorded it from the nodes)")
    p.add_argument("--quantity", default="t", metavar="Q,...", help="what to plot, one panel each (default t; any of t,p,h,shade,mist,fan or another "
                        "reading field, e.g. t_raw)")
    add_time_filters(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="PNG file to write (overwritten); times on the x axis are UTC")
    p.set_defaults(func=run)


def collect(con: Any, nodes: list[str], quantities: list[str], since: float | None, until: float | None
            ) -> dict[str, dict[str, tuple[list[datetime], list[float]]]]:
    """quantity -> node -> (times, values), values already in display units."""
    series: dict[str, dict[str, tuple[list[datetime], list[float]]]] = {q: {} for q in quantities}
    columns = set(READING_COLUMNS)
    for row in iter_frames(con, nodes=nodes, since=since, until=until):
        fields = None
        when = datetime.fromtimestamp(row["rx_time"], timezone.utc)
        for q in quantities:
            if q in columns and row[q] is not None:
                v = row[q]
            else:
                fields = fields if fields is not None else decode_fields(row)
                v = fields.get(q)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = series[q].setdefault(row["node"], ([], []))
            xs.append(when)
            ys.append(v / SCALES.get(q, (1.0, ""))[0])
    return series


def run(args: argparse.Namespace) -> int:
    quantities = parse_quantities(args.quantity)
    since, until = time_range(args)
    if not args.output.lower().endswith(".png"):
        raise CanopyError(f"-o {args.output!r}: the output is a PNG; name it *.png")
    con = open_reader(args.db)
    try:
        if args.zone is not None:
            nodes = nodes_in_zone(con, args.zone)
            if not nodes:
                zones = [r[0] for r in con.execute("SELECT DISTINCT zone FROM nodes WHERE zone IS NOT NULL ORDER BY zone")]
                raise CanopyError(f"no node in zone {args.zone!r} (zones: {', '.join(zones) or 'none recorded'})")
            label = f"zone {args.zone}"
        else:
            nodes = list(args.node)
            check_nodes(con, nodes)
            label = ", ".join(nodes)
        series = collect(con, nodes, quantities, since, until)
    finally:
        con.close()
    empty = [q for q in quantities if not series[q]]
    unknown = [q for q in empty if q not in READING_COLUMNS]
    if unknown and len(empty) == len(quantities):
        raise CanopyError(f"--quantity: readings have no {', '.join(unknown)} (known: {', '.join(READING_COLUMNS)})")
    if len(empty) == len(quantities):
        raise CanopyError(f"nothing to plot: no readings with {', '.join(quantities)} for {label} in that time range")

    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(quantities), 1, sharex=True, figsize=(10, 2.8 * len(quantities) + 0.6), squeeze=False)
    for ax, q in zip(axes[:, 0], quantities):
        for node, (xs, ys) in sorted(series[q].items()):
            ax.plot(xs, ys, label=node, linewidth=1.0)
        ax.set_ylabel(SCALES.get(q, (1.0, q))[1])
        ax.grid(True, alpha=0.3)
        if series[q]:
            ax.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("time (UTC)")
    axes[-1, 0].xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    fig.suptitle(f"canopy: {', '.join(quantities)} — {label}")
    fig.autofmt_xdate()
    try:
        fig.savefig(args.output, format="png", dpi=100)
    except OSError as exc:
        raise CanopyError(f"cannot write {args.output!r}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    points = sum(len(xs) for q in quantities for xs, _ in series[q].values())
    print(f"canopy plot: {points} points, {len(nodes)} node(s) -> {args.output}", file=sys.stderr)
    return 0
