"""The real mpremote CLI against a virtual node running the real firmware, unmodified.

Every mpremote command starts with Ctrl-C (stopping the firmware's loop), enters the
raw REPL and soft-resets, so these pass only if the node behaves like a board: REPL on
a tty, soft reboot back into the raw REPL, files landing in the node's flash folder,
and main.py running again after `reset`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from canopy_host.sim import SimConfig, Supervisor

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="virtual nodes need Linux ptys")

MPREMOTE = str(Path(sys.executable).parent / "mpremote")


def mpremote(port: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([MPREMOTE, "connect", port, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"mpremote {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("mpr")
    with Supervisor(SimConfig(nodes=1, directory=d, speed=20.0)) as sup:
        yield sup.nodes[0]


def test_exec_interrupts_the_firmware_and_runs_code(node) -> None:
    assert mpremote(node.port, "exec", "print(1+1)").stdout.strip() == "2"
    # Through the stable by-id symlink too (mpremote then polls instead of treating it as a pty).
    assert mpremote(str(node.by_id), "exec", "print(2+3)").stdout.strip() == "5"
    # The firmware's modules are importable on the "board", like on flash.
    out = mpremote(node.port, "exec", "import canopy.config as c; print(type(c.DEFAULT_CONFIG).__name__)")
    assert out.stdout.strip() == "dict"


def test_fs_cp_ls_cat_round_trip(node, tmp_path: Path) -> None:
    payload = "".join(f"line {i} \u00e9\n" for i in range(300))  # > one raw-REPL chunk, non-ASCII
    src = tmp_path / "notes.txt"
    src.write_text(payload, encoding="utf-8")
    mpremote(node.port, "fs", "cp", str(src), ":notes.txt")
    assert (node.folder / "notes.txt").read_text(encoding="utf-8") == payload  # the node's flash
    listing = mpremote(node.port, "fs", "ls").stdout
    assert f"{len(payload.encode())} notes.txt" in listing, listing
    back = tmp_path / "back.txt"
    mpremote(node.port, "fs", "cp", ":notes.txt", str(back))
    assert back.read_text(encoding="utf-8") == payload
    mpremote(node.port, "fs", "rm", ":notes.txt")
    assert not (node.folder / "notes.txt").exists()


def test_deployed_main_runs_after_reset_and_soft_reset(node, tmp_path: Path) -> None:
    # A main.py that leaves evidence on the flash each time it runs, then idles.
    main = tmp_path / "main.py"
    main.write_text(
        "with open('runs.txt', 'a') as f:\n    f.write('x')\n"
        "import time\nwhile True:\n    time.sleep_ms(20)\n"
    )
    runs = node.folder / "runs.txt"
    try:
        mpremote(node.port, "fs", "cp", str(main), ":main.py")
        assert not runs.exists()  # mpremote's soft resets land in the raw REPL: main.py skipped
        boots = node.boots
        mpremote(node.port, "reset")
        _wait(lambda: runs.exists() and runs.read_text() == "x")
        # mpremote soft-resets into the raw REPL first, then machine.reset() restarts the "board".
        assert node.boots == boots + 2 and node.reboots[-2:] == ["soft-raw", "reset"]

        # Soft reset from the friendly REPL (Ctrl-C, Ctrl-D), as a user in a terminal would.
        from canopy_host.transport import open_port
        with open_port(node.port, timeout=0.1) as port:
            port.write(b"\x03")
            time.sleep(0.3)
            port.write(b"\x04")
            _wait(lambda: runs.read_text() == "xx")
        assert node.reboots[-1] == "soft"
        assert mpremote(node.port, "exec", "print(open('runs.txt').read())").stdout.strip() == "xx"
    finally:
        mpremote(node.port, "fs", "rm", ":main.py")  # back to the firmware's own main
        mpremote(node.port, "fs", "rm", ":runs.txt")


def _wait(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)
