"""Benchmark `canopy flash` against plain `esptool write-flash`, and 8 nodes vs 1.

Not part of the test suite. Run from the repository root:

    .venv/bin/python tests/bench/bench_flash.py [--size 1500000] [--baud 921600] [--nodes 8]

The fake chips run in a separate process (``python -m fake_esp``), paced like a real
UART, reset to the ROM on every connection (as a dev board's auto-reset circuit does),
so each run uploads the stub and starts at 115200 baud like real hardware.
Targets: canopy overhead vs esptool < 10 %, parallel scaling efficiency >= 80 %.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

import esptool  # noqa: E402

from canopy_host import cli  # noqa: E402
from fake_esp.images import build_image  # noqa: E402


def firmware_like(size: int) -> bytes:
    """A valid ESP32 image whose bulk compresses about like a MicroPython build (~60 %)."""
    head = build_image("ESP32", code_size=20_000)
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnop_") for _ in range(rng.randint(3, 12))) for _ in range(4000)]
    body = bytearray()
    while len(body) < size - len(head):
        body += rng.randbytes(48) if rng.random() < 0.45 else b"".join(rng.choice(words) for _ in range(8))
    return head + bytes(body[: size - len(head)])


class Fakes:
    def __init__(self, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fake_esp", "--count", str(count), "--reset-on-connect"],
            cwd=TESTS, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.urls = [self.proc.stdout.readline().strip() for _ in range(count)]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def time_esptool(url: str, fw: Path, baud: int) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        esptool.main(["--port", url, "--baud", str(baud), "write-flash", "0x1000", str(fw)])
    return time.perf_counter() - start


@contextlib.contextmanager
def hex_fix():
    """esptool with canopy's one esptool tweak (no eager hex dumps), to separate what the
    tweak gains from what canopy's own wrapping costs."""
    import esptool.loader as loader

    from canopy_host.flash import _UnformattedHex

    saved = loader.HexFormatter
    loader.HexFormatter = _UnformattedHex
    try:
        yield
    finally:
        loader.HexFormatter = saved


def time_canopy(urls: list[str], fw: Path, baud: int) -> float:
    argv = ["flash", "--quiet", "--board", "esp32-devkitc", "--firmware", str(fw), "--baud", str(baud)]
    for u in urls:
        argv += ["--port", u]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"canopy flash failed (rc={rc})")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1_500_000)
    p.add_argument("--baud", type=int, default=921600)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()

    data = firmware_like(a.size)
    tmp = Path(tempfile.mkdtemp())
    fw = tmp / "fw.bin"
    fw.write_bytes(data)
    print(f"image {len(data)} bytes, {len(zlib.compress(data, 9))} compressed; {a.baud} baud; "
          f"wire time at that rate ~{len(zlib.compress(data, 9)) * 10 / a.baud:.1f}s")

    fakes = Fakes(a.nodes)
    try:
        one = fakes.urls[:1]
        esp_t, fix_t, can_t = [], [], []
        for _ in range(a.repeat):  # interleave so drift hits all equally
            esp_t.append(time_esptool(one[0], fw, a.baud))
            with hex_fix():
                fix_t.append(time_esptool(one[0], fw, a.baud))
            can_t.append(time_canopy(one, fw, a.baud))
        par_t = [time_canopy(fakes.urls, fw, a.baud) for _ in range(a.repeat)]
    finally:
        fakes.close()

    esp_m, can_m, par_m = statistics.median(esp_t), statistics.median(can_t), statistics.median(par_t)
    fix_m = statistics.median(fix_t)
    overhead = can_m / esp_m - 1
    own_overhead = can_m / fix_m - 1
    efficiency = can_m / par_m
    print(f"esptool write-flash, 1 node : {esp_m:6.2f}s  (runs {', '.join(f'{t:.2f}' for t in esp_t)})")
    print(f"esptool + hex fix,   1 node : {fix_m:6.2f}s  (runs {', '.join(f'{t:.2f}' for t in fix_t)})")
    print(f"canopy flash,        1 node : {can_m:6.2f}s  (runs {', '.join(f'{t:.2f}' for t in can_t)})")
    print(f"canopy flash, {a.nodes:2d} in parallel: {par_m:6.2f}s  (runs {', '.join(f'{t:.2f}' for t in par_t)})")
    print(f"overhead vs esptool : {overhead * 100:+.1f}%   (target < 10%)   {'OK' if overhead < 0.10 else 'MISSED'}")
    print(f"overhead vs esptool with the same hex fix (canopy's own wrapping): {own_overhead * 100:+.1f}%")
    print(f"scaling efficiency  : {efficiency * 100:.1f}%   (target >= 80%)  {'OK' if efficiency >= 0.80 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
