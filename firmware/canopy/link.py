"""The node's serial link: protocol frames out, commands in, over the USB console.

`service(now_ms)` runs between control ticks and never blocks: it polls stdin
with `select.poll` and reads only what is already there (at most `max_read` bytes
per call, one byte at a time into a preallocated buffer, so a flood of input cannot
stall the control loop), answers commands, then sends pending events and the
latest reading. Frame format: docs/protocol.md.

Usage::

    from canopy.link import Link
    link = Link(node)                 # node id: sim.json's node_id / machine.unique_id()
    while True:
        node.tick()
        link.service(hw.ticks_ms())   # hello first, then events, readings, replies
"""

import sys

from canopy.protocol import COMMAND, ERROR, RELAY, CommandParser, Encoder, valid_node_id

try:
    import select
except ImportError:  # pragma: no cover - every supported port has select
    select = None

HELLO_EVERY = 60  # readings between repeated hellos, for a monitor that attaches late
_CHANNELS = {"t": 0, "p": 1, "h": 2, 0: 0, 1: 1, 2: 2}


def default_node_id(hw=None):
    """The provisioned id (identity.json, written by `canopy provision`), else a virtual
    node's id from its sim.json (via the world), else the chip's unique id in hex."""
    try:
        import json

        with open("identity.json") as f:
            nid = json.load(f).get("node_id")
        if valid_node_id(nid):
            return nid
    except (OSError, ValueError, AttributeError):
        pass  # not provisioned yet, or a damaged file: fall back to a derived id
    world = getattr(hw, "world", None)
    nid = getattr(world, "node_id", None)
    if valid_node_id(nid):
        return nid
    try:
        import binascii
        import machine

        nid = binascii.hexlify(machine.unique_id()).decode()
        if valid_node_id(nid):
            return nid
    except (ImportError, AttributeError, OSError):
        pass
    return "node"


