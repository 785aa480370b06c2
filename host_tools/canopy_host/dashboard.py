"""The live terminal view of `canopy monitor`: one row per node, redrawn a few times a second.

Rendering reads `Collector.snapshot()` only, so a slow terminal never slows ingest.

    with Dashboard(collector) as dash:
        while running:
            dash.refresh(); time.sleep(0.25)
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .monitor import Collector, NodeState, PortState


def _fmt_scaled(value: Any, scale: float, digits: int) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value / scale:.{digits}f}"


def _pct(value: Any) -> str:
    # Actuator commands are 0..10000 (0.01 %); whole percent is enough on screen.
    return "-" if not isinstance(value, int) else f"{value / 100:.0f}"


HELD_FAILSAFE = 1  # the reading's `failsafe` bits (firmware Node.held(), docs/protocol.md)
HELD_QUARANTINE = 2


def held_bits(reading: dict[str, Any]) -> int:
    """The reading's `failsafe` bitmask (0 when absent or not an int)."""
    v = reading.get("failsafe") if reading else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def is_quarantined(reading: dict[str, Any]) -> bool:
    return bool(held_bits(reading) & HELD_QUARANTINE)


def _health(reading: dict[str, Any], compact: bool = False) -> Text:
    if not reading:
        return Text("-", style="dim")
    faults = reading.get("faults")
    held = held_bits(reading)
    # An unknown bit from a newer firmware still means held actuators: FAILSAFE.
    own = held & ~HELD_QUARANTINE
    if own:
        text = f"FAILSAFE {faults:#x}" if isinstance(faults, int) else "FAILSAFE"
        if held & HELD_QUARANTINE:
            text += " quar" if compact else " quarantined"
        return Text(text, style="bold red")
    if held & HELD_QUARANTINE:
        # Actuators held by the repair agent; a sensor fault it still reports is shown too.
        extra = f" fault {faults:#x}" if isinstance(faults, int) and faults else ""
        return Text("quarantined" + extra, style="bold magenta")
    if isinstance(faults, int) and faults:
        return Text(f"fault {faults:#x}", style="yellow")
    return Text("ok", style="green")


def _link(n: NodeState) -> Text:
    if n.connected:
        return Text(n.port or "?", style="green")
    return Text(f"DOWN {n.port or ''}".strip(), style="bold red")


WIDE = 170  # below this many columns, the compact layout (merged link counters)


def render(nodes: list[NodeState], ports: list[PortState], messages: list[str], now: float, title: str,
           width: int = WIDE) -> Group:
    compact = width < WIDE
    # Frames refused by the monitor's tag check (--master-key): always a column when
    # wide, and in the compact layout as soon as there is one (it must not go unseen).
    sec = not compact or any(n.sec_rejects for n in nodes)
    table = Table(title=title, expand=False, header_style="bold", pad_edge=False)
    cols: list[tuple[str, str]] = [("node", "left")]
    if not compact:
        cols += [("zone", "left")]
    cols += [("link", "left")]
    if not compact:
        cols += [("boot", "right")]
    cols += [("T °C", "right"), ("hPa", "right"), ("RH %", "right"),
             ("sh/mi/fan %" if compact else "shade/mist/fan %", "right"),
             ("health", "left"), ("f/s", "right"), ("frames", "right")]
    if compact:
        cols += [("gap/dup/rb/crc", "right")]
    else:
        cols += [("gaps (missing)", "right"), ("dup", "right"), ("reboots", "right"), ("crc", "right"),
                 ("garbage B", "right")]
    if sec:
        cols += [("auth rej", "right")]
    cols += [("last event", "left")]
    for name, justify in cols:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for n in nodes:
        r = n.last_reading
        row: list[Any] = [n.node]
        if not compact:
            row.append(n.zone or "")
        link = _link(n)
        if compact and n.port:  # /dev/pts/7 -> pts/7: the node id already says who it is
            link = Text(link.plain.replace("/dev/", "")[-12:], style=link.style)
        row.append(link)
        if not compact:
            row.append("-" if n.boot is None else str(n.boot))
        row += [
            _fmt_scaled(r.get("t"), 100, 2),
            _fmt_scaled(r.get("p"), 100, 1),
            _fmt_scaled(r.get("h"), 1024, 1),
            f"{_pct(r.get('shade'))}/{_pct(r.get('mist'))}/{_pct(r.get('fan'))}" if r else "-",
            _health(r, compact),
            f"{n.rate(now):.1f}",
            str(n.frames),
        ]
        trouble = n.gaps or n.reboots or n.crc_errors or n.duplicates
        if compact:
            row.append(Text(f"{n.gaps}({n.missing})/{n.duplicates}/{n.reboots}/{n.crc_errors}",
                            style="yellow" if trouble else ""))
        else:
            row += [
                Text(f"{n.gaps} ({n.missing})", style="yellow" if n.gaps else ""),
                str(n.duplicates),
                Text(str(n.reboots), style="yellow" if n.reboots else ""),
                Text(str(n.crc_errors), style="yellow" if n.crc_errors else ""),
                str(n.garbage_bytes),
            ]
        if sec:
            what = ",".join(f"{k} {v}" for k, v in sorted(n.security.items()))
            row.append(Text(f"{n.sec_rejects} {what}".strip() if not compact else str(n.sec_rejects),
                            style="bold red" if n.sec_rejects else ""))
        row.append(n.last_event[:16] if compact else n.last_event[:40])
        table.add_row(*row)
    known = {n.node for n in nodes}
    for p in ports:  # ports that have not shown a node yet: their status as last event
        if p.node is None and p.spec.node_hint not in known:
            label = p.spec.label.replace("/dev/", "") if compact else p.spec.label
            status = Text(p.status[:16] if compact else p.status[:60], style="dim")
            table.add_row(label, *[""] * (len(cols) - 2), status)
    parts: list[Any] = [table]
    for m in messages[-5:]:
        parts.append(Text(m, style="yellow"))
    return Group(*parts)


class Dashboard:
    def __init__(self, collector: Collector, *, console: Console | None = None, title: str = "canopy monitor") -> None:
        self.collector = collector
        self.title = title
        self.console = console or Console()
        if not self.console.is_terminal:
            # Piped or redirected: nobody resizes this, print the full-width table.
            self.console.width = max(self.console.width, WIDE)
        self._live = Live(console=self.console, auto_refresh=False, transient=False)

    def _renderable(self) -> Group:
        nodes, ports = self.collector.snapshot()
        now = self.collector.clock()
        elapsed = now - self.collector.started
        title = f"{self.title} — {len(nodes)} node(s), {self.collector.total_frames} frames, {elapsed:.0f} s"
        return render(nodes, ports, list(self.collector.messages), now, title, self.console.width)

    def refresh(self) -> None:
        self._live.update(self._renderable(), refresh=True)

    def __enter__(self) -> Dashboard:
        self._live.start()
        self.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.refresh()
        finally:
            self._live.stop()


def run_dashboard_loop(dash: Dashboard, should_stop: Any, period: float = 0.25) -> None:
    while not should_stop():
        dash.refresh()
        time.sleep(period)
