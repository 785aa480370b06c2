"""The simulated mesh for `canopy sim`: topology, UDP ports, fault controls, keys per node.

Each virtual node gets a `"mesh"` section in its `sim.json` (read by the firmware's
`canopy.link.from_flash`, radio `canopy.sim.radio.UdpRadio`)::

    {"port": 47311, "peers": {"n02": 47312}, "loss": 0.0, "delay_ms": 0, "ttl": 4,
     "gateway": true, "seed": 123}

and a control file `mesh.json` in its folder that the radio re-reads when it changes
(partitions, node loss, loss and delay at run time; `canopy mesh` writes it). Spec:
docs/mesh.md.

Usage::

    spec = MeshSpec(topology="line", loss=0.1)
    sections = mesh_sections(["n01", "n02", "n03"], spec)
    write_control(Path("var/sim/n02"), down=True)       # node loss
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import CanopyError
from .security import KEY_FILE_NAME, derive_node_key, key_file_text

TOPOLOGIES = ("line", "ring", "full")
CONTROL_FILE = "mesh.json"


@dataclass
class MeshSpec:
    topology: str = "line"
    loss: float = 0.0
    delay_ms: int = 0
    ttl: int = 4
    gateway: str | None = None  # default: the first node
    base_port: int = 0  # 0 = free ports picked at start

    def validate(self, ids: list[str]) -> None:
        if self.topology not in TOPOLOGIES:
            raise CanopyError(f"unknown mesh topology {self.topology!r} (one of {', '.join(TOPOLOGIES)})")
        if not 0.0 <= self.loss <= 1.0:
            raise CanopyError(f"--mesh-loss must be between 0 and 1, not {self.loss}")
        if not 0 <= self.delay_ms <= 60000:
            raise CanopyError(f"--mesh-delay-ms must be 0..60000, not {self.delay_ms}")
        if not 1 <= self.ttl <= 16:
            raise CanopyError(f"--mesh-ttl must be 1..16, not {self.ttl}")
        if self.gateway is not None and self.gateway not in ids:
            raise CanopyError(f"--gateway {self.gateway!r} is not one of the nodes ({', '.join(ids)})")
        if self.base_port and not 1024 <= self.base_port <= 65535 - len(ids):
            raise CanopyError(f"--mesh-port must leave room for {len(ids)} ports below 65536")


def neighbours(ids: list[str], topology: str) -> dict[str, list[str]]:
    """Who hears whom (symmetric). line: each node hears the next and previous only."""
    n = len(ids)
    out: dict[str, list[str]] = {nid: [] for nid in ids}
    for i, nid in enumerate(ids):
        if topology == "full":
            out[nid] = [x for x in ids if x != nid]
        else:
            near = {i - 1, i + 1}
            if topology == "ring" and n > 2:
                near = {(i - 1) % n, (i + 1) % n}
            out[nid] = [ids[j] for j in sorted(near) if 0 <= j < n and j != i]
    return out


def free_udp_ports(k: int) -> list[int]:
    socks = []
    try:
        for _ in range(k):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def mesh_sections(ids: list[str], spec: MeshSpec, seeds: dict[str, int] | None = None) -> dict[str, dict]:
    """The `sim.json` "mesh" section of every node."""
    spec.validate(ids)
    ports = ([spec.base_port + i for i in range(len(ids))] if spec.base_port else free_udp_ports(len(ids)))
    port = dict(zip(ids, ports))
    gateway = spec.gateway or ids[0]
    near = neighbours(ids, spec.topology)
    return {
        nid: {
            "port": port[nid],
            "peers": {p: port[p] for p in near[nid]},
            "loss": spec.loss,
            "delay_ms": spec.delay_ms,
            "ttl": spec.ttl,
            "gateway": nid == gateway,
            "seed": (seeds or {}).get(nid, i + 1),
        }
        for i, nid in enumerate(ids)
    }


def write_control(folder: Path, **changes: object) -> dict:
    """Merge `changes` (down, blocked, loss, delay_ms) into the node's mesh.json."""
    path = Path(folder) / CONTROL_FILE
    current = read_control(folder)
    for k, v in changes.items():
        if v is None:
            current.pop(k, None)
        else:
            current[k] = v
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(current) + "\n")
    os.replace(tmp, path)  # the node never reads half a file
    return current


def read_control(folder: Path) -> dict:
    try:
        d = json.loads((Path(folder) / CONTROL_FILE).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def partition(folders: dict[str, Path], groups: list[list[str]]) -> None:
    """Nodes in different groups stop hearing each other; nodes in no group keep their links."""
    where = {nid: gi for gi, g in enumerate(groups) for nid in g}
    for g in groups:
        for nid in g:
            if nid not in folders:
                raise CanopyError(f"no node {nid!r} (nodes: {', '.join(folders)})")
    for nid, folder in folders.items():
        if nid in where:
            blocked = sorted(x for x in where if where[x] != where[nid])
            write_control(folder, blocked=blocked)


def provision_virtual(folder: Path, nid: str, master: bytes | None) -> str:
    """Write (or remove) a virtual node's key file; returns the auth mode it will run in."""
    path = Path(folder) / KEY_FILE_NAME
    if master is None:
        if path.exists():
            path.unlink()
        return "dev"
    path.write_text(key_file_text(derive_node_key(master, nid), nid))
    return "strict"
