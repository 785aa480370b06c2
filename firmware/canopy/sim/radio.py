"""Unix-port stand-in for ESP-NOW: UDP datagrams on 127.0.0.1, one port per node.

Range is a peer list: a node only reaches the ports listed as its neighbours, so a
line topology n01 - n02 - n03 needs n02 to relay between the ends. Faults:

- loss: each copy sent to a peer is dropped with this probability (seeded, repeatable);
- delay_ms: a received packet is handed out only after this much *simulated* time;
- partitions and node loss: the control file (``mesh.json`` in the node folder,
  rewritten by ``canopy sim`` or a test) is re-read when it changes::

      {"down": false, "blocked": ["n03"], "loss": 0.2, "delay_ms": 50}

  ``down`` silences the radio both ways (node loss); ``blocked`` peers are out of
  range in both directions as long as both sides list each other (a partition).

Usage::

    radio = UdpRadio(47001, {"n02": 47002}, clock=hw.ticks_ms)
    mesh = Mesh("n01", radio, names=radio.names)
"""

import json
import socket

try:
    import os
except ImportError:  # pragma: no cover
    os = None


class UdpRadio:
    def __init__(self, port, peers, loss=0.0, delay_ms=0, seed=1, clock=None, control=None):
        self.port = int(port)
        self.peers = {}  # node id -> sockaddr
        self.names = {}  # source port -> node id
        for nid, p in peers.items():
            self.peers[nid] = socket.getaddrinfo("127.0.0.1", int(p))[0][-1]
            self.names[int(p)] = nid
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(socket.getaddrinfo("127.0.0.1", self.port)[0][-1])
        self.sock.setblocking(False)
        self.loss = float(loss)
        self.delay_ms = int(delay_ms)
        self.down = False
        self.blocked = ()
        self._rng = (int(seed) * 2654435761 + 12345) & 0x3FFFFFFF
        self.clock = clock
        self.control = control
        self._control_stamp = None
        self._control_read = 0
        self._queue = []  # (due_ms, data, src) while delay_ms > 0
        self.src = None
        self.lost = 0
        self._check_control()

    def _rand(self):
        # 30-bit LCG: small ints on every port, and the same sequence everywhere
        self._rng = (self._rng * 1103515245 + 12345) & 0x3FFFFFFF
        return self._rng / 1073741824.0

    def _now(self):
        return self.clock() if self.clock is not None else 0

    def _check_control(self):
        if self.control is None or os is None:
            return
        try:
            st = os.stat(self.control)
            stamp = (st[6], st[8])  # size, mtime
        except OSError:
            return
        now = self._now()
        # mtime has 1 s resolution: a same-size rewrite within that second is caught
        # by re-reading at least once per simulated second
        if stamp == self._control_stamp and now - self._control_read < 1000:
            return
        self._control_stamp = stamp
        self._control_read = now
        try:
            with open(self.control) as f:
                c = json.loads(f.read())
        except (OSError, ValueError):
            return
        self.down = bool(c.get("down", False))
        self.blocked = tuple(c.get("blocked", ()))
        if "loss" in c:
            self.loss = float(c["loss"])
        if "delay_ms" in c:
            self.delay_ms = int(c["delay_ms"])

    def send(self, buf, n):
        if self.down:
            return
        data = bytes(buf[:n])
        for nid, addr in self.peers.items():
            if nid in self.blocked:
                continue
            if self.loss > 0 and self._rand() < self.loss:
                self.lost += 1
                continue
            try:
                self.sock.sendto(data, addr)
            except OSError:
                pass  # peer not running: a radio has no delivery report either

    def _take(self):
        try:
            data, addr = self.sock.recvfrom(300)
        except OSError:
            return None, None
        return data, _port_of(addr)

    def recv(self, buf):
        self._check_control()
        now = self._now()
        while True:
            data, src = self._take()
            if data is None:
                break
            if self.down or self.names.get(src) in self.blocked:
                continue
            self._queue.append((now + self.delay_ms, data, src))
        q = self._queue
        if not q or q[0][0] - now > 0:
            return 0
        _due, data, src = q.pop(0)
        n = len(data)
        if n > len(buf):
            return 0
        buf[0:n] = data
        self.src = self.names.get(src, src)
        return n

    def close(self):
        self.sock.close()


def _port_of(addr):
    # MicroPython gives the raw sockaddr bytes (family, port big-endian, ip...);
    # CPython a (host, port) tuple.
    if isinstance(addr, tuple):
        return addr[1]
    return (addr[2] << 8) | addr[3]
