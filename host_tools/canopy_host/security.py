"""Frame authentication, host side: per-node keys, command tags, replay windows.

Spec: docs/security.md. Every node has its own 32-byte key derived from the mesh
master key and the node id, so a key read out of one captured node cannot tag
frames for any other node::

    node_key = HMAC-SHA256(master, b"canopy/node-key/v1/" + node_id)

A tag is HMAC-SHA256(node_key, the frame's bytes from '@' up to, not including,
the space before the '!' tag token), truncated to 16 bytes, sent as 32 hex digits.

Usage::

    from canopy_host.security import derive_node_key, CommandCounter, tag_command
    key = derive_node_key(master, "n01")
    counter = CommandCounter(Path("var/security/counter.json"))
    line = tag_command(key, "n01", counter.next(), "status", {})
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from canopy_host.errors import CanopyError

KEY_BYTES = 32
TAG_BYTES = 16
TAG_HEX = 2 * TAG_BYTES
KDF_LABEL = b"canopy/node-key/v1/"
KEY_FILE_NAME = "canopy_key.json"  # on the node's flash root; written at provisioning
COUNTER_MAX = (1 << 30) - 1  # the node keeps counters as small ints (31-bit on the ESP32)


class SecurityError(CanopyError):
    """A key, key file or counter problem the user can fix."""


def derive_node_key(master: bytes, node_id: str) -> bytes:
    """The node's 32-byte key: HMAC-SHA256(master, "canopy/node-key/v1/" + node_id)."""
    if not isinstance(master, (bytes, bytearray)) or len(master) < 16:
        raise SecurityError("the mesh master key must be at least 16 bytes")
    if not isinstance(node_id, str) or not node_id:
        raise SecurityError("node id must be a non-empty string")
    return hmac.new(bytes(master), KDF_LABEL + node_id.encode("ascii"), hashlib.sha256).digest()
