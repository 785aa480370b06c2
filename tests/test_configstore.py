"""The node's config store on a real LittleFS image (vfs.VfsLfs2 in the unix port).

A RAM block device counts every block write and erase; a power cut at write k tears
that write (half the buffer lands) and fails every later one. The image as it was at
the cut is then mounted afresh, `recover()` runs as at boot, and the active config
must be the old or the new one, intact: its bytes hash to one of the two digests,
computed here on CPython from the canonical JSON, independently of the node code.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from canopy_host.unixport import call_batch

DRIVER = r'''
import os, vfs, json
from canopy.configstore import ConfigStore, sha256_hex

BS = 256
NBLOCKS = 64

class CutDev:
    """RAM block device; write number `cut_at` is torn and every later one fails."""
    def __init__(self, data, cut_at=-1):
        self.data = data
        self.writes = 0
        self.cut_at = cut_at
        self.dead = False
    def _write(self):
        self.writes += 1
        if self.dead:
            raise OSError(5)
        return self.writes == self.cut_at
    def readblocks(self, b, buf, off=0):
        a = b * BS + off
        buf[:] = self.data[a:a + len(buf)]
    def writeblocks(self, b, buf, off=0):
        a = b * BS + off
        if self._write():
            half = len(buf) // 2
            self.data[a:a + half] = buf[:half]
            self.dead = True
            raise OSError(5)
        self.data[a:a + len(buf)] = buf
    def ioctl(self, op, arg):
        if op == 4:
            return NBLOCKS
        if op == 5:
            return BS
        if op == 6:
            if self._write():
                self.dead = True
                raise OSError(5)
            a = arg * BS
            self.data[a:a + BS] = b"\xff" * BS
            return 0
        return 0

def mount(dev):
    try:
        vfs.umount("/flash")
    except OSError:
        pass
    vfs.mount(vfs.VfsLfs2(dev), "/flash")
    return ConfigStore("/flash")

_IMAGES = {}

def image(old_json):
    if old_json not in _IMAGES:
        dev = CutDev(bytearray(BS * NBLOCKS))
        vfs.VfsLfs2.mkfs(dev)
        cs = mount(dev)
        cs._write_atomic("config.json", old_json.encode())
        vfs.umount("/flash")
        _IMAGES[old_json] = bytes(dev.data)
    return bytearray(_IMAGES[old_json])

def steps(new_json, digest, version):
    data = new_json.encode()
    out = [("stage", version, len(data), digest)]
    for off in range(0, len(data), 62):
        out.append(("chunk", off, data[off:off + 62].hex()))
    out.append(("commit",))
    out.append(("activate", digest))
    out.append(("passed",))
    return out

def do(cs, st):
    k = st[0]
    if k == "stage":
        cs.stage_begin(st[1], st[2], st[3])
    elif k == "chunk":
        cs.stage_chunk(st[1], st[2])
    elif k == "commit":
        cs.stage_commit()
    elif k == "activate":
        cs.activate(st[1])
    else:
        cs.trial_passed()

def resume(cs, new_json, digest, version):
    """What the host does after a reboot: ask, then carry on from the node's state."""
    cfg, d = cs.load()
    if d == digest:
        cs.trial_passed()
        return
    got = cs.staged()
    todo = steps(new_json, digest, version)
    if got is not None and got[1] == digest:
        todo = todo[-2:]
    for st in todo:
        do(cs, st)

def active_state(cs):
    raw = cs._read("config.json")
    cfg, d = cs.load()
    return [sha256_hex(raw) if raw is not None else None, d, cfg["version"], os.listdir("/flash")]

def powercut(old_json, new_json, digest, version, cut_at):
    """Run the whole repair with a power cut at block write `cut_at` (-1: none)."""
    dev = CutDev(image(old_json), cut_at)
    cs = mount(dev)
    done = True
    try:
        for st in steps(new_json, digest, version):
            do(cs, st)
    except OSError:
        done = False
    writes = dev.writes
    cs = mount(CutDev(bytearray(dev.data)))    # power back: the image as it was
    cs.recover()
    after = active_state(cs)
    resume(cs, new_json, digest, version)      # the host finishes the job
    final = active_state(cs)
    vfs.umount("/flash")
    return [writes, done, after, final]

def reboot_at(old_json, new_json, digest, version, k):
    """Reboot (remount + recover) after the first k steps of the exchange."""
    dev = CutDev(image(old_json))
    cs = mount(dev)
    for st in steps(new_json, digest, version)[:k]:
        do(cs, st)
    cs = mount(dev)
    cs.recover()
    after = active_state(cs)
    resume(cs, new_json, digest, version)
    final = active_state(cs)
    vfs.umount("/flash")
    return [after, final]

def case(name, *a):
    return globals()[name](*a)
'''


def canonical(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = tmp_path_factory.mktemp("csdrv")
    (d / "cs_driver.py").write_text(DRIVER)
    return d


@pytest.fixture(scope="module")
def configs():
    from canopy_host import paths  # noqa: F401 - the repo's firmware config module below
    import importlib.util

    spec = importlib.util.spec_from_file_location("fw_config", paths.FIRMWARE_DIR / "canopy" / "config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # plain Python: the defaults table
    old = dict(mod.DEFAULT_CONFIG, version=3)
    new = dict(mod.DEFAULT_CONFIG, version=4, t_setpoint=2450, safe_fan=2500)
    return canonical(old), canonical(new)


def test_power_cut_at_every_block_write_leaves_old_or_new(driver, configs):
    old, new = configs
    d_old, d_new = sha(old), sha(new)
    [(total, done, _after, final)] = call_batch(
        "cs_driver", "case", [("powercut", old, new, d_new, 4, -1)], extra_path=[driver])
    assert done and final[0] == d_new and final[1] == d_new
    assert total > 10, "the exchange should take many block writes"
    results = call_batch("cs_driver", "case",
                         [("powercut", old, new, d_new, 4, k) for k in range(1, total + 1)],
                         extra_path=[driver])
    seen = set()
    for k, (writes, done, after, final) in enumerate(results, start=1):
        # the bytes of config.json hash to old or new, and they parse to the same config
        assert after[0] in (d_old, d_new), f"cut at write {k}: torn active config {after}"
        assert after[1] == after[0], f"cut at write {k}: file and parsed digest differ"
        assert final[0] == d_new and final[2] == 4, f"cut at write {k}: repair did not finish"
        assert "config.tmp" not in after[3], f"cut at write {k}: temp file survived recovery"
        seen.add(after[0])
    assert seen == {d_old, d_new}, "cuts early should keep old, cuts late should keep new"


def test_reboot_after_every_step_then_resume(driver, configs):
    old, new = configs
    d_old, d_new = sha(old), sha(new)
    n_steps = 1 + -(-len(new) // 62) + 3
    results = call_batch("cs_driver", "case",
                         [("reboot_at", old, new, d_new, 4, k) for k in range(n_steps + 1)],
                         extra_path=[driver])
    for k, (after, final) in enumerate(results):
        assert after[0] in (d_old, d_new) and after[1] == after[0], f"reboot after step {k}: {after}"
        assert final[1] == d_new and final[2] == 4
    assert results[0][0][0] == d_old and results[-1][0][0] == d_new