class Link:
    """Frames for `node` on stdout, commands from stdin (or the given streams).

    report_every: send a reading every N ticks. inp/out: streams with `readinto` /
    `write(buf, n)` (default: the console). max_read: bytes taken per service() call.
    repair: attach canopy.repair_agent (staged config, quarantine, calibration; docs/repair.md).
    """

    def __init__(self, node, node_id=None, report_every=1, inp=None, out=None, max_read=256,
                 repair=True, auth=None, mesh=None, gateway=False):
        self.node = node
        hw = getattr(node, "hw", None)
        self.node_id = node_id or default_node_id(hw)
        # auth: canopy.security.Auth, or "flash" to load the key file the way main.py
        # does (strict with a key, else dev mode if enabled, else locked). None keeps
        # the plain v1 link for harnesses that test framing alone (docs/security.md).
        if auth == "flash":
            auth = load_auth(self.node_id, hw)
        self.auth = auth
        # Hello values resolved once, as bytes, so the periodic hello allocates nothing.
        board = getattr(hw, "board", None)
        self.board = (board.get("name", "?") if isinstance(board, dict) else "?").encode()
        try:
            from canopy.node import FW_VERSION
        except ImportError:
            FW_VERSION = "0"
        try:
            from canopy.fw_hash import FW_HASH  # written by the deploy step, if any
        except ImportError:
            FW_HASH = "dev"
        self.fw_version = FW_VERSION.encode()
        self.fw_hash = FW_HASH.encode()
        self.enc = Encoder(self.node_id, node.boot_id)
        self.enc.auth = auth
        self.parser = CommandParser(self.node_id, node.boot_id)
        # Mesh (docs/mesh.md): radio frames go through their own parser (whole lines,
        # never mixed with a half-read serial line). A gateway copies other nodes'
        # frames to the host and carries host commands for other nodes into the mesh.
        self.mesh = mesh
        self.gateway = bool(gateway) and mesh is not None
        self.parser.relay = self.gateway
        self.mesh_parser = CommandParser(self.node_id, node.boot_id) if mesh is not None else None
        self._p = self.parser  # the parser whose command is being answered
        self._auth_warned = False
        self.report_every = max(1, int(report_every))
        self.max_read = max_read
        self._out = out if out is not None else getattr(sys.stdout, "buffer", sys.stdout)
        self._inp = inp if inp is not None else getattr(sys.stdin, "buffer", sys.stdin)
        self._one = bytearray(1)
        self._poll = None
        if select is not None:
            try:
                self._poll = select.poll()
                # poll the text wrapper as MicroPython documents; read its raw buffer
                self._poll.register(sys.stdin if inp is None else inp, select.POLLIN)
            except (OSError, AttributeError, TypeError):
                self._poll = None
        self._integ = [0, 0, 0]
        self._hello_due = True
        self._last_tick = -1
        self._readings = 0
        self._digest_cfg = None
        self._digest = b""
        self.eof = False
        self.frames_out = 0
        # Extra commands and between-tick hooks (canopy.repair_agent registers here).
        self._handlers = {}
        self._hooks = []
        self.repair = None
        if repair:
            try:
                from canopy import repair_agent

                self.repair = repair_agent.attach(self)
            except Exception as e:  # noqa: BLE001 - repair trouble must not stop the link
                self.repair_error = e

    def register(self, cmd, handler):
        """Answer command `cmd` with `handler(args)`, which returns the reply's (key, value)
        pairs or raises ValueError (answered as bad_args)."""
        from canopy import protocol

        if cmd not in protocol.COMMANDS:
            protocol.COMMANDS = protocol.COMMANDS + (cmd,)
        self._handlers[cmd] = handler

    def add_service_hook(self, fn):
        """Call fn() at every service(); it must not allocate in steady state."""
        self._hooks.append(fn)

    # -- output -----------------------------------------------------------------------

    def _send(self, n):
        self._out.write(self.enc.buf, n)
        self.frames_out += 1
        if self.mesh is not None:
            self.mesh.send(self.enc.buf, n)

    def _cfg_digest(self):
        # Recomputed only when the node's config object changes (after `set`).
        cfg = getattr(self.node, "cfg", None)
        if cfg is not self._digest_cfg:
            self._digest_cfg = cfg
            try:
                from canopy import config

                self._digest = config.digest(cfg).encode()
            except Exception:  # noqa: BLE001 - a digest problem must not stop the link
                self._digest = b"unknown"
        return self._digest

    def send_hello(self):
        cfg = getattr(self.node, "cfg", None) or {}
        self._send(self.enc.hello(self.board, self.fw_version, self.fw_hash,
                                  cfg.get("version", 0), self._cfg_digest()))
        self._hello_due = False

    def _integrators(self):
        # The controller keeps (integrator Q16.16, last output) per actuator; report
        # whole output units, as Node.reading() does, without building its dict.
        ctrl = getattr(self.node, "ctrl", None)
        st = getattr(ctrl, "_st", None)
        integ = self._integ
        if st is not None and len(st) >= 6:
            integ[0] = st[0] >> 16
            integ[1] = st[2] >> 16
            integ[2] = st[4] >> 16
        return integ

    def _held(self):
        # The reading's failsafe bitmask, as Node.held(): 1 = the node's own failsafe,
        # 2 = quarantined. Plain attributes: fetching a bound method would allocate.
        node = self.node
        return (1 if node.failsafe else 0) | (2 if getattr(node, "quarantined", False) else 0)

    def send_reading(self):
        node = self.node
        self._send(self.enc.reading(node.raw, node.meas, node.out, node.faults,
                                    self._held(), node.ticks, self._integrators()))
        self._readings += 1
        if self._readings % HELLO_EVERY == 0:
            self._hello_due = True

    def _drain_events(self):
        while True:
            ev = self.node.pop_event()
            if ev is None:
                return
            self._send(self.enc.event(ev[0], ev[1]))

    # -- input ------------------------------------------------------------------------

    def _readable(self):
        for _obj, ev in self._poll.ipoll(0):
            if ev & select.POLLIN:
                return True
            if ev & (select.POLLHUP | select.POLLERR):
                self._close_input()
        return False

    def _close_input(self):
        self.eof = True
        try:
            self._poll.unregister(sys.stdin if self._inp is getattr(sys.stdin, "buffer", None) else self._inp)
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        self._poll = None

    def _read_input(self):
        budget = self.max_read
        one = self._one
        while budget > 0 and self._poll is not None and self._readable():
            k = self._inp.readinto(one)
            if not k:
                self._close_input()  # unix port: stdin closed
                return
            budget -= 1
            self.feed_byte(one[0])

    def feed_byte(self, b):
        """Push one received byte; answers a completed command or a bad frame."""
        p = self.parser
        r = p.push(b)
        if r == COMMAND:
            self._p = p
            self._dispatch()
            if self.gateway and _is_broadcast(p):
                self.mesh.send(p.buf, p.n)  # '*': meant for every node, not just this one
        elif r == ERROR:
            self._reject_frame(p)
        elif r == RELAY:
            self.mesh.send(p.buf, p.n)

    def _reject_frame(self, p):
        self._send(self.enc.error(p.err_counter, p.err, p.msg))
        if p.msg == "tag" and self.auth is not None:
            self._security(p.err_counter, self.auth.reject(5))  # malformed tag token

    def _on_mesh_frame(self, buf, start, end):
        # One frame from the radio, buf[start:end] without the LF. True = a command for
        # this node alone, which the mesh then does not forward.
        p = self.mesh_parser
        ours = False
        for i in range(start, end):
            p.push(buf[i])
        r = p.push(10)
        if r == COMMAND:
            self._p = p
            self._dispatch()
            self._p = self.parser
            ours = not _is_broadcast(p)
        elif r == ERROR:
            self._reject_frame(p)
        elif self.gateway and not _is_command(buf, start, end):
            # another node's frame for the host, verbatim (its own CRC and tag)
            self._out.write(memoryview(buf)[start:end])
            self._out.write(b"\n")
        return ours

    def _security(self, counter, code):
        from canopy.security import REASONS

        self._send(self.enc.error(counter, "auth", REASONS[code]))
        self._send(self.enc.event("security", code))

    def _security_status(self):
        a = self.auth
        if a is None:
            return ()
        return (("auth", a.mode), ("sec_rejects", a.reject_total))

    def feed(self, data):
        for b in data:
            self.feed_byte(b)

    def _dispatch(self):
        p = self._p
        node = self.node
        counter = p.counter
        cmd = p.cmd
        args = p.args
        auth = self.auth
        if auth is not None:
            # before any handler (built-in or registered) sees the command
            code = auth.check_command(p.buf, p.tag_at, counter, _is_broadcast(p))
            if code:
                self._security(counter, code)
                return
        try:
            handler = self._handlers.get(cmd)
            if handler is not None:
                self._send(self.enc.reply(counter, cmd, handler(args)))
                return
            if cmd == "status":
                _no_args(args)
                self._send(self.enc.reply(counter, cmd, (
                    ("tick", node.ticks), ("faults", node.faults),
                    ("failsafe", self._held()),
                    ("cfg_version", (getattr(node, "cfg", None) or {}).get("version", 0)),
                    ("rx_errors", p.errors),
                    ("ev_dropped", getattr(node, "events_dropped", 0)),
                ) + self._security_status()))
                self._hello_due = True
                self._last_tick = -1  # and a fresh reading right away
            elif cmd == "set":
                if not args:
                    raise ValueError("set: give at least one setting, e.g. t_setpoint=2500")
                cfg = node.set_config(args)
                if not isinstance(cfg, dict):
                    cfg = getattr(node, "cfg", None) or {}
                self._send(self.enc.reply(counter, cmd, (
                    ("cfg_version", cfg.get("version", 0)), ("cfg_digest", self._cfg_digest()))))
            elif cmd == "identify":
                seconds = args.get("seconds", 10)
                _only(args, ("seconds",))
                node.identify(seconds)
                self._send(self.enc.reply(counter, cmd, (("seconds", seconds),)))
            elif cmd == "calibrate":
                _only(args, ("channel", "delta"))
                if "channel" not in args or "delta" not in args:
                    raise ValueError("calibrate: needs channel=t|p|h (or 0..2) and delta=<int>")
                ch = _CHANNELS.get(args["channel"])
                if ch is None:
                    raise ValueError("calibrate: channel must be t, p, h or 0..2")
                total = node.calibrate_offset(ch, args["delta"])
                self._send(self.enc.reply(counter, cmd, (("channel", ch), ("offset", total))))
            elif cmd == "reboot":
                _no_args(args)
                self._send(self.enc.reply(counter, cmd))
                try:
                    self._out.flush()
                except AttributeError:
                    pass
                _drain_tx()
                node.reboot()
        except (ValueError, TypeError, KeyError) as e:
            self._send(self.enc.error(counter, "bad_args", str(e)))
        except OSError as e:  # flash trouble in a registered handler
            self._send(self.enc.error(counter, "flash", str(e)))

    def _auth_notice(self):
        # Once per boot, as log text next to the frames: a node that does not check
        # commands must never look like one that does.
        a = self.auth
        if a.mode == "strict":
            return
        if a.mode == "dev":
            msg = b"canopy: UNAUTHENTICATED DEV MODE: no key file, commands are not checked"
        else:
            msg = b"canopy: no key file: commands are refused until the node is provisioned"
        if a.problem:
            msg += b" (" + a.problem.encode() + b")"
        self._out.write(msg + b"\n")

    # -- the seam main.py calls between ticks ------------------------------------------

    def service(self, now_ms):
        for hook in self._hooks:
            hook()
        if self._hello_due:
            self.send_hello()
            if self.auth is not None and not self._auth_warned:
                self._auth_warned = True
                self._auth_notice()
        self._drain_events()  # what happened during the tick, before any replies
        if self._poll is not None:
            self._read_input()
            self._drain_events()  # events caused by the commands just answered
        if self.mesh is not None:
            self.mesh.poll(now_ms, self._on_mesh_frame)
            self._drain_events()
        t = self.node.ticks
        if t != self._last_tick and (self._last_tick < 0 or t - self._last_tick >= self.report_every):
            self._last_tick = t
            self.send_reading()


