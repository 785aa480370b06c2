"""Journaled mesh repair: per-node jobs driven through PENDING -> STAGED -> ACTIVATED -> VERIFIED.

The planner compares the shadow's desired state with what each node reports and with
the consensus findings, and makes one job per needed action:

    push_config   the node's config digest differs (stale or tampered): stage it in
                  chunks, activate it, verify it survived the node's trial
    recalibrate   set a channel's calibration offset (from a consensus `recalibrate`)
    quarantine    actuators to failsafe, node out of consensus
    release       undo the quarantine once the node agrees again

Every state change and its audit entry are committed in ONE SQLite transaction
(`repair_jobs` + `repair_audit`, in the monitor's store file), BEFORE the engine goes
on, so a host crash at any point resumes from the journal: each node command is
idempotent and every step starts by asking the node where it is (`repair_status`).
Offline nodes are retried with exponential backoff. A node is never sent a config
older than the one it runs; findings from a NO_QUORUM verdict are never acted on.

Usage::

    from canopy_host.repair import Journal, RepairEngine, plan, SerialClient
    journal = Journal("canopy-monitor.db")
    client = SerialClient({"n01": "sim:n01"})
    steps = plan(shadow, {n: client.status(n) for n in shadow.node_ids()}, findings)
    engine = RepairEngine(journal, client, shadow)
    engine.submit(steps)
    engine.run(deadline_s=120)
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import CanopyError
from .shadow import CHANNELS, Actual, Desired, Shadow
from .store import open_db

STATES = ("PENDING", "STAGED", "ACTIVATED", "VERIFIED", "ROLLED_BACK", "SUPERSEDED", "FAILED")
TERMINAL = frozenset({"VERIFIED", "ROLLED_BACK", "SUPERSEDED", "FAILED"})
ACTIONS = ("push_config", "recalibrate", "quarantine", "release")
# Legal moves; the tests check every journaled transition against this table.
TRANSITIONS: dict[str, frozenset[str]] = {
    "PENDING": frozenset({"STAGED", "ACTIVATED", "VERIFIED", "SUPERSEDED", "FAILED"}),
    "STAGED": frozenset({"PENDING", "ACTIVATED", "VERIFIED", "SUPERSEDED", "FAILED"}),
    "ACTIVATED": frozenset({"PENDING", "VERIFIED", "ROLLED_BACK", "SUPERSEDED", "FAILED"}),
}
CHUNK_HEX = 62  # hex chars per text value; two values per cfg_chunk frame (node: CHUNK_BYTES)
MAX_FRAME = 250
# consensus JSON units -> node units (docs/fixed-point.md): 0.01 degC, Pa, 1/1024 %RH
NODE_SCALE = {"t": 100, "p": 100, "h": 1024}


class NodeOffline(Exception):
    """No answer (node down, partitioned, reply lost). The job is retried later."""


class NodeRefused(CanopyError):
    """The node answered with an error frame."""

    def __init__(self, node: str, err: str, msg: str = "") -> None:
        super().__init__(f"{node} refused: {err} {msg}".strip())
        self.err = err
        self.msg = msg


class NodeClient(Protocol):
    def request(self, node: str, cmd: str, args: Mapping[str, object]) -> dict[str, Any]: ...


def status(client: NodeClient, node: str) -> Actual:
    return Actual.from_reply(client.request(node, "repair_status", {}))


# ----------------------------------------------------------------- wire encoding

def encode_repair_command(node: str, counter: int, cmd: str, args: Mapping[str, object]) -> bytes:
    """A command line for the repair commands (docs/protocol.md layout, CRC-32)."""
    toks = [b"@CNP1", node.encode(), b"0", str(counter).encode(), b"C", cmd.encode()]
    for k, v in args.items():
        val = str(int(v)) if isinstance(v, (int, bool)) else str(v)
        if " " in val or "@" in val or len(val) > 64:
            raise CanopyError(f"repair: argument {k}={val!r} cannot be sent")
        toks.append(f"{k}={val}".encode())
    body = b" ".join(toks)
    line = body + b" *%08x\n" % zlib.crc32(body)
    if len(line) > MAX_FRAME:
        raise CanopyError(f"repair: {cmd} frame would be {len(line)} bytes (limit {MAX_FRAME})")
    return line


def tag_line(line: bytes, key: bytes) -> bytes:
    """Add the HMAC tag token (docs/security.md) to a command line: the tag covers the line
    up to the ` !` token, the CRC everything up to ` *`."""
    from .security import tag_bytes

    body = line[: line.rindex(b" *")]
    tagged = body + b" !" + tag_bytes(key, body).hex().encode()
    out = tagged + b" *%08x\n" % zlib.crc32(tagged)
    if len(out) > MAX_FRAME:
        raise CanopyError(f"repair: tagged frame would be {len(out)} bytes (limit {MAX_FRAME})")
    return out


def config_chunks(data: bytes) -> list[dict[str, object]]:
    """cfg_chunk arguments covering `data`: two x-prefixed hex values per frame."""
    out: list[dict[str, object]] = []
    step = CHUNK_HEX  # bytes per frame: 2 values x CHUNK_HEX/2 bytes
    for off in range(0, len(data), step):
        piece = data[off:off + step].hex()
        args: dict[str, object] = {"off": off, "a": "x" + piece[:CHUNK_HEX]}
        if len(piece) > CHUNK_HEX:
            args["b"] = "x" + piece[CHUNK_HEX:]
        out.append(args)
    return out


class SerialClient:
    """Talks to nodes over their serial ports (physical, pty, sim:NODE, socket://)."""

    def __init__(self, ports: Mapping[str, str], *, timeout: float = 3.0, state_file: str | None = None,
                 auth: Any = None) -> None:
        self.ports = dict(ports)
        # canopy_host.security.HostAuth for strict nodes: tagged commands with the
        # persisted counter, and only replies whose tag verifies are believed.
        self.auth = auth
        self.state_file = state_file  # for sim:NODE ports (re-resolved at every open)
        self.timeout = timeout
        self._counter = int(time.time() * 1000) % 10**9  # increasing across runs
        self._open: dict[str, Any] = {}

    def _port(self, node: str) -> Any:
        from .transport import open_port, resolve_port

        port = self._open.get(node)
        if port is None:
            try:
                # exclusive: a monitor following the same port would eat the replies
                port = open_port(resolve_port(self.ports[node], self.state_file), timeout=0.05, exclusive=True)
            except KeyError:
                raise NodeOffline(f"{node}: no port known (give --port {node}=PORT or --sim-state)") from None
            except CanopyError as exc:
                raise NodeOffline(str(exc)) from None
            self._open[node] = port
        return port

    def close(self) -> None:
        for port in self._open.values():
            try:
                port.close()
            except OSError:
                pass
        self._open.clear()

    def request(self, node: str, cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        from .protocol import FrameParser

        if self.auth is not None:
            counter = self.auth.counter.next()
            line = tag_line(encode_repair_command(node, counter, cmd, args), self.auth.key(node))
        else:
            self._counter += 1
            counter = self._counter
            line = encode_repair_command(node, counter, cmd, args)
        port = self._port(node)
        parser = FrameParser()
        unverified = None  # the verdict on an answer to this command whose tag did not verify
        try:
            port.reset_input_buffer()  # old readings are of no interest here
            port.write(line)
            end = time.monotonic() + self.timeout
            while time.monotonic() < end:
                for f in parser.feed(port.read(4096)):
                    if f.node != node or f.fields.get("re") != counter:
                        continue
                    if self.auth is not None and (verdict := self.auth.verify(f)) != "ok":
                        unverified = verdict  # forged or replayed: not the node's answer
                        continue
                    if f.kind == "reply":
                        return dict(f.fields)
                    if f.kind == "error":
                        raise NodeRefused(node, str(f.fields.get("err")), str(f.fields.get("msg", "")))
        except (OSError, ValueError) as exc:  # unplugged mid-request, port closed under us
            self._open.pop(node, None)
            try:
                port.close()
            except OSError:
                pass
            raise NodeOffline(f"{node}: {exc}") from None
        if unverified is not None:
            # Still not believed (anyone can write that line), but the likely cause is ours.
            raise NodeOffline(f"{node}: an answer to {cmd} came back but its tag does not verify ({unverified}): "
                              "is --master-key the key the nodes were provisioned with?")
        raise NodeOffline(f"{node}: no answer to {cmd} within {self.timeout} s")


# ----------------------------------------------------------------- planning

@dataclass(frozen=True)
class Step:
    node: str
    action: str
    target: dict[str, Any]
    reason: str


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node, why)


def _finding_fields(f: Any) -> tuple[str, bool, str, str | None, float | None, str]:
    if isinstance(f, Mapping):
        a = f.get("action") or {}
        return (str(f.get("node")), bool(f.get("actionable")), str(a.get("kind", "none")),
                a.get("quantity") or f.get("quantity"), a.get("offset"), str(a.get("reason", "")))
    a = f.action
    return f.node, bool(f.actionable), a.kind, a.quantity or getattr(f, "quantity", None), a.offset, a.reason


def apply_findings(shadow: Shadow, findings: Iterable[Any], plan_: Plan) -> None:
    """Fold consensus recommendations into the desired state (never on NO_QUORUM)."""
    for f in findings:
        node, actionable, kind, quantity, offset, reason = _finding_fields(f)
        if kind == "none":
            continue
        if not actionable:
            plan_.skipped.append((node, f"{kind} not actionable (no quorum): nothing done"))
            continue
        if kind == "quarantine":
            shadow.set_quarantine(node, True)
        elif kind == "release":
            shadow.set_quarantine(node, False)
        elif kind == "recalibrate":
            if quantity not in NODE_SCALE or offset is None:
                plan_.skipped.append((node, f"recalibrate without quantity/offset: {f}"))
                continue
            # The consensus offset is measured on what the node reports, which already
            # includes its calibration, so the correction adds to the current value.
            shadow.adjust_cal(node, quantity, -round(float(offset) * NODE_SCALE[quantity]))
        elif kind == "push_config":
            pass  # the digest comparison below pushes the desired config
        else:
            plan_.skipped.append((node, f"unknown action {kind!r}"))


def plan(shadow: Shadow, actual: Mapping[str, Actual | None], findings: Iterable[Any] = ()) -> Plan:
    """Steps that bring every node's actual state to the desired one.

    `actual[node]` is None for a node that did not answer: it still gets its steps
    (they wait in the journal with backoff until it is back).
    """
    p = Plan()
    apply_findings(shadow, findings, p)
    for node in shadow.node_ids():
        want: Desired = shadow.desired(node)
        have = actual.get(node)
        if have is not None and have.cfg_version > want.version:
            p.skipped.append((node, f"runs config v{have.cfg_version}, newer than desired "
                                    f"v{want.version}: never rolled back"))
        elif have is None or have.cfg_digest != want.digest:
            why = "offline: digest unknown" if have is None else (
                f"stale (v{have.cfg_version})" if have.cfg_version < want.version
                else f"digest mismatch at v{have.cfg_version} (tampered?)")
            p.steps.append(Step(node, "push_config", {"version": want.version, "digest": want.digest}, why))
        if want.cal is not None:
            for i, ch in enumerate(CHANNELS):
                if have is None or have.cal[i] != want.cal[i]:
                    p.steps.append(Step(node, "recalibrate", {"channel": ch, "offset": want.cal[i]},
                                        f"{ch} offset {have.cal[i] if have else '?'} -> {want.cal[i]}"))
        if have is None or have.quarantine != want.quarantine:
            if want.quarantine:
                p.steps.append(Step(node, "quarantine", {"on": 1}, "quarantine: actuators to failsafe"))
            elif have is not None:
                p.steps.append(Step(node, "release", {"on": 0}, "agrees again: release"))
    return p


# ----------------------------------------------------------------- the journal

@dataclass
class Job:
    id: int
    node: str
    action: str
    target: dict[str, Any]
    state: str
    attempts: int
    next_try: float
    reason: str
    last_error: str | None


class Journal:
    """repair_jobs + repair_audit in the store file; each change is one transaction."""

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.con = open_db(self.path)
        self.now = clock

    def close(self) -> None:
        self.con.close()

    def _audit(self, node: str, job: int | None, action: str, event: str, state: str | None,
               detail: Mapping[str, Any]) -> None:
        self.con.execute(
            "INSERT INTO repair_audit (time, node, job, action, event, state, detail) VALUES (?,?,?,?,?,?,?)",
            (self.now(), node, job, action, event, state, json.dumps(dict(detail), sort_keys=True)))

    def note(self, node: str, action: str, event: str, detail: Mapping[str, Any]) -> None:
        with self.con:
            self._audit(node, None, action, event, None, detail)

    def add(self, step: Step) -> Job:
        now = self.now()
        with self.con:
            cur = self.con.execute(
                "INSERT INTO repair_jobs (created, updated, node, action, target, state, reason) "
                "VALUES (?,?,?,?,?, 'PENDING', ?)",
                (now, now, step.node, step.action, json.dumps(step.target, sort_keys=True), step.reason))
            jid = int(cur.lastrowid or 0)
            self._audit(step.node, jid, step.action, "planned", "PENDING",
                        {"target": step.target, "reason": step.reason})
        return Job(jid, step.node, step.action, dict(step.target), "PENDING", 0, 0.0, step.reason, None)

    def move(self, job: Job, state: str, **detail: Any) -> None:
        if state != job.state and state not in TRANSITIONS.get(job.state, frozenset()):
            raise CanopyError(f"repair: illegal transition {job.state} -> {state} (job {job.id})")
        with self.con:
            self.con.execute("UPDATE repair_jobs SET state=?, updated=?, next_try=0, attempts=0, "
                             "last_error=NULL WHERE id=?", (state, self.now(), job.id))
            self._audit(job.node, job.id, job.action, "state", state, {"from": job.state, **detail})
        job.state, job.next_try, job.attempts, job.last_error = state, 0.0, 0, None

    def retry(self, job: Job, error: str, next_try: float) -> None:
        with self.con:
            self.con.execute("UPDATE repair_jobs SET attempts=attempts+1, next_try=?, last_error=?, updated=? "
                             "WHERE id=?", (next_try, error, self.now(), job.id))
            self._audit(job.node, job.id, job.action, "retry", job.state,
                        {"error": error, "attempt": job.attempts + 1, "next_try": round(next_try, 3)})
        job.attempts += 1
        job.next_try = next_try
        job.last_error = error

    def wait(self, job: Job, why: str, next_try: float) -> None:
        with self.con:
            self.con.execute("UPDATE repair_jobs SET next_try=?, updated=? WHERE id=?",
                             (next_try, self.now(), job.id))
        job.next_try = next_try

    def open_jobs(self) -> list[Job]:
        rows = self.con.execute(
            "SELECT id, node, action, target, state, attempts, next_try, reason, last_error FROM repair_jobs "
            f"WHERE state NOT IN ({','.join('?' * len(TERMINAL))}) ORDER BY id", tuple(sorted(TERMINAL)))
        return [Job(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7] or "", r[8]) for r in rows]

    def jobs(self) -> list[Job]:
        rows = self.con.execute("SELECT id, node, action, target, state, attempts, next_try, reason, "
                                "last_error FROM repair_jobs ORDER BY id")
        return [Job(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7] or "", r[8]) for r in rows]


