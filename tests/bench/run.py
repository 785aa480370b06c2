"""Run the benchmarks: `bash host_tools/dev.sh bench [--only kernels,flash,...] [--quick]`.

Each benchmark is its own script tests/bench/bench_<name>.py and runs in its own
process, so one failing (or not written yet) does not stop the others. Every such
script is found automatically: the kernel bench first, then the rest by name.
Benchmarks measure and print; they never fail on a missed target. Exit status is
non-zero only if a script crashed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent



def _discover() -> dict[str, str]:
    """name -> script for every tests/bench/bench_<name>.py, kernels first."""
    names = sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))
    names.sort(key=lambda n: n != "kernels")
    return {n: f"bench_{n}.py" for n in names}


BENCHES = _discover()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the Canopy benchmarks.")
    ap.add_argument("--only", default="",
                    help=f"comma-separated subset of: {', '.join(BENCHES)}")
    ap.add_argument("--quick", action="store_true",
                    help="shorter kernel measurements (10 ms, best of 3, one round) for a smoke run")
    args, extra = ap.parse_known_args(argv)
    wanted = [s for s in args.only.split(",") if s] or list(BENCHES)
    unknown = [s for s in wanted if s not in BENCHES]
    if unknown:
        print(f"bench: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}",
              file=sys.stderr)
        return 2
    failed = []
    for name in wanted:
        script = BENCH_DIR / BENCHES[name]
        cmd = [sys.executable, str(script)]
        if name == "kernels":
            if args.quick:
                cmd += ["--min-ms", "10", "--repeats", "3", "--rounds", "1"]
            cmd += extra
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        print(f"== {name}: exit {rc}, {time.monotonic() - t0:.1f} s ==\n", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"bench: {', '.join(failed)} did not complete", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