def from_flash(node, **kw):
    """The Link main.py should build: auth from the key file (load_auth) and, when the
    board/sim.json has a "mesh" section, the mesh radio (docs/mesh.md)."""
    hw = getattr(node, "hw", None)
    nid = kw.pop("node_id", None) or default_node_id(hw)
    mesh = None
    gateway = False
    sim = getattr(getattr(hw, "world", None), "sim", None)
    board = getattr(hw, "board", None)
    cfg = None
    if isinstance(sim, dict):
        cfg = sim.get("mesh")
    elif isinstance(board, dict):
        cfg = board.get("mesh")
    if isinstance(cfg, dict):
        from canopy.mesh import DEFAULT_TTL, EspNowRadio, Mesh

        gateway = bool(cfg.get("gateway", False))
        if "port" in cfg:
            from canopy.sim.radio import UdpRadio

            radio = UdpRadio(cfg["port"], cfg.get("peers", {}), cfg.get("loss", 0.0),
                             cfg.get("delay_ms", 0), cfg.get("seed", 1), hw.ticks_ms, "mesh.json")
        else:
            radio = EspNowRadio(cfg.get("channel"))
        mesh = Mesh(nid, radio, cfg.get("ttl", DEFAULT_TTL))
    return Link(node, node_id=nid, auth=load_auth(nid, hw), mesh=mesh, gateway=gateway, **kw)


