"""Power-cut-safe config storage on the node's flash: stage, verify, activate, fall back.

The repair engine never overwrites the running config in place. A new config travels
in chunks into a temp file, is re-hashed and validated, then renamed to the staged
file; activation copies the active file to the fallback and renames the staged file
over the active one. LittleFS (the ESP32 filesystem) renames atomically and writes
file data copy-on-write, so at every instant a complete, valid ``config.json`` exists:
a power cut at any block write leaves the old or the new config, never a torn one.

Files (all in the flash root, or under ``root``)::

    config.json      active config (canonical JSON; main.py loads it at boot)
    config.new       staged config, complete and verified, waiting for `activate`
    config.tmp       staging in progress (thrown away at boot: it may be torn)
    config.prev      fallback: the config that was active before the last activation
    config.trial     "<digest> <boots>": the active config is on trial (health check)
    quarantine       present = actuators held at failsafe, node out of consensus
    cal.json         calibration offsets [t, p, h] in channel units

Every small file is written to ``<name>.tmp`` first and renamed into place.

Usage::

    from canopy.configstore import ConfigStore
    cs = ConfigStore()                    # "" = current dir (the flash root)
    cs.recover()                          # once at boot, before loading the config
    cfg, digest = cs.load()
    cs.stage_begin(2, len(data), digest_hex)
    cs.stage_chunk(0, "7b22...")          # hex; offsets must follow on, repeats are ignored
    cs.stage_commit()
    cs.activate(digest_hex)               # idempotent: a repeat answers "already"
    cs.trial_passed()                     # or cs.revert() when the health check fails
"""

import json
import os

from canopy import config as _config

ACTIVE = "config.json"
STAGED = "config.new"
TMP = "config.tmp"
PREV = "config.prev"
TRIAL = "config.trial"
QUARANTINE = "quarantine"
CAL = "cal.json"
# A config that reboots the node this many times while on trial is taken back.
MAX_TRIAL_BOOTS = 3
MAX_SIZE = 4096  # a canonical config is ~700 bytes; anything far larger is an error


class StoreError(ValueError):
    """A refused store operation; the message is the reason reported to the host."""


def sha256_hex(data):
    import binascii
    import hashlib

    return binascii.hexlify(hashlib.sha256(data).digest()).decode()


def _is_digest(s):
    if not isinstance(s, str) or len(s) != 64:
        return False
    for ch in s:
        if not ("0" <= ch <= "9" or "a" <= ch <= "f"):
            return False
    return True


