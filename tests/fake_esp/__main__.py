"""Run fake chips until Ctrl-C (or stdin closes), printing one socket:// URL per line."""

from __future__ import annotations

import argparse
import sys

from . import CHIPS, FakeConfig, FakeEsp, Faults


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m fake_esp")
    p.add_argument("--chip", default="ESP32", choices=sorted(CHIPS))
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--flash-mb", type=int, default=4)
    p.add_argument("--baud", type=int, default=115200, help="rate the ROM starts at")
    p.add_argument("--no-pace", action="store_true", help="answer at full speed, ignoring baud")
    p.add_argument("--reset-on-connect", action="store_true", help="back to the ROM on every connection (auto-reset circuit)")
    p.add_argument("--no-sync", action="store_true")
    p.add_argument("--bad-write", action="store_true")
    p.add_argument("--drop-after", type=int)
    a = p.parse_args()
    fakes = []
    for i in range(a.count):
        cfg = FakeConfig(
            chip=a.chip,
            flash_size=a.flash_mb * 1024 * 1024,
            mac=bytes([0x24, 0xA1, 0x60, 0x00, 0x10, i]),
            initial_baud=a.baud,
            faults=Faults(no_sync=a.no_sync, bad_write=a.bad_write, drop_after=a.drop_after),
        )
        fakes.append(FakeEsp(cfg, pace=not a.no_pace, reset_on_connect=a.reset_on_connect).start())
        print(fakes[-1].url, flush=True)
    try:
        sys.stdin.read()  # parent closes stdin (or Ctrl-D) to stop us
    except KeyboardInterrupt:
        pass
    for f in fakes:
        f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