def load_auth(node_id, hw=None):
    """The node's Auth from its key file; dev mode only if sim.json says "auth": "dev"
    or CANOPY_AUTH=dev is set (unix port)."""
    from canopy import security

    dev = False
    sim = getattr(getattr(hw, "world", None), "sim", None)
    if isinstance(sim, dict) and sim.get("auth") == "dev":
        dev = True
    try:
        import os

        if os.getenv("CANOPY_AUTH") == "dev":
            dev = True
    except (ImportError, AttributeError):
        pass
    return security.load(node_id, dev)


def _is_broadcast(p):
    return p.buf[6] == 42 and p.buf[7] == 32  # "@CNP1 * "


def _is_command(buf, start, end):
    # "@CNP1 <node> <boot> <seq> C ...": the fifth token is the type letter
    sp = 0
    i = start
    while i < end:
        if buf[i] == 32:
            sp += 1
            if sp == 4:
                return i + 2 < end and buf[i + 1] == 67 and buf[i + 2] == 32
        i += 1
    return False


def _drain_tx():
    # A UART still holds the reply when machine.reset() would cut it off; ~10 ms
    # carries a 250-byte frame out at 115200 baud.
    try:
        import time

        time.sleep_ms(20)
    except (ImportError, AttributeError):
        pass


def _only(args, allowed):
    for k in args:
        if k not in allowed:
            raise ValueError("unexpected argument " + k)


def _no_args(args):
    _only(args, ())
