"""`canopy demo`: watch a canopy node keep its microclimate on target, with no hardware.

Runs the real node firmware (`firmware/main.py`) in the MicroPython unix port as a
virtual node: a simulated BME280 on a simulated I2C bus, simulated shade servo, mist
valve and fan, and a small physical model of the air under the umbrella, all on a
simulated clock that runs much faster than real time. Prints the node's readings as
they arrive, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CanopyError
from .paths import FIRMWARE_DIR
from .unixport import micropython_env
from .paths import micropython_command

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

EXAMPLES = """\
examples:
  canopy demo                          30 simulated minutes of a mild afternoon, ~8 s
  canopy demo --weather hot            too hot for shade alone: watch the mist kick in
  canopy demo --fault disconnect       unplug the sensor mid-run: failsafe, then recovery
  canopy demo --fault stuck --minutes 60
  canopy demo --speed 1 --minutes 2    real time, like a node on your desk

columns: time is simulated (mm:ss since boot); T/H show the conditioned value and
(in brackets) the raw sensor reading; shade/mist/fan are actuator commands in %.
faults: 1 = sensor missing, 2 = stuck, 4 = out of range. FS = failsafe (shade to its
safe position, mist off) until the sensor is healthy again.
"""

_READING = re.compile(
    r"^R t=(?P<t>\d+)s T=(?P<T>-?[\d.]+)C \(raw (?P<Traw>-?[\d.]+)\) P=(?P<P>-?\d+)Pa "
    r"\(raw (?P<Praw>-?\d+)\) H=(?P<H>-?[\d.]+)% \(raw (?P<Hraw>-?[\d.]+)\) "
    r"shade=(?P<shade>[\d.]+)% mist=(?P<mist>[\d.]+)% fan=(?P<fan>[\d.]+)% "
    r"faults=(?P<faults>\d+) failsafe=(?P<failsafe>\d)"
)
_EVENT = re.compile(r"^E t=(?P<t>\d+)s event=(?P<code>\w+) arg=(?P<arg>-?\d+)")
_SETPOINT = re.compile(r"T=(?P<t>-?[\d.]+)C")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v > 24 * 60:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 1440 (one day)")
    return v


def _speed(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = as fast as possible)")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2**31:
        raise argparse.ArgumentTypeError("must be 0 .. 2147483647")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a virtual canopy node and show its readings (no hardware)",
        description=__doc__.split("\n\n")[1],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=_positive_float, default=30.0,
                   help="simulated minutes to run (default 30)")
    p.add_argument("--speed", type=_speed, default=None, metavar="X|auto",
                   help="simulated seconds per wall second; 0 = as fast as possible; "
                        f"auto (default) finishes in about {TARGET_WALL_S:.0f} s")
    p.add_argument("--seed", type=_seed, default=1,
                   help="seed of this node's site and the zone's weather (default 1)")
    p.add_argument("--weather", choices=WEATHER, default="mild",
                   help="weather of the zone (default mild)")
    p.add_argument("--fault", choices=sorted(FAULTS),
                   help="inject a sensor fault a third of the way in, lasting a quarter of the run")
    p.add_argument("--every", type=int, default=0, metavar="N",
                   help=f"show every N-th reading (default: about {ROWS} rows)")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
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
