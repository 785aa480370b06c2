"""`canopy`: one CLI for flashing, monitoring, repairing and simulating canopy nodes.

Each verb lives in its own module as `add_parser(subparsers)`, which registers the verb
and sets `func` to a thin function over the shared transport and store.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import CanopyError
from .paths import ToolNotFound

# Verb modules, in the order `canopy --help` lists them.
COMMAND_MODULES = [
    "canopy_host.demo_cmd",
    "canopy_host.monitor_cmd",
    "canopy_host.export_cmd",
    "canopy_host.plot_cmd",
    "canopy_host.flash_cmd",
    "canopy_host.deploy_cmd",
    "canopy_host.provision_cmd",
    "canopy_host.ports_cmd",
    "canopy_host.sim_cmd",
    "canopy_host.mesh_cmd",
    "canopy_host.consensus_cmd",
    "canopy_host.repair_cmd",
    "canopy_host.audit_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canopy",
        description=(
            "Flash, monitor, repair and simulate Canopy nodes (ESP32 + BME280, MicroPython). "
            "Every verb works against virtual nodes too, so you can try it with no hardware."
        ),
        epilog=(
            "Start with `canopy demo` (no hardware, about 40 s). `canopy VERB --help` has the options and "
            "examples of each verb; docs/tutorial.md walks through all of them. Exit status: 0 done, "
            "1 some node failed (flash, deploy, repair), 2 a mistake to fix (an option, file or port; "
            "one line on stderr says which), 3 repair jobs still wait for an offline node, "
            "130 interrupted (Ctrl-C)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"canopy {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CanopyError, ToolNotFound) as exc:
        print(f"canopy {args.verb}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"canopy {args.verb}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # The machine said no (permissions, a full disk, a path that is a folder) where no
        # verb expected it: one line naming the file, not a traceback. Bugs still raise.
        where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
        print(f"canopy {args.verb}: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
