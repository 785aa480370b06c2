"""The host's node registry: which board (by MAC) is which node, and what it runs.

USB serial numbers do not identify boards: every CP2102 on a cheap DevKit says
"0001". The MAC burnt into the chip does, so provisioning keys each node by MAC and
records its id, zone, board, key id and the firmware/app hashes last deployed. The
file is JSON (``$CANOPY_REGISTRY``, default ``~/.config/canopy/nodes.json``)::

    {"version": 1, "nodes": {"n01": {"mac": "02:1a:...", "zone": "A", "board": "esp32-devkitc",
     "key_id": "3f9c...", "firmware": "...", "app_hash": "...", "usb_serial": "0001",
     "location": "1-1.2", "flashed_at": "...", "healthy": true, "healthy_at": "..."}}}

Usage::

    reg = Registry.load()
    nid = reg.by_mac("02:1a:2b:3c:4d:5e")      # -> "n01" or None
    reg.update("n01", mac="02:1a:2b:3c:4d:5e", zone="A")
    reg.save()
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CanopyError

VERSION = 1
REGISTRY_ENV = "CANOPY_REGISTRY"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Shared factory serial numbers say nothing about which board is which.
GENERIC_SERIALS = frozenset({"", "0001", "0000", "1234567890", "0123456789"})
_LOCK = threading.Lock()  # deploys of several ports update one file


def default_path() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or Path.home() / ".config" / "canopy" / "nodes.json")


def normalise_mac(mac: str | bytes) -> str:
    """`02:1A:2B:3C:4D:5E`, `021a2b3c4d5e` or 6 raw bytes -> `02:1a:2b:3c:4d:5e`."""
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise CanopyError(f"a MAC is 6 bytes, got {len(mac)}")
        return ":".join(f"{b:02x}" for b in mac)
    text = mac.strip().lower().replace("-", ":")
    if ":" not in text and len(text) == 12:
        text = ":".join(text[i:i + 2] for i in range(0, 12, 2))
    if not _MAC_RE.match(text):
        raise CanopyError(f"{mac!r} is not a MAC address (expected 6 hex bytes like 24:0a:c4:12:34:56)")
    return text


@dataclass
class Registry:
    path: Path
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None, *, strict: bool = False) -> Registry:
        """Read the registry; a missing file is empty. A broken file is empty unless `strict`
        (writers use strict, so a typo in the file is reported instead of overwritten)."""
        path = path or default_path()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as exc:
            if strict:
                raise CanopyError(f"cannot read the node registry {path}: {exc}") from exc
            return cls(path)
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if not isinstance(nodes, dict):
            if strict:
                raise CanopyError(f"{path} is not a canopy node registry (no 'nodes' object)")
            return cls(path)
        return cls(path, {str(k): dict(v) for k, v in nodes.items() if isinstance(v, dict)})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"version": VERSION, "nodes": self.nodes}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)  # readers never see a half-written registry

    # -- look-ups ---------------------------------------------------------------------

    def by_mac(self, mac: str | bytes) -> str | None:
        want = normalise_mac(mac)
        for nid, rec in self.nodes.items():
            if rec.get("mac") == want:
                return nid
        return None

    def by_usb(self, serial_number: str | None, location: str | None) -> str | None:
        """Best guess from USB data alone: a unique serial number, else the USB port path
        when the serial is a shared factory default. None when that is ambiguous."""
        serial_number = serial_number or ""
        if serial_number not in GENERIC_SERIALS:
            hits = [n for n, r in self.nodes.items() if r.get("usb_serial") == serial_number]
        elif location:
            hits = [n for n, r in self.nodes.items() if r.get("location") == location]
        else:
            hits = []
        return hits[0] if len(hits) == 1 else None

    # -- updates ----------------------------------------------------------------------

    def update(self, node_id: str, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the node's record (None values are skipped). A MAC already
        registered under another id is refused: one board, one identity."""
        mac = fields.get("mac")
        if mac is not None:
            fields["mac"] = mac = normalise_mac(mac)
            other = self.by_mac(mac)
            if other is not None and other != node_id:
                raise CanopyError(
                    f"MAC {mac} is already registered as {other}; re-provision it as {other} "
                    f"or remove it from {self.path} first"
                )
        rec = self.nodes.setdefault(node_id, {})
        rec.update({k: v for k, v in fields.items() if v is not None})
        return rec


def update_locked(path: Path | None, node_id: str, **fields: Any) -> dict[str, Any]:
    """Load, update one node and save, serialised across this process's threads."""
    with _LOCK:
        reg = Registry.load(path, strict=True)
        rec = reg.update(node_id, **fields)
        reg.save()
        return dict(rec)
