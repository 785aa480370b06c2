"""Provisioning: give a node its identity and mesh key, and remember it by MAC.

Over the raw REPL (mpremote's `SerialTransport`) the host reads the chip's MAC
(`machine.unique_id()`, the factory MAC on an ESP32; a stable fake one on a virtual
node), picks the node id (the one the registry has for that MAC, else the one asked
for, else the id a virtual node's sim.json gives, else the next free `nNN`), then
writes two files to the node's flash root:

- ``identity.json``: ``{"version": 1, "node_id": "n01", "zone": "A", "key_id": "..."}``;
  ``key_id`` (first 8 bytes of sha256(key), hex) names the key in the registry
  without revealing it.
- the key file, exactly as docs/security.md specifies (``canopy_key.json``,
  ``security.key_file_text``): ``{"v": 1, "node_id": "n01", "key": "<64 hex>"}`` with
  the node key ``derive_node_key(master, node_id)``.

The node uses the key only if its ``node_id`` is the node's own id (docs/security.md):
a virtual node's sim.json id, an ESP32's ``machine.unique_id()`` in hex. So that is
the default id of a new board; another ``--node-id`` is recorded with a warning.

Usage::

    from mpremote.transport_serial import SerialTransport
    t = SerialTransport("/dev/ttyUSB0"); t.enter_raw_repl(soft_reset=False)
    result = provision_node(t, board="esp32-devkitc", zone="A", master=load_master_key())
    result.node_id, result.mac
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import registry as _registry
from .boards import Board
from .errors import CanopyError

from .security import KEY_FILE_NAME, derive_node_key, key_file_text

IDENTITY_FILE = "identity.json"
MASTER_KEY_ENV = "CANOPY_MASTER_KEY_FILE"
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")

# Runs on the node (MicroPython): what the chip says about itself, as one JSON line.
# Each node-side script is one function: module-level names in the raw REPL live in
# the shared __main__ globals, where the unix port was seen losing one mid-script.
_PROBE = """
def _canopy_probe(identity_file):
    import sys, json, binascii
    r = {"platform": sys.platform, "version": ".".join(str(x) for x in sys.implementation.version[:3])}
    mac = None
    try:
        import machine
        mac = binascii.hexlify(machine.unique_id()).decode()
    except Exception:
        pass
    if not mac or len(mac) != 12:
        try:
            import network
            mac = binascii.hexlify(network.WLAN(network.STA_IF).config("mac")).decode()
        except Exception:
            pass
    r["mac"] = mac
    for k, fn in (("identity", identity_file), ("sim", "sim.json")):
        try:
            with open(fn) as f:
                r[k] = json.load(f)
        except Exception:
            r[k] = None
    print(json.dumps(r))
