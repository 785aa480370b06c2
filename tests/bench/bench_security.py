"""Cost of frame authentication, node (MicroPython unix port) and host.

NOT part of the test suite. Run:

    .venv/bin/python tests/bench/bench_security.py [--frames 20000] [--repeat 5]

Measured, best of --repeat runs:

  node  reading plain / tagged : Encoder.reading without / with Encoder.auth (HMAC + hex)
  node  verify command         : Hmac.tag_hex over a command + ct_equal_hex
  host  parse plain / tagged   : FrameParser.feed of N readings in 4 KiB chunks (CPU time)
  host  verify                 : FrameVerifier.verify per parsed reading (HMAC + window)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "host_tools"))

from canopy_host import security as hs  # noqa: E402
from canopy_host.paths import micropython_command  # noqa: E402
from canopy_host.protocol import FrameParser  # noqa: E402
from canopy_host.unixport import micropython_env  # noqa: E402

_NODE = """
import time
from array import array
from canopy import protocol, security
N = %d
raw = array("i", [2500, 100000, 50000])
def reading_us(enc):
    best = 1e9
    for _ in range(%d):
        t = time.ticks_us()
        for i in range(N):
            enc.reading(raw, raw, raw, 0, 0, i, None)
        best = min(best, time.ticks_diff(time.ticks_us(), t) / N)
    return best
enc = protocol.Encoder("n01", 5)
plain = reading_us(enc)
enc.auth = security.Auth(security.STRICT, b"k" * 32, "n01", "/tmp/_bench_ctr")
tagged = reading_us(enc)
line = bytearray(b"@CNP1 n01 0 5 C set t_setpoint=2500 !0123456789abcdef0123456789abcdef *00000000")
at = line.index(b"!")
h = enc.auth.hmac
best = 1e9
for _ in range(%d):
    t = time.ticks_us()
    for i in range(N):
        security.ct_equal_hex(h.tag_hex(line, 0, at - 1), line, at + 1)
    best = min(best, time.ticks_diff(time.ticks_us(), t) / N)
print("%%.1f %%.1f %%.1f" %% (plain, tagged, best))
"""


def node(frames: int, repeat: int) -> tuple[float, float, float]:
    n = max(100, frames // 10)
    out = subprocess.run(micropython_command() + ["-c", _NODE % (n, repeat, repeat)], env=micropython_env(),
                         capture_output=True, text=True, timeout=600, check=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def host(frames: int, repeat: int) -> tuple[float, float, float]:
    key = hs.derive_node_key(b"m" * 32, "n01")
    data = {}
    for tagged in (False, True):
        lines = []
        for s in range(frames):
            body = b"@CNP1 n01 1 %d R 2500,100000,50000,2499,100001,50001,100,0,9000,0,0,%d,0,0,0" % (s, s)
            if tagged:
                body += b" !" + hs.tag_bytes(key, body).hex().encode()
            lines.append(body + b" *%08x\n" % zlib.crc32(body))
        data[tagged] = b"".join(lines)
    best = {False: 1e9, True: 1e9, "verify": 1e9}
    for _ in range(repeat):
        for tagged in (False, True):
            p = FrameParser()
            got = []
            t = time.process_time()
            for i in range(0, len(data[tagged]), 4096):
                got += p.feed(data[tagged][i:i + 4096])
            best[tagged] = min(best[tagged], (time.process_time() - t) / len(got) * 1e6)
        v = hs.FrameVerifier({"n01": key})
        t = time.process_time()
        for f in got:
            v.verify(f)
        best["verify"] = min(best["verify"], (time.process_time() - t) / len(got) * 1e6)
    return best[False], best[True], best["verify"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    plain, tagged, verify = node(a.frames, a.repeat)
    print(f"node  reading plain  {plain:8.1f} us   tagged {tagged:8.1f} us   (+{tagged - plain:.1f})")
    print(f"node  verify command {verify:8.1f} us")
    hp, ht, hv = host(a.frames, a.repeat)
    print(f"host  parse plain    {hp:8.1f} us   tagged {ht:8.1f} us   per frame")
    print(f"host  verify         {hv:8.1f} us   per frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
