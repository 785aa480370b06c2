"""Per-node shadow: what each node SHOULD run (desired) next to what it reports (actual).

Desired state comes from a JSON file the operator (or `canopy repair` after consensus
findings) maintains::

    {
      "config": {"version": 4, "t_setpoint": 2450},      # mesh-wide, over the defaults
      "nodes": {
        "n01": {"quarantine": false, "cal": {"t": -35}},
        "n02": {"config": {"safe_fan": 2500}}              # per-node overrides (optional)
      }
    }

A node's desired config is the firmware defaults, then the mesh-wide `config`, then its
own overrides, validated by the firmware's own `canopy/config.py` (loaded from the
repository), so the digest here is byte-for-byte the one the node computes.

Actual state is what `repair_status` answered last: config version and digest, trial
and quarantine flags, staged version, calibration offsets.

Usage::

    from canopy_host.shadow import load_shadow
    sh = load_shadow("var/shadow.json")
    want = sh.desired("n01")          # Desired(config=..., version=4, digest='..', ...)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import CanopyError
from .paths import FIRMWARE_DIR

CHANNELS = ("t", "p", "h")
DEFAULT_SHADOW = Path("var/shadow.json")


@lru_cache(maxsize=1)
def firmware_config() -> ModuleType:
    """The node's canopy/config.py, run under CPython (it is plain Python).

    The firmware package is registered as `canopy` (its modules import each other by that
    name, e.g. config -> configdigest); host code never uses that name otherwise.
    """
    pkg_dir = FIRMWARE_DIR / "canopy"
    pkg = sys.modules.get("canopy")
    if pkg is None:
        spec = importlib.util.spec_from_file_location("canopy", pkg_dir / "__init__.py",
                                                      submodule_search_locations=[str(pkg_dir)])
        if spec is None or spec.loader is None:
            raise CanopyError(f"cannot load the firmware package {pkg_dir}")
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["canopy"] = pkg
        spec.loader.exec_module(pkg)
    elif Path(next(iter(getattr(pkg, "__path__", [""])), "")).resolve() != pkg_dir.resolve():
        raise CanopyError(f"another module named 'canopy' is loaded ({pkg}); cannot load {pkg_dir}")
    return importlib.import_module("canopy.config")


@dataclass(frozen=True)
class Desired:
    config: dict[str, Any]
    version: int
    digest: str
    cal: tuple[int, int, int] | None  # None: calibration not managed for this node
    quarantine: bool

    def canonical(self) -> bytes:
        return firmware_config().canonical_json(self.config).encode()


@dataclass
class Actual:
    cfg_version: int
    cfg_digest: str
    trial: bool = False
    quarantine: bool = False
    staged: int = 0
    cal: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def from_reply(cls, f: dict[str, Any]) -> Actual:
        try:
            cal = tuple(int(x) for x in str(f.get("cal", "0,0,0")).split(","))
            if len(cal) != 3:
                raise ValueError
            return cls(int(f["cfg_version"]), str(f["cfg_digest"]), bool(f.get("trial", 0)),
                       bool(f.get("quar", 0)), int(f.get("staged", 0)), cal)  # type: ignore[arg-type]
        except (KeyError, ValueError, TypeError) as exc:
            raise CanopyError(f"node status reply is missing or has bad fields: {f}") from exc

    def as_dict(self) -> dict[str, Any]:
        return {"cfg_version": self.cfg_version, "cfg_digest": self.cfg_digest, "trial": self.trial,
                "quarantine": self.quarantine, "staged": self.staged, "cal": list(self.cal)}


@dataclass
class Shadow:
    config: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    def node_ids(self) -> list[str]:
        return sorted(self.nodes)

    def desired(self, node: str) -> Desired:
        fw = firmware_config()
        spec = self.nodes.get(node, {})
        over = dict(self.config)
        over.update(spec.get("config") or {})
        try:
            cfg = fw.merged(over)
        except ValueError as exc:
            raise CanopyError(f"shadow: desired config for {node}: {exc}") from None
        cal = spec.get("cal")
        cal_t = None
        if cal is not None:
            if not isinstance(cal, dict) or set(cal) - set(CHANNELS) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in cal.values()):
                raise CanopyError(f"shadow: {node}.cal must map t/p/h to ints, got {cal!r}")
            cal_t = tuple(int(cal.get(c, 0)) for c in CHANNELS)
        q = spec.get("quarantine", False)
        if not isinstance(q, bool):
            raise CanopyError(f"shadow: {node}.quarantine must be true or false")
        return Desired(cfg, cfg["version"], fw.digest(cfg), cal_t, q)  # type: ignore[arg-type]

    # -- edits made by the repair planner --------------------------------------------

    def set_quarantine(self, node: str, on: bool) -> None:
        self.nodes.setdefault(node, {})["quarantine"] = on

    def set_cal(self, node: str, channel: str, offset: int) -> None:
        spec = self.nodes.setdefault(node, {})
        cal = dict(spec.get("cal") or {})
        cal[channel] = int(offset)
        spec["cal"] = cal

    def adjust_cal(self, node: str, channel: str, delta: int) -> None:
        cal = (self.nodes.get(node) or {}).get("cal") or {}
        self.set_cal(node, channel, int(cal.get(channel, 0)) + int(delta))

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "nodes": self.nodes}

    def save(self, path: str | os.PathLike[str] | None = None) -> None:
        p = Path(path) if path else self.path
        if p is None:
            raise CanopyError("shadow: no file to save to")
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, p)  # a crash mid-save keeps the previous file whole


def load_shadow(path: str | os.PathLike[str]) -> Shadow:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CanopyError(f"no shadow file {str(p)!r} (desired state: see docs/repair.md)") from None
    except (OSError, ValueError) as exc:
        raise CanopyError(f"cannot read shadow file {str(p)!r}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config", {}), dict) \
            or not isinstance(data.get("nodes", {}), dict):
        raise CanopyError(f"{str(p)!r}: expected {{\"config\": {{...}}, \"nodes\": {{...}}}}")
    nodes = data.get("nodes", {})
    for nid, spec in nodes.items():
        if not isinstance(spec, dict):
            raise CanopyError(f"{str(p)!r}: nodes.{nid} must be an object")
    sh = Shadow(dict(data.get("config", {})), {k: dict(v) for k, v in nodes.items()}, p)
    for nid in sh.nodes:
        sh.desired(nid)  # every problem reported now, before any node is touched
    return sh