class ConfigStore:
    def __init__(self, root=""):
        self.root = root.rstrip("/") if root else ""
        self._stage = None  # [version, size, digest, written] while staging

    # -- file helpers ----------------------------------------------------------------

    def path(self, name):
        return self.root + "/" + name if self.root else name

    def _exists(self, name):
        try:
            os.stat(self.path(name))
            return True
        except OSError:
            return False

    def _read(self, name):
        try:
            with open(self.path(name), "rb") as f:
                return f.read()
        except OSError:
            return None

    def _remove(self, name):
        try:
            os.remove(self.path(name))
        except OSError:
            pass

    def _write_atomic(self, name, data):
        tmp = self.path(name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, self.path(name))

    def _copy_atomic(self, src, dst):
        data = self._read(src)
        if data is not None:
            self._write_atomic(dst, data)

    def _parse(self, data):
        """(cfg, digest) of a config file's bytes, or None when missing/invalid."""
        if data is None:
            return None
        try:
            cfg = _config.merged(json.loads(data))
        except (ValueError, TypeError, KeyError):  # includes a torn or non-JSON file
            return None
        return cfg, _config.digest(cfg)

    # -- boot --------------------------------------------------------------------------

    def recover(self):
        """Clean up after a reset or power cut; returns what was done (for the log).

        Partial temp files are dropped; a broken active config (which the write order
        rules out, but flash can still fail) is replaced by the fallback; a config that
        keeps rebooting the node while on trial is reverted.
        """
        done = []
        for name in (TMP, PREV + ".tmp", ACTIVE + ".tmp", TRIAL + ".tmp",
                     QUARANTINE + ".tmp", CAL + ".tmp"):
            if self._exists(name):
                self._remove(name)
                done.append("drop " + name)
        active = self._parse(self._read(ACTIVE))
        if active is None and self._exists(ACTIVE):
            if self._parse(self._read(PREV)) is not None:
                self._copy_atomic(PREV, ACTIVE)
                done.append("active broken: fallback restored")
        marker = self.trial()
        if marker is not None:
            digest, boots = marker
            active = self._parse(self._read(ACTIVE))
            if active is None or active[1] != digest:
                # Cut between writing the marker and the swap: nothing is on trial.
                self._remove(TRIAL)
                done.append("stale trial marker")
            elif boots + 1 >= MAX_TRIAL_BOOTS:
                self.revert()
                done.append("trial config rebooted the node: reverted")
            else:
                self._write_atomic(TRIAL, ("%s %d" % (digest, boots + 1)).encode())
        return done

    # -- reading -------------------------------------------------------------------------

    def load(self):
        """(cfg, digest) of the active config; the defaults when there is none."""
        got = self._parse(self._read(ACTIVE))
        if got is None:
            cfg = _config.merged()
            return cfg, _config.digest(cfg)
        return got

    def staged(self):
        """(version, digest) of the staged config, or None."""
        got = self._parse(self._read(STAGED))
        if got is None:
            return None
        return got[0]["version"], got[1]

    def trial(self):
        """(digest, boots) while the active config is on trial, else None."""
        data = self._read(TRIAL)
        if not data:
            return None
        parts = data.decode().split()
        if len(parts) != 2 or not _is_digest(parts[0]):
            return None
        try:
            return parts[0], int(parts[1])
        except ValueError:
            return None

    # -- staging -------------------------------------------------------------------------

    def stage_begin(self, version, size, digest):
        if not isinstance(version, int) or not isinstance(size, int) or not 2 <= size <= MAX_SIZE:
            raise StoreError("stage: version and size (2..%d) must be ints" % MAX_SIZE)
        if not _is_digest(digest):
            raise StoreError("stage: digest must be 64 lower-case hex digits")
        cur = self.load()[0]["version"]
        if version < cur:
            raise StoreError("stage: version %d is older than the active %d" % (version, cur))
        self._remove(TMP)
        with open(self.path(TMP), "wb"):
            pass
        self._stage = [version, size, digest, 0]
        return 0

    def stage_chunk(self, offset, data_hex):
        import binascii

        st = self._stage
        if st is None:
            raise StoreError("chunk: no staging in progress (send stage first)")
        if not isinstance(offset, int) or not isinstance(data_hex, str) or not data_hex:
            raise StoreError("chunk: needs off=<int> and hex data")
        try:
            data = binascii.unhexlify(data_hex)
        except ValueError:
            raise StoreError("chunk: data is not hex")
        written = st[3]
        if offset + len(data) <= written:
            return written  # a repeat after a lost ack: already on flash
        if offset != written:
            raise StoreError("chunk: expected off=%d" % written)
        if written + len(data) > st[1]:
            raise StoreError("chunk: more data than the announced size")
        with open(self.path(TMP), "ab") as f:
            f.write(data)
        st[3] = written + len(data)
        return st[3]

    def stage_commit(self):
        """Re-read and re-hash the temp file, validate it, then make it the staged file."""
        st = self._stage
        if st is None:
            got = self.staged()
            if got is not None:
                return got[1]  # a repeat after a lost ack
            raise StoreError("commit: no staging in progress")
        version, size, digest, written = st
        if written != size:
            raise StoreError("commit: have %d of %d bytes" % (written, size))
        data = self._read(TMP)
        if data is None or len(data) != size or sha256_hex(data) != digest:
            self._stage = None
            self._remove(TMP)
            raise StoreError("commit: digest mismatch, staging discarded")
        got = self._parse(data)
        if got is None or got[1] != digest:
            self._stage = None
            self._remove(TMP)
            raise StoreError("commit: not a valid canonical config")
        if got[0]["version"] != version:
            self._stage = None
            self._remove(TMP)
            raise StoreError("commit: version differs from the announced one")
        os.rename(self.path(TMP), self.path(STAGED))
        self._stage = None
        return digest

    # -- activation --------------------------------------------------------------------

    def activate(self, digest):
        """Make the staged config with `digest` active; returns "activated" or "already".

        Order matters for power cuts: fallback copy, trial marker, then the one rename
        that switches configs. Every step leaves a complete active config behind.
        """
        if not _is_digest(digest):
            raise StoreError("activate: digest must be 64 lower-case hex digits")
        active_cfg, active_digest = self.load()
        if active_digest == digest:
            return "already"  # duplicate activate after a lost ack
        data = self._read(STAGED)
        got = self._parse(data)
        if got is None or got[1] != digest or sha256_hex(data) != digest:
            raise StoreError("activate: no staged config with that digest")
        if got[0]["version"] < active_cfg["version"]:
            raise StoreError("activate: would roll back to an older version")
        if self.trial() is not None:
            # The fallback must be a config that passed its trial, not the one on trial.
            raise StoreError("activate: the active config is still on trial, retry later")
        if self._exists(ACTIVE):
            self._copy_atomic(ACTIVE, PREV)
        else:
            # Running on the built-in defaults: they become the fallback file.
            self._write_atomic(PREV, _config.canonical_json(active_cfg).encode())
        self._write_atomic(TRIAL, (digest + " 0").encode())
        os.rename(self.path(STAGED), self.path(ACTIVE))
        return "activated"

    def trial_passed(self):
        self._remove(TRIAL)

    def revert(self):
        """Back to the fallback config (the health check failed); True if there was one."""
        self._remove(TRIAL)
        if self._parse(self._read(PREV)) is None:
            return False
        self._copy_atomic(PREV, ACTIVE)
        return True

    # -- quarantine and calibration ------------------------------------------------------

    def quarantined(self):
        return self._exists(QUARANTINE)

    def set_quarantine(self, on):
        if on:
            self._write_atomic(QUARANTINE, b"1")
        else:
            self._remove(QUARANTINE)

    def load_cal(self):
        data = self._read(CAL)
        try:
            cal = json.loads(data) if data else None
        except ValueError:
            cal = None
        if isinstance(cal, list) and len(cal) == 3 and all(isinstance(v, int) for v in cal):
            return cal
        return [0, 0, 0]

    def save_cal(self, offsets):
        self._write_atomic(CAL, json.dumps([int(v) for v in offsets]).encode())
