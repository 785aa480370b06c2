"""Frame authentication on the node: HMAC-SHA256 tags, command replay state, key file.

MicroPython has no `hmac` module, so HMAC (RFC 2104) is built on `hashlib.sha256`
with the two padded key blocks prepared once. A tag is the HMAC truncated to 16
bytes, carried in a frame as `!<32 hex>` just before the CRC; it covers the frame
bytes from '@' up to, not including, the space before the '!'. Spec and threat
model: docs/security.md.

Modes (`Auth.mode`):

- ``strict``: a key file was found. Outgoing frames are tagged; a command is run only
  if its tag verifies under this node's key and its counter is above the highest
  counter accepted so far (kept in flash, so a reboot does not reopen old counters).
- ``dev``: no key, explicitly enabled (virtual node `sim.json` ``"auth": "dev"`` or
  ``CANOPY_AUTH=dev`` in the unix port). Nothing is tagged or checked; the node says
  so in every status reply (``auth=dev``).
- ``locked``: no key and dev mode not enabled. The node keeps its control duties and
  reports readings (untagged), but refuses every command (``err=auth msg=no_key``).

Usage::

    from canopy import security
    auth = security.load()                     # canopy_key.json, else dev/locked
    n = auth.tag_into(buf, n)                  # append " !<tag>" to buf[0:n]
    code = auth.check_command(buf, e, counter) # 0 = accept, else a REJECT_* code
"""

import hashlib

from micropython import const

KEY_FILE = "canopy_key.json"
COUNTER_FILE = "canopy_ctr"
TAG_BYTES = const(16)
TAG_HEX = const(32)
KEY_BYTES = const(32)
COUNTER_MAX = const(0x3FFFFFFF)

STRICT = "strict"
DEV = "dev"
LOCKED = "locked"

# Reject reasons; the node sends `E code=security arg=<reason>` and `X err=auth msg=<name>`.
ACCEPT = const(0)
REJECT_UNAUTH = const(1)  # no tag where one is required (or no key at all)
REJECT_FORGED = const(2)  # tag does not verify under this node's key
REJECT_REPLAY = const(3)  # counter not above the highest accepted one
REJECT_CROSS = const(4)  # addressed to every node ('*'): a per-node key cannot vouch for that
REJECT_MALFORMED = const(5)  # bad tag syntax or counter out of range
REASONS = ("ok", "unauth", "forged", "replay", "cross_node", "malformed")

_HEX = b"0123456789abcdef"


class KeyFileError(ValueError):
    pass


def hmac_sha256(key, data):
    """RFC 2104 HMAC-SHA256 (allocates; tests and tools)."""
    return Hmac(key).digest(data, 0, len(data))


class Hmac:
    """HMAC-SHA256 with a fixed key; the padded key blocks are built once."""

    def __init__(self, key):
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        ipad = bytearray(64)
        opad = bytearray(64)
        for i in range(64):
            k = key[i] if i < len(key) else 0
            ipad[i] = k ^ 0x36
            opad[i] = k ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)
        self._out = bytearray(TAG_HEX)

    def digest(self, buf, start, end):
        h = hashlib.sha256(self._ipad)
        h.update(memoryview(buf)[start:end])
        inner = h.digest()
        h = hashlib.sha256(self._opad)
        h.update(inner)
        return h.digest()

    def tag_hex(self, buf, start, end):
        """The 16-byte tag of buf[start:end] as 32 lower-case hex digits (an internal buffer)."""
        d = self.digest(buf, start, end)
        out = self._out
        for i in range(TAG_BYTES):
            b = d[i]
            out[2 * i] = _HEX[b >> 4]
            out[2 * i + 1] = _HEX[b & 15]
        return out


def ct_equal_hex(expected, got, pos):
    """Constant-time compare of 32 hex digits: expected[0:32] vs got[pos:pos+32].

    Every digit is visited and the differences are OR-ed together: the time does not
    depend on where (or whether) the first mismatch is. Upper-case hex in `got` is
    folded to lower case without a data-dependent branch on the secret side.
    """
    diff = 0
    for i in range(TAG_HEX):
        c = got[pos + i]
        c = c | ((c & 0x40) >> 1)  # 'A'..'F' -> 'a'..'f'; digits have bit 6 clear
        diff = diff | (expected[i] ^ c)
    return diff == 0