_canopy_probe(%r)
"""


def check_board_fits(board: Board, platform: str) -> None:
    """A virtual board for a chip, or a chip's board for a virtual node, is a mix-up the
    node can tell us about (sys.platform): the registry would carry the wrong board and
    a deploy would copy code built for the wrong machine."""
    virtual = board.chip == "unix"
    if virtual != (platform == "linux"):
        runs_on = "the unix port (a virtual node)" if platform == "linux" else f"{platform} (a real chip)"
        want = "--board unix-sim" if platform == "linux" else "the board's own --board (see `canopy ports`)"
        raise CanopyError(f"--board {board.name} does not fit this node: it runs MicroPython on {runs_on}; "
                          f"use {want}")


@dataclass
class NodeFacts:
    mac: str
    platform: str
    version: str
    identity: dict[str, Any] | None
    sim_node_id: str | None

    @property
    def own_id(self) -> str:
        """The id the app calls itself (canopy.link.default_node_id)."""
        nid = (self.identity or {}).get("node_id")
        if isinstance(nid, str) and _NODE_ID_RE.match(nid):
            return nid
        if self.sim_node_id and _NODE_ID_RE.match(self.sim_node_id):
            return self.sim_node_id
        return self.mac.replace(":", "")

    @property
    def firmware(self) -> str:
        return f"micropython {self.version} {self.platform}"


@dataclass
class ProvisionResult:
    node_id: str
    mac: str
    zone: str | None
    board: str
    key_id: str
    firmware: str
    was_known: bool
    warning: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def default_master_key_path() -> Path:
    return Path(os.environ.get(MASTER_KEY_ENV) or Path.home() / ".config" / "canopy" / "mesh_master.key")


def load_master_key(path: Path | None = None, *, create: bool = True) -> bytes:
    """The mesh master key (hex in a file, owner-only). Created with 32 random bytes when
    missing and `create` is set: losing it means re-provisioning every node."""
    path = path or default_master_key_path()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise CanopyError(f"no mesh master key at {path}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
        return key
    except OSError as exc:
        raise CanopyError(f"cannot read the mesh master key {path}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise CanopyError(f"{path} must hold the master key as hex digits") from None
    if len(key) < 16:
        raise CanopyError(f"the master key in {path} is {len(key)} bytes; at least 16 are needed")
    return key


def run_json(transport: Any, code: str, what: str) -> Any:
    """exec `code` on the node and parse the last line it prints as JSON."""
    from mpremote.transport import TransportError

    try:
        out = transport.exec(code)
    except TransportError as exc:
        detail = str(exc).strip().splitlines()
        raise CanopyError(f"{what} failed on the node: {detail[-1] if detail else exc}") from exc
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise CanopyError(f"{what}: the node answered {out[:200]!r}, not JSON") from None


def read_facts(transport: Any) -> NodeFacts:
    r = run_json(transport, _PROBE % IDENTITY_FILE, "reading the node's MAC")
    if not r.get("mac"):
        raise CanopyError("the node reports no MAC (machine.unique_id() and network.WLAN().config('mac') failed)")
    sim = r.get("sim") if isinstance(r.get("sim"), dict) else {}
    ident = r.get("identity") if isinstance(r.get("identity"), dict) else None
    return NodeFacts(mac=_registry.normalise_mac(r["mac"]), platform=str(r.get("platform")),
                     version=str(r.get("version")), identity=ident,
                     sim_node_id=sim.get("node_id") if isinstance(sim.get("node_id"), str) else None)


def choose_node_id(facts: NodeFacts, reg: _registry.Registry, requested: str | None) -> tuple[str, bool]:
    """(node id, known before). The MAC decides: a board keeps its id across re-provisioning."""
    known = reg.by_mac(facts.mac)
    if requested is not None:
        if not _NODE_ID_RE.match(requested):
            raise CanopyError(f"node id {requested!r} must be 1..16 characters of A-Z a-z 0-9 _ -")
        if known is not None and known != requested:
            raise CanopyError(f"this board (MAC {facts.mac}) is registered as {known}, not {requested}; "
                              f"drop --node-id or remove {known} from {reg.path}")
        other = reg.nodes.get(requested, {}).get("mac")
        if other and other != facts.mac:
            raise CanopyError(f"node id {requested} already belongs to the board with MAC {other}")
        return requested, known is not None
    if known is not None:
        return known, True
    own = facts.own_id
    if own in reg.nodes:
        raise CanopyError(f"node id {own} is registered to the board with MAC {reg.nodes[own].get('mac')}; "
                          "give this board another --node-id")
    return own, False


def identity_files(node_id: str, zone: str | None, master: bytes) -> tuple[dict[str, bytes], str]:
    key = derive_node_key(master, node_id)
    kid = key_id(key)
    ident = {"version": 1, "node_id": node_id, "zone": zone, "key_id": kid}
    return ({IDENTITY_FILE: (json.dumps(ident) + "\n").encode(),
             KEY_FILE_NAME: key_file_text(key, node_id).encode()}, kid)


def write_file_atomic(transport: Any, path: str, data: bytes, progress: Any = None,
                      chunk_size: int = 1024) -> None:
    """Write to `path.part`, then rename over `path`: an interrupted copy never leaves
    a truncated module under its real name (the stale `.part` is cleaned up later)."""
    from mpremote.transport import TransportError

    part = path + ".part"
    try:
        transport.fs_writefile(part, data, chunk_size=chunk_size, progress_callback=progress)
        transport.exec(
            "import os\ntry:\n os.rename(%r,%r)\nexcept OSError:\n os.remove(%r)\n os.rename(%r,%r)"
            % (part, path, path, part, path)
        )
    except (TransportError, OSError) as exc:
        raise CanopyError(f"writing {path} on the node failed: {str(exc).strip()[-200:]}") from exc


def provision_node(transport: Any, board: str, master: bytes, zone: str | None = None,
                   node_id: str | None = None, registry_path: Path | None = None,
                   usb_serial: str | None = None, location: str | None = None,
                   facts: NodeFacts | None = None) -> ProvisionResult:
    """Identity + key onto a node in the raw REPL; the registry maps its MAC to the id."""
    facts = facts or read_facts(transport)
    reg = _registry.Registry.load(registry_path, strict=True)
    nid, known = choose_node_id(facts, reg, node_id)
    if zone is None:
        zone = reg.nodes.get(nid, {}).get("zone") or (facts.identity or {}).get("zone")
    files, kid = identity_files(nid, zone, master)
    for path, data in files.items():
        write_file_atomic(transport, path, data)
    _registry.update_locked(
        reg.path, nid, mac=facts.mac, zone=zone, board=board, key_id=kid, firmware=facts.firmware,
        usb_serial=usb_serial, location=location,
        provisioned_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    warning = None
    if nid != facts.own_id:
        warning = f"this board called itself {facts.own_id}; it takes the id {nid} from identity.json at its next boot"
    return ProvisionResult(node_id=nid, mac=facts.mac, zone=zone, board=board, key_id=kid,
                           firmware=facts.firmware, was_known=known, warning=warning)


def sim_mac(node_id: str) -> str:
    """The fake MAC a virtual node reports (same derivation as firmware/canopy/sim/boot.py)."""
    mac = bytearray(hashlib.sha256(b"canopy-sim-mac:" + node_id.encode()).digest()[:6])
    mac[0] = (mac[0] & 0xFC) | 0x02
    return _registry.normalise_mac(bytes(mac))
