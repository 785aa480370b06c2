"""`canopy repair`: bring every node to its desired state (shadow + consensus findings), journaled."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import CanopyError

DEFAULT_DB = "canopy-monitor.db"

EPILOG = """\
examples:
  canopy repair --shadow var/shadow.json --sim-state var/sim/state.json --dry-run
  canopy repair --shadow var/shadow.json --port n01=/dev/ttyUSB0 --port n02=/dev/ttyUSB1
  canopy consensus --db canopy-monitor.db > verdicts.jsonl
  canopy repair --shadow var/shadow.json --findings verdicts.jsonl --sim-state var/sim/state.json

The plan: push the desired config to nodes whose digest differs (stale or tampered),
set calibration offsets, quarantine or release nodes (consensus findings; never from a
NO_QUORUM verdict). Every step is journaled in the --db file; running the command again
resumes unfinished jobs (offline nodes are retried with backoff until --deadline).
`canopy audit` shows the log. Exit status: 0 all verified, 1 some job failed or was
rolled back by its node, 2 a mistake (bad file, a node refusing our key), 3 some job
still waits (node offline).

The shadow file lists the nodes and what they should be; the smallest one is
  {"config": {}, "nodes": {"n01": {}, "n02": {}}}
(every node on the firmware's default config; docs/repair.md has the format). Nodes that
were given a mesh key by `canopy deploy` / `canopy provision` only obey tagged commands:
pass --master-key (the default key is ~/.config/canopy/mesh_master.key).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "repair", help="push configs, recalibrate, quarantine/release nodes (journaled, resumable)",
        description="Safe, journaled mesh repair from the desired-state shadow and consensus findings.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shadow", default="var/shadow.json", metavar="FILE",
                   help="desired state per node (default var/shadow.json; format in docs/repair.md)")
    p.add_argument("--db", default=DEFAULT_DB, metavar="FILE", help=f"journal/store file (default {DEFAULT_DB})")
    p.add_argument("--port", action="append", default=[], metavar="NODE=PORT",
                   help="serial port of a node (repeatable); PORT may be sim:NODE or socket://")
    p.add_argument("--sim-state", metavar="FILE", help="reach virtual nodes through this `canopy sim` state file")
    p.add_argument("--findings", metavar="FILE",
                   help="consensus output (JSON lines; `-` = stdin): verdicts with per-node faults, or findings")
    p.add_argument("--dry-run", action="store_true", help="print the plan; send and journal nothing")
    p.add_argument("--deadline", type=float, default=120.0, metavar="S",
                   help="stop retrying offline nodes after S seconds (default 120); jobs stay journaled")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="answer timeout per command (default 3)")
    p.add_argument("--json", action="store_true", help="print the plan / result as JSON")
    p.add_argument("--master-key", metavar="FILE",
                   help="mesh master key file: tag every command, believe only verified replies; needed for "
                        "nodes keyed by `canopy deploy`/`provision` (default: the key the --sim-state file "
                        "names, if any; docs/security.md)")
    p.add_argument("--counter-file", metavar="FILE",
                   help="persisted host command counter (default: the security module's, var/security/counter.json)")
    p.set_defaults(func=run)


def parse_ports(specs: list[str], sim_state: str | None, nodes: list[str]) -> dict[str, str]:
    ports: dict[str, str] = {}
    if sim_state:
        from .transport import load_sim_state

        for n in load_sim_state(sim_state)["nodes"]:
            if isinstance(n, dict) and n.get("node_id"):
                ports[str(n["node_id"])] = f"sim:{n['node_id']}"
    for spec in specs:
        node, sep, port = spec.partition("=")
        if not sep or not node or not port:
            raise CanopyError(f"--port {spec!r}: expected NODE=PORT, e.g. n01=/dev/ttyUSB0")
        ports[node] = port
    return ports


def read_findings(path: str) -> list[dict[str, Any]]:
    """Findings from consensus output: verdict lines with a `faults` map, or finding lines."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CanopyError(f"cannot read findings {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CanopyError(f"{path}: not text; --findings takes the JSON lines `canopy consensus` prints") from None
    out: list[dict[str, Any]] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CanopyError(f"{path}:{i}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise CanopyError(f"{path}:{i}: expected a JSON object")
        faults = obj.get("faults")
        if isinstance(faults, dict):
            verdict_ok = obj.get("status", "OK") == "OK"
            for node, f in faults.items():
                if isinstance(f, dict):
                    out.append({"node": node, "actionable": bool(f.get("actionable", verdict_ok)) and verdict_ok,
                                "action": dict(f.get("action") or {}, quantity=(f.get("action") or {}).get(
                                    "quantity", obj.get("quantity")))})
        elif "node" in obj and "action" in obj:
            out.append(obj)
        else:
            raise CanopyError(f"{path}:{i}: neither a verdict with `faults` nor a finding with node/action")
    return out


def run(args: argparse.Namespace) -> int:
    from .shadow import load_shadow

    if not args.deadline >= 0:
        raise CanopyError("--deadline must be 0 or more seconds")
    if not args.timeout > 0:
        raise CanopyError("--timeout must be a positive number of seconds")
    shadow = load_shadow(args.shadow)
    findings = read_findings(args.findings) if args.findings else []
    ports = parse_ports(args.port, args.sim_state, shadow.node_ids())
    if not args.master_key and args.sim_state:
        # As `canopy monitor --sim-state` does: a `canopy sim --master-key` names its key.
        from .transport import load_sim_state

        named = load_sim_state(args.sim_state).get("master_key_file")
        if named:
            args.master_key = str(named)
    if shadow.node_ids() and not ports:
        raise CanopyError("no node has a port: give --sim-state FILE (virtual nodes) or --port NODE=PORT "
                          "for each node of the shadow file")
    return execute(args, shadow, ports, findings)


def _auth_hint(refused: list[str], keyed: bool) -> str:
    """What to do when nodes refuse our commands for authentication: retrying cannot help."""
    nodes = ", ".join(refused)
    if not keyed:
        from .provision import default_master_key_path

        return (f"{nodes} refused an untagged command (err=auth): the node has a mesh key. Pass the master key "
                f"the nodes were provisioned with: --master-key {default_master_key_path()} (the default "
                "`canopy deploy`/`canopy provision` use; docs/security.md)")
    return (f"{nodes} refused our tagged command (err=auth): is --master-key the key the nodes were provisioned "
            "with? (`canopy provision --list` shows each node's key id; docs/security.md)")


def after_monitor(args: argparse.Namespace, seen: dict[str, str]) -> int:
    """`canopy monitor --repair SHADOW`: once the monitor has let go of the ports, repair
    the nodes it saw (node -> port) and journal into the monitor's --db."""
    from .shadow import load_shadow

    shadow = load_shadow(args.repair)
    ports = {n: (f"sim:{n}" if args.sim_state else p) for n, p in seen.items()}
    ns = argparse.Namespace(shadow=args.repair, db=args.db, dry_run=False, deadline=60.0, timeout=3.0,
                            json=False, sim_state=args.sim_state, master_key=getattr(args, "master_key", None),
                            counter_file=None)
    print(f"canopy monitor: repairing against {args.repair} ...", file=sys.stderr)
    return execute(ns, shadow, ports, [])


