"""Node-to-node mesh: protocol frames flooded over ESP-NOW (UDP on loopback in the unix port).

One packet carries one protocol frame (docs/protocol.md) unchanged, so its CRC and
HMAC tag stay end-to-end from the origin node to the host::

    packet = <ttl: 1 byte> + <frame line without the LF>      (<= 250 bytes, ESP-NOW's limit)

Every node rebroadcasts a frame it has not seen before with ttl - 1 while ttl > 1
(flooding with duplicate suppression), so a node out of the gateway's range is
reached through its neighbours. Duplicates are recognised by the frame's CRC
(the last 8 hex digits) in a ring of the 32 most recent frames. A command addressed
to this node is not forwarded further. Spec: docs/mesh.md.

Radios (one interface: `send(buf, n)` broadcasts buf[0:n]; `recv(buf)` returns the
length of one received packet copied into buf, 0 if none, and sets `radio.src`):

- `EspNowRadio()` on the ESP32 (`espnow` module, broadcast peer);
- `canopy.sim.radio.UdpRadio` in the unix port (loss, delay, partitions, node loss).

Usage::

    from canopy.mesh import Mesh, EspNowRadio
    mesh = Mesh("a4cf12e8d0b4", EspNowRadio())
    mesh.send(enc.buf, n)                      # a frame this node produced
    mesh.poll(now_ms, on_frame)                # on_frame(buf, start, end) -> True = ours
"""

from micropython import const

MAX_PACKET = const(250)
DEFAULT_TTL = const(4)
MAX_TTL = const(16)
_DEDUP = const(32)
_LF = const(10)
_AT = const(64)
_SP = const(32)


class Mesh:
    """Flooding relay with TTL and duplicate suppression over one radio."""

    def __init__(self, node_id, radio, ttl=DEFAULT_TTL, names=None):
        self.node_id = node_id
        self.radio = radio
        self.ttl = max(1, min(MAX_TTL, int(ttl)))
        self.tx = bytearray(MAX_PACKET)
        self.rx = bytearray(MAX_PACKET + 8)
        self._seen = bytearray(8 * _DEDUP)
        self._seen_i = 0
        self.names = names or {}  # radio address -> node id, for the neighbour table
        # neighbour (the radio address a packet came from) -> [last_ms, packets]
        self.neighbours = {}
        # origin node id -> [last_ms, hops]: who is reachable, and how far
        self.origins = {}
        self.sent = 0
        self.relayed = 0
        self.received = 0
        self.duplicates = 0
        self.expired = 0
        self.dropped = 0  # not a frame, or too long

    def _remember(self, buf, end):
        # end: index just past the frame's last byte (the 8 CRC digits end there)
        i = self._seen_i
        seen = self._seen
        base = 8 * i
        for k in range(8):
            seen[base + k] = buf[end - 8 + k]
        self._seen_i = (i + 1) % _DEDUP

    def _seen_before(self, buf, end):
        seen = self._seen
        for j in range(_DEDUP):
            base = 8 * j
            k = 0
            while k < 8 and seen[base + k] == buf[end - 8 + k]:
                k += 1
            if k == 8:
                return True
        return False

    def send(self, buf, n, ttl=0):
        """Broadcast the frame line buf[0:n] (trailing LF optional) as this node's own."""
        if n > 0 and buf[n - 1] == _LF:
            n -= 1
        if n < 12 or n + 1 > MAX_PACKET:
            self.dropped += 1
            return False
        tx = self.tx
        tx[0] = ttl if ttl > 0 else self.ttl
        for i in range(n):
            tx[i + 1] = buf[i]
        self._remember(buf, n)
        self.sent += 1
        return self._tx(n + 1)

    def _tx(self, n):
        try:
            self.radio.send(self.tx, n)
            return True
        except OSError:
            self.dropped += 1
            return False

    def poll(self, now_ms, on_frame, budget=8):
        """Receive up to `budget` packets: deliver new frames, relay them while ttl lasts.

        on_frame(buf, start, end) gets the frame line in buf[start:end] (no LF) and
        returns True if the frame was addressed to this node alone (then it is not
        forwarded). Returns the number of new frames.
        """
        rx = self.rx
        new = 0
        while budget > 0:
            budget -= 1
            n = self.radio.recv(rx)
            if n <= 0:
                break
            if n < 13 or n > MAX_PACKET or rx[1] != _AT:
                self.dropped += 1
                continue
            ttl = rx[0]
            src = self.radio.src
            nb = self.neighbours.get(src)
            if nb is None:
                self.neighbours[src] = [now_ms, 1]
            else:
                nb[0] = now_ms
                nb[1] += 1
            if self._seen_before(rx, n):
                self.duplicates += 1
                continue
            self._remember(rx, n)
            self.received += 1
            new += 1
            origin = _origin(rx, 1, n)
            if origin is not None:
                hops = self.ttl - ttl + 1 if ttl <= self.ttl else 1
                o = self.origins.get(origin)
                if o is None:
                    self.origins[origin] = [now_ms, hops]
                else:
                    o[0] = now_ms
                    o[1] = hops
            mine = on_frame(rx, 1, n)
            if mine:
                continue
            if ttl > 1 and ttl <= MAX_TTL:
                self._relay(rx, n, ttl - 1)
            else:
                self.expired += 1
        return new

    def _relay(self, rx, n, ttl):
        tx = self.tx
        tx[0] = ttl
        for i in range(1, n):
            tx[i] = rx[i]
        if self._tx(n):
            self.relayed += 1

    def table(self):
        """[(neighbour name, last_ms, packets)] for status output and tests."""
        out = []
        for src, v in self.neighbours.items():
            out.append((self.names.get(src, src), v[0], v[1]))
        return out


def _origin(buf, start, end):
    # "@CNP1 <node> ..." -> node id as str (allocates; outside the control tick)
    i = start + 6
    j = i
    while j < end and j < i + 17 and buf[j] != _SP:
        j += 1
    if j == i or j >= end or buf[j] != _SP:
        return None
    return bytes(buf[i:j]).decode()


class EspNowRadio:
    """ESP-NOW broadcast on the ESP32 (station interface up, no access point needed)."""

    BROADCAST = b"\xff\xff\xff\xff\xff\xff"

    def __init__(self, channel=None):
        import espnow
        import network

        sta = network.WLAN(network.STA_IF)
        sta.active(True)
        if channel is not None:
            sta.config(channel=channel)
        self.e = espnow.ESPNow()
        self.e.active(True)
        try:
            self.e.add_peer(self.BROADCAST)
        except OSError:
            pass  # already a peer after a soft reset
        self.src = None

    def send(self, buf, n):
        self.e.send(self.BROADCAST, memoryview(buf)[:n], False)

    def recv(self, buf):
        if not self.e.any():
            return 0
        mac, msg = self.e.irecv(0)
        if msg is None:
            return 0
        n = len(msg)
        if n > len(buf):
            return 0
        for i in range(n):
            buf[i] = msg[i]
        self.src = bytes(mac)
        return n
