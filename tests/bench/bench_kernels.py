"""Firmware kernel benchmark: each kernel and one full node tick, in three forms.

  viper     the firmware as shipped, in the MicroPython unix port
  bytecode  the same source with the @micropython.viper decorators and ptr casts stripped
            (generated into a temp dir at run time), in the unix port
  C         a C reference of the same arithmetic (tests/bench/c/), built with gcc -O2

Prints ns per call (raw, the empty-call baseline, and raw minus baseline), the ratios
viper/C and bytecode/viper, bytes allocated per call, and whether each target is met
(viper within 2.5x of C, 0 bytes per tick). It never fails on a missed target: it is a
measurement, not a test. `python tests/bench/bench_kernels.py --help` for options.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
FIRMWARE_DIR = REPO_ROOT / "firmware"
C_DIR = BENCH_DIR / "c"
MPY_DIR = BENCH_DIR / "mpy"
sys.path.insert(0, str(REPO_ROOT / "host_tools"))

from canopy_host.paths import micropython_command  # noqa: E402

KERNELS = ("bme280", "health", "condition", "control", "tick")
VIPER_TARGET = 2.5  # viper ns/call at most this many times the C -O2 ns/call
CFLAGS = ["-O2", "-fwrapv"]


class BenchError(RuntimeError):
    pass


# ---- building the C reference and the bytecode firmware ---------------------------------

def build_c(out_dir: Path) -> Path:
    """Compile tests/bench/c/harness.c with gcc -O2 into out_dir; return the executable."""
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    if gcc is None:
        raise BenchError("gcc not found (set CC=...): the C reference cannot be built")
    exe = out_dir / "harness"
    proc = subprocess.run(
        [gcc, *CFLAGS, "-o", str(exe), str(C_DIR / "harness.c")],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise BenchError(f"building the C reference failed:\n{proc.stderr}")
    return exe


_DECORATOR = re.compile(r"^\s*@micropython\.(viper|native)\s*$")
_PTR_CAST = re.compile(r"\bptr(8|16|32)\(")
_UINT_CAST = re.compile(r"\buint\(")
# `SIGN = 1 << 31`: the mask for "(x ^ sgn) - sgn", which sign-extends viper's
# zero-extended ptr32 loads. array('i') indexing in bytecode is already signed, so
# there the mask must be 0 (the xor and subtract still run: same work, same result).
_SIGN_MASK = re.compile(r"^(\s*)(\w+)\s*=\s*1\s*<<\s*31\b.*$")


def strip_viper(source: str) -> str:
    """The same module as plain bytecode: no viper/native decorators, no pointer casts.

    A ptr32 over array('i') indexes like the array itself, so `p = ptr32(buf)` becomes
    `p = (buf)`. Annotations (`x: int`, `-> int`) are ignored by the bytecode compiler.
    """
    out = []
    for line in source.splitlines(keepends=True):
        if _DECORATOR.match(line):
            continue
        m = _SIGN_MASK.match(line)
        if m:
            out.append(f"{m.group(1)}{m.group(2)} = 0  # bytecode: signed loads need no mask\n")
            continue
        line = _PTR_CAST.sub("(", line)
        line = _UINT_CAST.sub("int(", line)
        out.append(line)
    return "".join(out)


def make_bytecode_tree(out_dir: Path) -> Path:
    """Copy firmware/ into out_dir/firmware with every module passed through strip_viper."""
    dst = out_dir / "firmware"
    for src in FIRMWARE_DIR.rglob("*.py"):
        target = dst / src.relative_to(FIRMWARE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(strip_viper(src.read_text()))
    for src in FIRMWARE_DIR.rglob("*.json"):
        target = dst / src.relative_to(FIRMWARE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)
    return dst


def mpy_env(firmware: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join([str(MPY_DIR), str(firmware), ".frozen"])
    return env


# ---- running ------------------------------------------------------------------------------

def run_mpy(firmware: Path, min_ms: float, repeats: int, names: list[str]) -> dict[str, dict]:
    code = f"import mpybench; mpybench.main({min_ms}, {repeats}, {','.join(names)!r})"
    proc = subprocess.run(
        micropython_command() + ["-c", code],
        capture_output=True, text=True, env=mpy_env(firmware), timeout=600,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@BENCH@@"):
            row = json.loads(line[len("@@BENCH@@"):])
            results[row["kernel"]] = row
    if proc.returncode != 0 or not results:
        raise BenchError(
            f"unix-port bench failed (exit {proc.returncode}):\n{proc.stderr}\n{proc.stdout[-2000:]}"
        )
    return results


def run_smoke(firmware: Path, spec: dict) -> dict:
    """Kernel trajectories from tests/bench/mpy/smoke.py against `firmware` (see there)."""
    code = ("import sys, json, smoke\n"
            "print('@@SMOKE@@' + json.dumps(smoke.run(json.loads(sys.stdin.read()))))")
    proc = subprocess.run(
        micropython_command() + ["-c", code], input=json.dumps(spec),
        capture_output=True, text=True, env=mpy_env(firmware), timeout=120,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("@@SMOKE@@"):
            return json.loads(line[len("@@SMOKE@@"):])
    raise BenchError(f"smoke run failed (exit {proc.returncode}):\n{proc.stderr}\n{proc.stdout[-2000:]}")


def c_eval(exe: Path, records: list) -> list[list[int]]:
    """Outputs of the C reference for [kind, input_ints, ...] records, one list each."""
    text = "".join(f"{kind} {' '.join(map(str, ints))}\n" for kind, ints, *_ in records)
    proc = subprocess.run([str(exe), "eval"], input=text, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"C eval failed (exit {proc.returncode}):\n{proc.stderr}")
    return [[int(x) for x in line.split()] for line in proc.stdout.splitlines()]


def run_c(exe: Path, min_ms: float, repeats: int) -> dict[str, dict]:
    proc = subprocess.run(
        [str(exe), "bench", str(min_ms), str(repeats)],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise BenchError(f"C bench failed (exit {proc.returncode}):\n{proc.stderr}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {row["kernel"]: row for row in rows}


# ---- reporting ----------------------------------------------------------------------------

@dataclass
class Row:
    kernel: str
    viper: dict | None
    bytecode: dict | None
    c: dict | None
    notes: list[str] = field(default_factory=list)

    def ns(self, form: str) -> float | None:
        r = getattr(self, form)
        return None if r is None or "error" in r else r["ns"]

    @property
    def viper_over_c(self) -> float | None:
        v, c = self.ns("viper"), self.ns("c")
        return v / c if v is not None and c and c > 0 else None

    @property
    def bytecode_over_viper(self) -> float | None:
        b, v = self.ns("bytecode"), self.ns("viper")
        return b / v if b is not None and v and v > 0 else None

    @property
    def alloc(self) -> float | None:
        return None if self.ns("viper") is None else self.viper["alloc"]


def collect(min_ms: float, repeats: int, names: list[str]) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="canopy-bench-") as tmp:
        tmpdir = Path(tmp)
        exe = build_c(tmpdir)
        c = run_c(exe, min_ms, repeats)
        viper = run_mpy(FIRMWARE_DIR, min_ms, repeats, names)
        bytecode = run_mpy(make_bytecode_tree(tmpdir), min_ms, repeats, names)
    rows = []
    for k in names:
        row = Row(k, viper.get(k), bytecode.get(k), c.get(k))
        for form in ("viper", "bytecode"):
            r = getattr(row, form)
            if r and "error" in r:
                row.notes.append(f"{form}: {r['error']}")
            elif r and r.get("note"):
                if r["note"] not in row.notes:
                    row.notes.append(r["note"])
        if row.c is None:
            row.notes.append("no C reference")
        rows.append(row)
    return rows


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _raw(r: dict | None) -> str:
    if r is None or "error" in r:
        return "-"
    return f"{r['raw_ns']:.1f}/{r['base_ns']:.1f}"


def render_text(rows: list[Row]) -> str:
    head = (f"{'kernel':<10} {'viper ns':>9} {'bytecode ns':>12} {'C ns':>8} "
            f"{'viper/C':>8} {'bc/viper':>9} {'B/call':>7}  targets")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.kernel:<10} {_f(r.ns('viper')):>9} {_f(r.ns('bytecode')):>12} {_f(r.ns('c')):>8} "
            f"{_f(r.viper_over_c, '{:.2f}'):>8} {_f(r.bytecode_over_viper, '{:.1f}'):>9} "
            f"{_f(r.alloc, '{:.0f}'):>7}  {verdict(r)}"
        )
    lines.append("")
    lines.append("raw ns/call / empty-call baseline ns/call (the figures above are raw minus baseline):")
    for r in rows:
        lines.append(f"  {r.kernel:<10} viper {_raw(r.viper):>15}   bytecode {_raw(r.bytecode):>17}   "
                     f"C {_raw(r.c):>11}")
    notes = [f"  {r.kernel}: {n}" for r in rows for n in r.notes]
    if notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(notes)
    return "\n".join(lines)


def verdict(r: Row) -> str:
    parts = []
    if r.viper_over_c is not None:
        ok = r.viper_over_c <= VIPER_TARGET
        parts.append(f"viper<={VIPER_TARGET}xC {'MET' if ok else 'MISSED'}")
    if r.alloc is not None:
        parts.append(f"0 B/call {'MET' if r.alloc == 0 else 'MISSED'}")
    return ", ".join(parts) or "n/a"


def render_markdown(rows: list[Row]) -> str:
    lines = [
        "| kernel | viper ns/call | bytecode ns/call | C -O2 ns/call | viper/C | bytecode/viper "
        "| bytes/call (viper) | raw viper / baseline | raw bytecode / baseline | raw C / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {_f(r.ns('viper'))} | {_f(r.ns('bytecode'))} | {_f(r.ns('c'))} "
            f"| {_f(r.viper_over_c, '{:.2f}')} | {_f(r.bytecode_over_viper, '{:.1f}')} "
            f"| {_f(r.alloc, '{:.0f}')} | {_raw(r.viper)} | {_raw(r.bytecode)} | {_raw(r.c)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-ms", type=float, default=50.0,
                    help="shortest timed run per measurement (default 50)")
    ap.add_argument("--repeats", type=int, default=9, help="best of this many runs (default 9)")
    ap.add_argument("--kernels", default=",".join(KERNELS),
                    help=f"comma-separated subset of {','.join(KERNELS)}")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    ap.add_argument("--json", type=Path, help="write the raw results to this file")
    args = ap.parse_args(argv)
    names = [k for k in args.kernels.split(",") if k]
    unknown = [k for k in names if k not in KERNELS]
    if unknown:
        print(f"bench: unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}",
              file=sys.stderr)
        return 2
    if args.min_ms <= 0 or args.repeats < 1:
        print("bench: --min-ms must be > 0 and --repeats >= 1", file=sys.stderr)
        return 2
    try:
        rows = collect(args.min_ms, args.repeats, names)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print(f"== firmware kernels (best of {args.repeats}, >= {args.min_ms:g} ms per measurement) ==")
    print(render_text(rows))
    if args.markdown:
        print()
        print(render_markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(
            [{"kernel": r.kernel, "viper": r.viper, "bytecode": r.bytecode, "c": r.c} for r in rows],
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
