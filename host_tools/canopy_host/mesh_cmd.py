"""`canopy mesh`: partition, silence or degrade the simulated mesh of running virtual nodes."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CanopyError
from .mesh_sim import partition, read_control, write_control
from .transport import load_sim_state, state_file_path

EXAMPLES = """\
examples:
  canopy sim --nodes 4 --mesh line &          # n01 (gateway) - n02 - n03 - n04
  canopy mesh partition n01,n02 n03,n04       # two islands
  canopy mesh heal                            # everyone back in range
  canopy mesh down n02                        # node loss: n02's radio is silent
  canopy mesh up n02
  canopy mesh loss 0.3 --node n04             # 30 % of n04's packets are lost
  canopy mesh status

Changes take effect at once on the running nodes (each node's radio reads a control file
in its folder) and last until `heal`/`up`, or until the sim stops. partition: every group
hears only itself; a node named in no group keeps its links.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mesh", help="partition or degrade the simulated mesh of `canopy sim` nodes",
        description="Change the simulated ESP-NOW mesh of running virtual nodes (docs/mesh.md).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--state", "--sim-state", dest="state", metavar="FILE", default=None,
                   help="state file of the running `canopy sim --mesh ...` (default $CANOPY_SIM_STATE or "
                        "var/sim/state.json)")
    p.add_argument("action", choices=("status", "partition", "heal", "down", "up", "loss", "delay"))
    p.add_argument("values", nargs="*", metavar="ARG",
                   help="partition: groups like n01,n02 n03; down/up: node ids; loss: P; delay: MS")
    p.add_argument("--node", action="append", default=None, metavar="NODE",
                   help="loss/delay: only these nodes (default all)")
    p.set_defaults(func=run)


def _folders(state_file: str | None) -> dict[str, Path]:
    state = load_sim_state(state_file)
    if state.get("running") is False:
        # The control files would be written, and read by nobody.
        raise CanopyError(f"the `canopy sim` of {state_file_path(state_file)} is not running (stopped "
                          f"{state.get('updated') or 'earlier'}); start it again, e.g. `canopy sim --nodes 4 --mesh line`")
    out = {}
    for n in state["nodes"]:
        if not isinstance(n, dict) or "node_id" not in n or "folder" not in n:
            continue
        if n.get("mesh") is None:
            continue
        out[n["node_id"]] = Path(n["folder"])
    if not out:
        raise CanopyError("the virtual nodes have no mesh; start them with `canopy sim --mesh line`")
    return out


def _pick(folders: dict[str, Path], names: list[str]) -> dict[str, Path]:
    for nid in names:
        if nid not in folders:
            raise CanopyError(f"no mesh node {nid!r} (nodes: {', '.join(folders)})")
    return {nid: folders[nid] for nid in names}


def run(args: argparse.Namespace) -> int:
    folders = _folders(args.state)
    act, vals = args.action, args.values
    if act == "status":
        for nid, folder in folders.items():
            c = read_control(folder)
            print(f"{nid}  {'DOWN' if c.get('down') else 'up'}  blocked={','.join(c.get('blocked', [])) or '-'}"
                  + (f"  loss={c['loss']:g}" if "loss" in c else "")
                  + (f"  delay_ms={c['delay_ms']}" if "delay_ms" in c else ""))
        return 0
    if act == "partition":
        groups = [[x for x in v.split(",") if x] for v in vals]
        if len(groups) < 2:
            raise CanopyError("partition needs at least two groups, e.g. `canopy mesh partition n01,n02 n03`")
        partition(folders, groups)
    elif act == "heal":
        for folder in folders.values():
            write_control(folder, blocked=None, down=None)
    elif act in ("down", "up"):
        if not vals:
            raise CanopyError(f"{act}: name the nodes, e.g. `canopy mesh {act} n02`")
        for folder in _pick(folders, vals).values():
            write_control(folder, down=True if act == "down" else None)
    else:
        if len(vals) != 1:
            raise CanopyError(f"{act}: give one value, e.g. `canopy mesh {act} {'0.2' if act == 'loss' else '50'}`")
        try:
            value: float | int = float(vals[0]) if act == "loss" else int(vals[0])
        except ValueError:
            raise CanopyError(f"{act}: {vals[0]!r} is not a number") from None
        if act == "loss" and not 0 <= value <= 1:
            raise CanopyError("loss must be between 0 and 1")
        if act == "delay" and not 0 <= value <= 60000:
            raise CanopyError("delay must be 0..60000 ms")
        targets = _pick(folders, args.node) if args.node else folders
        for folder in targets.values():
            write_control(folder, **{"loss" if act == "loss" else "delay_ms": value})
    print(f"mesh: {act} {' '.join(vals)}".rstrip())
    return 0