def _parse_key_file(text):
    import json

    try:
        d = json.loads(text)
    except ValueError:
        raise KeyFileError("not JSON")
    if not isinstance(d, dict) or d.get("v") != 1:
        raise KeyFileError("expected {\"v\": 1, \"node_id\": ..., \"key\": <64 hex>}")
    key = d.get("key")
    if not isinstance(key, str) or len(key) != 2 * KEY_BYTES:
        raise KeyFileError("key must be 64 hex digits")
    import binascii

    try:
        raw = binascii.unhexlify(key)
    except ValueError:
        raise KeyFileError("key must be 64 hex digits")
    nid = d.get("node_id")
    if not isinstance(nid, str) or not nid:
        raise KeyFileError("node_id missing")
    return nid, raw


class Auth:
    """The node's authentication state: mode, key, highest accepted command counter."""

    def __init__(self, mode, key=None, node_id=None, counter_file=COUNTER_FILE):
        self.mode = mode
        self.node_id = node_id
        self.hmac = Hmac(key) if key is not None else None
        self.counter_file = counter_file
        self.last_counter = self._load_counter() if mode == STRICT else -1
        self.rejects = [0, 0, 0, 0, 0, 0]  # per reason code
        self.problem = None  # why the key file was not used, for the status reply

    @property
    def tagging(self):
        return self.hmac is not None

    def _load_counter(self):
        try:
            with open(self.counter_file) as f:
                v = int(f.read().strip() or "-1")
            return v if -1 <= v <= COUNTER_MAX else -1
        except (OSError, ValueError):
            return -1

    def _store_counter(self, v):
        # Written before the command runs: a reset right after cannot reopen the counter.
        tmp = self.counter_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(v))
        try:
            import os

            os.rename(tmp, self.counter_file)
        except (ImportError, OSError):
            with open(self.counter_file, "w") as f:
                f.write(str(v))

    def tag_into(self, buf, n):
        """Append ' !<32 hex>' to the frame in buf[0:n]; returns the new length."""
        t = self.hmac.tag_hex(buf, 0, n)
        buf[n] = 32
        buf[n + 1] = 33
        for i in range(TAG_HEX):
            buf[n + 2 + i] = t[i]
        return n + 2 + TAG_HEX

    def check_command(self, buf, tag_at, counter, broadcast):
        """Decide on a CRC-valid command addressed to this node (or '*').

        tag_at: index of '!' in buf (the tag token), or -1 when the frame has none.
        Returns ACCEPT or a REJECT_* code, and counts rejects.
        """
        mode = self.mode
        if mode == DEV:
            return ACCEPT
        if mode != STRICT or tag_at < 0:
            return self.reject(REJECT_UNAUTH)
        if broadcast:
            # One tag under one node's key cannot vouch for a frame every node would run.
            return self.reject(REJECT_CROSS)
        if tag_at < 2 or buf[tag_at - 1] != 32:
            return self.reject(REJECT_MALFORMED)
        expected = self.hmac.tag_hex(buf, 0, tag_at - 1)
        if not ct_equal_hex(expected, buf, tag_at + 1):
            return self.reject(REJECT_FORGED)
        if counter < 0 or counter > COUNTER_MAX:
            return self.reject(REJECT_MALFORMED)
        if counter <= self.last_counter:
            return self.reject(REJECT_REPLAY)
        self.last_counter = counter
        try:
            self._store_counter(counter)
        except OSError:
            pass  # flash full/failing: still protected until the next reboot
        return ACCEPT

    def reject(self, code):
        self.rejects[code] += 1
        return code

    @property
    def reject_total(self):
        r = self.rejects
        return r[1] + r[2] + r[3] + r[4] + r[5]


def load(node_id=None, dev=False, key_file=KEY_FILE, counter_file=COUNTER_FILE):
    """Auth from the key file; without one, dev mode if `dev` is set, else locked.

    A key file that names another node, or cannot be parsed, is not used: the node
    stays locked (or dev if enabled) and `auth.problem` says why.
    """
    problem = None
    try:
        with open(key_file) as f:
            text = f.read()
    except OSError:
        text = None
    if text is not None:
        try:
            nid, key = _parse_key_file(text)
            if node_id is not None and nid != node_id:
                raise KeyFileError("key file is for node " + nid)
            return Auth(STRICT, key, nid, counter_file)
        except KeyFileError as e:
            problem = str(e)
    a = Auth(DEV if dev else LOCKED, None, node_id, counter_file)
    a.problem = problem
    return a
