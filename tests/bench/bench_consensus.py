"""Zone consensus throughput: 10,000 nodes in 500 zones, per window.

NOT part of the test suite. Run:

    .venv/bin/python tests/bench/bench_consensus.py [--nodes 10000] [--zones 500] [--repeat 7]

Workload: each zone's nodes read the zone's temperature ± Gaussian noise; 10 % of the
zones hold one Byzantine node far off, 10 % a colluding pair just outside the honest
intervals (so clock-select has to try f = 0, 1, 2). Measured in ONE process, best of
--repeat runs (time.perf_counter):

  consensus : for every zone, one interval per node (make_interval) and fuse()
              (Marzullo + RFC 5905 clock-select + median) - what `canopy consensus`
              does per window once the readings are grouped
  sort      : sorted() of the SAME 10,000 readings, once (the O(n log n) lower bound
              any comparison-based fusion of n intervals must pay)
  sort/zone : sorted() per zone (the same bound, paid per zone as consensus does)
  tracker   : FaultTracker.observe for every zone, on a 30-window warm history
              (the fault classification that runs next to consensus)

and prints time per window for each, and consensus/sort.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "host_tools"))

from canopy_host.consensus import NodeWindow, fuse, make_interval  # noqa: E402
from canopy_host.faults import FaultTracker  # noqa: E402


def workload(nodes: int, zones: int, seed: int, window: int = 0) -> list[list[tuple[str, float]]]:
    rng = random.Random(seed * 1000003 + window)
    per = nodes // zones
    out = []
    for z in range(zones):
        truth = 20.0 + 5.0 * rng.random()
        zone = [(f"z{z}n{i}", truth + rng.gauss(0, 0.1)) for i in range(per)]
        kind = z % 10
        if kind == 0:
            zone[0] = (zone[0][0], truth + 40.0)
        elif kind == 1:
            zone[0] = (zone[0][0], truth + 2.1)
            zone[1] = (zone[1][0], truth + 2.1)
        out.append(zone)
    return out


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--zones", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        except OSError:
            pass
    zones = workload(args.nodes, args.zones, args.seed)
    flat = [v for zone in zones for _, v in zone]

    def consensus() -> None:
        for k, zone in enumerate(zones):
            fuse([make_interval(n, v, 1.0, 1.0) for n, v in zone], zone=str(k), quantity="t")

    def sort_all() -> None:
        sorted(flat)

    def sort_zones() -> None:
        for zone in zones:
            sorted(v for _, v in zone)

    # Sanity: the Byzantine nodes are found (a benchmark of a wrong answer is worthless).
    labelled = [fuse([make_interval(n, v, 1.0, 1.0) for n, v in zone]) for zone in zones]
    assert all(v.status == "OK" for v in labelled)
    assert all(v.falsetickers == [zones[k][0][0]] for k, v in enumerate(labelled) if k % 10 == 0)

    t_cons = best(consensus, args.repeat)
    t_sort = best(sort_all, args.repeat)
    t_zsort = best(sort_zones, args.repeat)

    # Tracker on a warm history (30 windows), then time one more window.
    tracker = FaultTracker()
    history = 30
    for w in range(history + 1):
        data = workload(args.nodes, args.zones, args.seed, w)
        verdicts = []
        for k, zone in enumerate(data):
            wins = {n: NodeWindow(v, 1.0, 1, 0.0, w * 60.0, w * 60.0) for n, v in zone}
            v = fuse([make_interval(n, x, 1.0, 1.0) for n, x in zone], zone=str(k), quantity="t",
                     window_start=w * 60)
            verdicts.append((v, wins))
        if w < history:
            for v, wins in verdicts:
                tracker.observe(v, wins)
    t0 = time.perf_counter()
    for v, wins in verdicts:
        tracker.observe(v, wins)
    t_track = time.perf_counter() - t0

    n = len(flat)
    print(f"{n} nodes in {len(zones)} zones ({n // len(zones)} per zone), best of {args.repeat}, one core")
    print(f"  consensus (intervals + fuse, all zones) : {t_cons * 1e3:8.2f} ms/window  "
          f"({t_cons / n * 1e6:.2f} µs/node)")
    print(f"  sort of the same readings (once)        : {t_sort * 1e3:8.2f} ms/window")
    print(f"  sort per zone                           : {t_zsort * 1e3:8.2f} ms/window")
    print(f"  fault tracker (30-window history)       : {t_track * 1e3:8.2f} ms/window")
    print(f"  consensus / sort          = {t_cons / t_sort:6.1f}")
    print(f"  consensus / sort per zone = {t_cons / t_zsort:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
