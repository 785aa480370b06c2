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

from canopy.protocol import COMMAND, ERROR, CommandParser, Encoder, valid_node_id

try:
    import select
except ImportError:  # pragma: no cover - every supported port has select
    select = None

HELLO_EVERY = 60  # readings between repeated hellos, for a monitor that attaches late
_CHANNELS = {"t": 0, "p": 1, "h": 2, 0: 0, 1: 1, 2: 2}


def default_node_id(hw=None):
    """A virtual node's id from its sim.json (via the world), else the chip's unique id in hex."""
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
    """

    def __init__(self, node, node_id=None, report_every=1, inp=None, out=None, max_read=256):
        self.node = node
        hw = getattr(node, "hw", None)
        self.node_id = node_id or default_node_id(hw)
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
        self.parser = CommandParser(self.node_id, node.boot_id)
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

    # -- output -----------------------------------------------------------------------

    def _send(self, n):
        self._out.write(self.enc.buf, n)
        self.frames_out += 1

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

    def send_reading(self):
        node = self.node
        self._send(self.enc.reading(node.raw, node.meas, node.out, node.faults,
                                    node.failsafe, node.ticks, self._integrators()))
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
        r = self.parser.push(b)
        if r == COMMAND:
            self._dispatch()
        elif r == ERROR:
            p = self.parser
            self._send(self.enc.error(p.err_counter, p.err, p.msg))

    def feed(self, data):
        for b in data:
            self.feed_byte(b)

    def _dispatch(self):
        p = self.parser
        node = self.node
        counter = p.counter
        cmd = p.cmd
        args = p.args
        try:
            if cmd == "status":
                _no_args(args)
                self._send(self.enc.reply(counter, cmd, (
                    ("tick", node.ticks), ("faults", node.faults),
                    ("failsafe", 1 if node.failsafe else 0),
                    ("cfg_version", (getattr(node, "cfg", None) or {}).get("version", 0)),
                    ("rx_errors", p.errors),
                    ("ev_dropped", getattr(node, "events_dropped", 0)),
                )))
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

    # -- the seam main.py calls between ticks ------------------------------------------

    def service(self, now_ms):
        if self._hello_due:
            self.send_hello()
        self._drain_events()  # what happened during the tick, before any replies
        if self._poll is not None:
            self._read_input()
            self._drain_events()  # events caused by the commands just answered
        t = self.node.ticks
        if t != self._last_tick and (self._last_tick < 0 or t - self._last_tick >= self.report_every):
            self._last_tick = t
            self.send_reading()


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
