"""Run firmware code in the MicroPython unix port, from CPython.

The CPython side drives and asserts; the unix port executes. `call_batch` sends many
cases through one interpreter start, because starting the interpreter dominates the
cost of a small case.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from .paths import FIRMWARE_DIR, micropython_command


class UnixPortError(RuntimeError):
    """The unix-port process failed; carries its stderr/stdout for the report."""


def micropython_env(extra_path: Iterable[Path | str] = ()) -> dict[str, str]:
    """Environment whose MICROPYPATH puts firmware/ (and any extra dirs) first."""
    env = dict(os.environ)
    parts = [str(p) for p in extra_path] + [str(FIRMWARE_DIR), ".frozen"]
    env["MICROPYPATH"] = ":".join(parts)
    return env


def run_code(
    code: str,
    *,
    stdin: str | bytes | None = None,
    heapsize: str | None = None,
    extra_path: Iterable[Path | str] = (),
    timeout: float = 120.0,
    cwd: Path | str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Execute `code` in a fresh unix-port process and return the completed process."""
    cmd = micropython_command()
    if heapsize:
        cmd += ["-X", f"heapsize={heapsize}"]
    cmd += ["-c", code]
    data = stdin.decode() if isinstance(stdin, bytes) else stdin
    return subprocess.run(
        cmd,
        input=data,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=micropython_env(extra_path),
        cwd=cwd,
    )


_BATCH_DRIVER = """
import sys, json
from {module} import {func} as _f
_cases = json.loads(sys.stdin.read())
_out = []
for _c in _cases:
    _out.append(_f(*_c))
print("@@BATCH@@" + json.dumps(_out))
"""


def call_batch(
    module: str,
    func: str,
    cases: Sequence[Sequence[object]],
    *,
    heapsize: str | None = None,
    extra_path: Iterable[Path | str] = (),
    timeout: float = 300.0,
) -> list:
    """Call `module.func(*case)` in one unix-port process for every case; return the results.

    Results must be JSON-serialisable on the MicroPython side (ints, lists, tuples, str).
    """
    proc = run_code(
        _BATCH_DRIVER.format(module=module, func=func),
        stdin=json.dumps([list(c) for c in cases]),
        heapsize=heapsize,
        extra_path=extra_path,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("@@BATCH@@"):
            return json.loads(line[len("@@BATCH@@"):])
    raise UnixPortError(
        f"{module}.{func} failed in the unix port (exit {proc.returncode}):\n"
        f"{proc.stderr}\n{proc.stdout[-2000:]}"
    )