def execute(args: argparse.Namespace, shadow: Any, ports: dict[str, str], findings: list[dict[str, Any]]) -> int:
    from .repair import (Actual, Journal, NodeOffline, NodeRefused, RepairEngine, SerialClient, plan, status,
                         summary_lines)

    auth = None
    if getattr(args, "master_key", None):
        from .security import DEFAULT_COUNTER_FILE, HostAuth, load_master_key

        auth = HostAuth(load_master_key(Path(args.master_key)),
                        Path(args.counter_file) if args.counter_file else DEFAULT_COUNTER_FILE)
    if not args.dry_run:
        from .store import check_db_file

        check_db_file(args.db, writing=True)  # the journal goes there
    client = SerialClient(ports, timeout=args.timeout, state_file=args.sim_state, auth=auth)
    try:
        actual: dict[str, Actual | None] = {}
        refused: list[str] = []
        # A shadow node no port leads to (not in the sim state, no --port) cannot be
        # reached this run; waiting for it until --deadline would help nobody.
        unreachable = [n for n in shadow.node_ids() if n not in ports]
        for node in shadow.node_ids():
            if node in unreachable:
                actual[node] = None
                continue
            try:
                actual[node] = status(client, node)
            except NodeRefused as exc:
                if exc.err == "auth":
                    refused.append(node)
                    continue
                print(f"canopy repair: {node}: no status ({exc}); its steps wait for it", file=sys.stderr)
                actual[node] = None
            except NodeOffline as exc:
                print(f"canopy repair: {node}: no status ({exc}); its steps wait for it", file=sys.stderr)
                actual[node] = None
        if refused:
            # A key problem, not an offline node: journaling jobs that would be retried
            # until --deadline and then wait forever helps nobody.
            raise CanopyError(_auth_hint(refused, auth is not None))
        p = plan(shadow, actual, findings)
        if unreachable:
            # Not journaled: the plan is made from the shadow again on the next run.
            p.skipped += [(n, "no port for it (not in the --sim-state file, no --port NODE=PORT); planned "
                              "again when a run can reach it") for n in unreachable if any(s.node == n for s in p.steps)]
            p.steps = [s for s in p.steps if s.node not in unreachable]
        if args.json:
            print(json.dumps({"dry_run": args.dry_run,
                              "steps": [{"node": s.node, "action": s.action, "target": s.target, "reason": s.reason}
                                        for s in p.steps],
                              "skipped": [{"node": n, "why": w} for n, w in p.skipped]}))
        else:
            for line in summary_lines(p):
                print(line)
        if args.dry_run:
            if not args.json:
                print("dry run: nothing sent, nothing journaled")
            return 0
        journal = Journal(args.db)
        try:
            engine = RepairEngine(journal, client, shadow)
            mine = {j.id for j in journal.open_jobs()}  # resumed from an earlier run
            mine |= {j.id for j in engine.submit(p)}
            shadow.save()  # findings folded into the desired state stay there
            now = time.time()
            waiting = sorted({j.node for j in journal.open_jobs()
                              if j.id in mine and (actual.get(j.node) is None or j.next_try > now)})
            if waiting and args.deadline > 0:
                # The engine retries quietly with backoff: say how long this may take.
                print(f"canopy repair: retrying {', '.join(waiting)} for up to {args.deadline:g} s (--deadline); "
                      "Ctrl-C stops, the jobs stay journaled and the next run resumes them", file=sys.stderr)
            try:
                engine.run(deadline_s=args.deadline)
            except KeyboardInterrupt:
                print("canopy repair: stopped; unfinished jobs stay journaled (`canopy audit`), the next "
                      "`canopy repair` resumes them", file=sys.stderr)
                raise
            jobs = [j for j in journal.jobs() if j.id in mine]
        finally:
            journal.close()
    finally:
        client.close()
    states = {j.state for j in jobs}
    for j in jobs:
        if not args.json:
            extra = f" ({j.last_error})" if j.last_error else ""
            print(f"job {j.id} {j.node} {j.action} {json.dumps(j.target, sort_keys=True)}: {j.state}{extra}")
    if states & {"FAILED", "ROLLED_BACK"}:
        return 1
    if states & {"PENDING", "STAGED", "ACTIVATED"}:
        return 3
    return 0