def audit_entries(con: sqlite3.Connection, *, node: str | None = None, since: float | None = None,
                  until: float | None = None) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []
    if node:
        where.append("node = ?")
        args.append(node)
    if since is not None:
        where.append("time >= ?")
        args.append(since)
    if until is not None:
        where.append("time <= ?")
        args.append(until)
    sql = "SELECT id, time, node, job, action, event, state, detail FROM repair_audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time, id"
    out = []
    for r in con.execute(sql, args):
        out.append({"id": r[0], "time": r[1], "node": r[2], "job": r[3], "action": r[4],
                    "event": r[5], "state": r[6], "detail": json.loads(r[7]) if r[7] else {}})
    return out


# ----------------------------------------------------------------- the engine

class RealClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, s: float) -> None:
        time.sleep(max(0.0, s))


class RepairEngine:
    """Drives the journal's open jobs to a terminal state, one idempotent step at a time."""

    def __init__(self, journal: Journal, client: NodeClient, shadow: Shadow, *, clock: Any = None,
                 backoff: float = 1.0, max_backoff: float = 60.0, max_attempts: int = 30,
                 trial_wait: float = 1.0) -> None:
        self.journal = journal
        self.client = client
        self.shadow = shadow
        self.clock = clock or RealClock()
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.trial_wait = trial_wait

    def submit(self, p: Plan) -> list[Job]:
        """Journal the plan. An open job for the same node and action with another target
        is superseded (a newer desired state wins; the node never sees the old one)."""
        for node, why in p.skipped:
            self.journal.note(node, "plan", "skipped", {"why": why})
        open_jobs = self.journal.open_jobs()
        new: list[Job] = []
        for step in p.steps:
            same = [j for j in open_jobs if j.node == step.node and _slot(j.action, j.target) ==
                    _slot(step.action, step.target)]
            if any(j.target == step.target and j.action == step.action for j in same):
                continue  # already in the journal (a resumed or repeated run)
            for j in same:
                self.journal.move(j, "SUPERSEDED", by=step.target)
                open_jobs.remove(j)
            job = self.journal.add(step)
            open_jobs.append(job)
            new.append(job)
        return new

    def run(self, deadline_s: float | None = None) -> dict[str, int]:
        """Work until every job is terminal or `deadline_s` (clock seconds) has passed."""
        start = self.clock.now()
        while True:
            jobs = self.journal.open_jobs()
            if not jobs:
                break
            now = self.clock.now()
            due = [j for j in jobs if j.next_try <= now]
            if not due:
                wake = min(j.next_try for j in jobs)
                if deadline_s is not None and wake - start > deadline_s:
                    break
                self.clock.sleep(wake - now)
                continue
            for job in due:
                self.advance(job)
            if deadline_s is not None and self.clock.now() - start > deadline_s:
                break
        counts: dict[str, int] = {}
        for j in self.journal.jobs():
            counts[j.state] = counts.get(j.state, 0) + 1
        return counts

    def _later(self, job: Job, error: str, delay: float | None = None) -> None:
        if delay is None:
            delay = min(self.max_backoff, self.backoff * (2 ** job.attempts))
        if job.attempts + 1 >= self.max_attempts:
            self.journal.move(job, "FAILED", error=error, attempts=job.attempts + 1)
            return
        self.journal.retry(job, error, self.clock.now() + delay)

    def advance(self, job: Job) -> None:
        try:
            if job.action == "push_config":
                self._push(job)
            elif job.action == "recalibrate":
                self._simple(job, "cal_set", {"channel": job.target["channel"], "offset": job.target["offset"]},
                             lambda a: a.cal[CHANNELS.index(job.target["channel"])] == job.target["offset"])
            elif job.action in ("quarantine", "release"):
                on = bool(job.target["on"])
                self._simple(job, "quarantine", {"on": int(on)}, lambda a: a.quarantine == on)
            else:
                self.journal.move(job, "FAILED", error=f"unknown action {job.action}")
        except NodeOffline as exc:
            self._later(job, f"offline: {exc}")
        except NodeRefused as exc:
            if exc.err == "unknown_cmd":
                # Firmware without the repair agent: retrying cannot help.
                self.journal.move(job, "FAILED", error=f"the node does not know {exc.msg or 'the command'} "
                                                       "(firmware without the repair agent: deploy first)")
                return
            self._later(job, f"refused: {exc.err} {exc.msg}".strip())

    def _simple(self, job: Job, cmd: str, args: dict[str, object], done: Any) -> None:
        have = status(self.client, job.node)
        if done(have):
            self.journal.move(job, "VERIFIED", actual=have.as_dict())
            return
        if job.state == "ACTIVATED":
            # Acked before, not there now (node rebooted before persisting?): again.
            self.journal.move(job, "PENDING", actual=have.as_dict())
            return
        self.client.request(job.node, cmd, args)
        self.journal.move(job, "ACTIVATED")

    def _push(self, job: Job) -> None:
        want = self.shadow.desired(job.node)
        version, digest = job.target["version"], job.target["digest"]
        if want.digest != digest:
            self.journal.move(job, "SUPERSEDED", why="desired config changed", now=want.digest)
            return
        have = status(self.client, job.node)
        if have.cfg_version > version:
            self.journal.move(job, "SUPERSEDED", why="node runs a newer version: no rollback",
                              actual=have.as_dict())
            return
        if job.state == "ACTIVATED":
            if have.trial:
                # The node's health check is bounded (repair_agent.TRIAL_TICKS): wait,
                # without spending the job's retry budget.
                self.journal.wait(job, "trial running", self.clock.now() + self.trial_wait)
            elif have.cfg_digest == digest:
                self.journal.move(job, "VERIFIED", actual=have.as_dict())
            else:
                self.journal.move(job, "ROLLED_BACK", actual=have.as_dict(),
                                  why="the node's health check reverted the config")
            return
        if have.cfg_digest == digest:
            # Activated already (a lost ack, or a crash before journaling): verify next.
            self.journal.move(job, "ACTIVATED", actual=have.as_dict())
            return
        if job.state == "PENDING":
            data = want.canonical()
            self.client.request(job.node, "cfg_stage", {"ver": version, "size": len(data), "digest": digest})
            for args in config_chunks(data):
                self.client.request(job.node, "cfg_chunk", args)
            got = self.client.request(job.node, "cfg_commit", {})
            if got.get("digest") != digest:
                raise NodeRefused(job.node, "digest", f"staged {got.get('digest')}")
            self.journal.move(job, "STAGED", size=len(data))
            return
        # STAGED
        try:
            got = self.client.request(job.node, "cfg_activate", {"digest": digest})
        except NodeRefused as exc:
            if "no staged config" in exc.msg.replace("_", " "):
                self.journal.move(job, "PENDING", why="staged copy gone: stage again")
                return
            raise
        self.journal.move(job, "ACTIVATED", result=got.get("result"), cfg_version=got.get("cfg_version"))


def _slot(action: str, target: Mapping[str, Any]) -> tuple[str, ...]:
    # Jobs competing for the same node state: one config, one quarantine flag, one offset per channel.
    if action == "push_config":
        return ("config",)
    if action in ("quarantine", "release"):
        return ("quarantine",)
    return ("cal", str(target.get("channel")))


def summary_lines(p: Plan) -> list[str]:
    lines = [f"{s.node}: {s.action} {json.dumps(s.target, sort_keys=True)}  ({s.reason})" for s in p.steps]
    lines += [f"{node}: skipped: {why}" for node, why in p.skipped]
    return lines or ["nothing to repair: every node matches its desired state"]
