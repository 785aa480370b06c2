"""MicroPython-side adapters for tests/test_security*.py and tests/test_mesh*.py (unix port).

Bytes cross the JSON boundary of `canopy_host.unixport.call_batch` as hex strings.
"""

import json
import time
from binascii import hexlify, unhexlify

from protocol_node import Capture, FakeNode

from canopy import security
from canopy.link import Link
from canopy.mesh import Mesh
from canopy.sim.radio import UdpRadio


def hmac_hex(key_hex, data_hex):
    return hexlify(security.hmac_sha256(unhexlify(key_hex), unhexlify(data_hex))).decode()


def ct_equal(a_hex_text, b_hex_text):
    return security.ct_equal_hex(a_hex_text.encode(), b_hex_text.encode(), 0)


def _auth(key_hex, counter_file, mode):
    if key_hex:
        return security.Auth(security.STRICT, unhexlify(key_hex), None, counter_file)
    return security.Auth(mode, None, None, counter_file)


def link_session(node_id, key_hex, counter_file, mode, sessions):
    """One node; `sessions` is a list of lists of hex command lines. A new Link (a
    reboot, same counter file) starts for every inner list. Returns all output as hex,
    the FakeNode's calls and the reject counters."""
    node = FakeNode()
    out = []
    calls = []
    rejects = None
    for lines in sessions:
        cap = Capture()
        auth = _auth(key_hex, counter_file, mode)
        link = Link(node, node_id=node_id, inp=None, out=cap, repair=False, auth=auth)
        link._poll = None
        link.service(0)
        for h in lines:
            link.feed(unhexlify(h))
        node.ticks += 1
        link.service(1000)
        out.append(hexlify(b"".join(cap.chunks)).decode())
        calls.extend(node.calls)
        node.calls = []
        rejects = list(auth.rejects)
    return [out, calls, rejects]


def load_auth(folder, node_id, dev):
    a = security.load(node_id, dev, folder + "/canopy_key.json", folder + "/canopy_ctr")
    return [a.mode, a.problem, a.tagging]


def _control(path, d):
    with open(path, "w") as f:
        f.write(json.dumps(d))


def mesh_run(spec):
    """Several nodes in one process, each a Link on a FakeNode with a UDP radio.

    spec: {"nodes": {id: {"port": p, "peers": {id: port}, "key": hex|None,
    "gateway": bool, "loss": x, "delay_ms": d}}, "ttl": t, "dir": folder,
    "steps": [[action, ...], ...]} with actions
      ["host", hexline]           bytes from the host into the gateway's serial input
      ["pump", rounds]            service every node `rounds` times (1 simulated s each)
      ["control", id, {...}]      rewrite a node's mesh.json (partition, node loss)
    Returns per node: serial output (hex), calls, mesh counters, origin table.
    """
    nodes = {}
    clock = [0]
    ttl = spec.get("ttl", 4)
    folder = spec["dir"]
    for nid, c in spec["nodes"].items():
        ctl = folder + "/mesh_" + nid + ".json"
        _control(ctl, {})
        radio = UdpRadio(c["port"], c["peers"], c.get("loss", 0.0), c.get("delay_ms", 0),
                         c.get("seed", 1), lambda: clock[0], ctl)
        mesh = Mesh(nid, radio, ttl)
        node = FakeNode()
        cap = Capture()
        key = c.get("key")
        auth = _auth(key, folder + "/ctr_" + nid, "dev")
        link = Link(node, node_id=nid, inp=None, out=cap, repair=False, auth=auth,
                    mesh=mesh, gateway=c.get("gateway", False))
        link._poll = None
        nodes[nid] = (link, node, cap, mesh, radio, ctl)
    order = sorted(nodes)
    for step in spec["steps"]:
        act = step[0]
        if act == "host":
            for nid in order:
                if nodes[nid][0].gateway:
                    nodes[nid][0].feed(unhexlify(step[1]))
        elif act == "control":
            _control(nodes[step[1]][5], step[2])
            time.sleep_ms(20)  # a new mtime for the re-read
        elif act == "pump":
            for _ in range(step[1]):
                clock[0] += 1000
                for nid in order:
                    link, node = nodes[nid][0], nodes[nid][1]
                    node.ticks += 1
                    link.service(clock[0])
                time.sleep_ms(2)  # let the datagrams land
                for _k in range(3):
                    for nid in order:
                        nodes[nid][0].service(clock[0])
                    time.sleep_ms(1)
    result = {}
    for nid in order:
        link, node, cap, mesh, radio, _ctl = nodes[nid]
        result[nid] = {
            "out": hexlify(b"".join(cap.chunks)).decode(),
            "calls": node.calls,
            "mesh": [mesh.sent, mesh.relayed, mesh.received, mesh.duplicates, mesh.expired,
                     radio.lost],
            "origins": dict((k, v[1]) for k, v in mesh.origins.items()),
            "neighbours": sorted(str(k) for k in mesh.neighbours),
        }
        radio.close()
    return result


def worst_hello(node_id, key_hex):
    """A tagged hello with every field at its cap and 10-digit boot/seq."""
    from canopy import protocol

    enc = protocol.Encoder(node_id, 2**30 - 1)
    enc.auth = security.Auth(security.STRICT, unhexlify(key_hex), node_id, "/tmp/_unused_ctr")
    enc.seq = 2**30 - 1
    n = enc.hello("b" * 99, "v" * 99, "h" * 99, 1000, "d" * 64)
    return hexlify(enc.buf[:n]).decode()


class _Recorder:
    def __init__(self):
        self.sizes = []
        self.src = None

    def send(self, buf, n):
        self.sizes.append(n)

    def recv(self, buf):
        return 0


def packet_limits():
    r = _Recorder()
    m = Mesh("n01", r)
    body = b"@CNP1 n01 1 2 E code=x arg=1 msg=" + b"a" * 300
    ok = body[:249 - 10] + b" *00000000"  # 249 bytes + LF: the largest frame
    too = body[:250 - 10] + b" *00000000"
    return [m.send(ok + b"\n", len(ok) + 1), m.send(too + b"\n", len(too) + 1), max(r.sizes)]


class _FakeESPNow:
    """Records calls the way MicroPython's espnow.ESPNow takes them; one shared air."""

    air = []

    def __init__(self):
        self.peers = []
        self.on = False
        self.mac = b"\x02\x00\x00\x00\x00%c" % (len(_FakeESPNow.air) + 1)
        self.inbox = []
        _FakeESPNow.air.append(self)

    def active(self, flag):
        self.on = flag

    def add_peer(self, mac):
        if mac in self.peers:
            raise OSError("exists")
        self.peers.append(mac)

    def send(self, mac, msg, sync=True):
        assert self.on and mac in self.peers and len(msg) <= 250
        for other in _FakeESPNow.air:
            if other is not self:
                other.inbox.append((self.mac, bytes(msg)))

    def any(self):
        return bool(self.inbox)

    def irecv(self, timeout_ms=None):
        return self.inbox.pop(0) if self.inbox else (None, None)


class _FakeWLAN:
    def __init__(self, _iface):
        pass

    def active(self, flag):
        pass


class _Namespace:
    pass


def espnow_relay():
    """Three EspNowRadio meshes on a fake `espnow`: a frame from the first crosses."""
    import sys

    fake_espnow = _Namespace()
    fake_espnow.ESPNow = _FakeESPNow
    fake_network = _Namespace()
    fake_network.WLAN = _FakeWLAN
    fake_network.STA_IF = 0
    sys.modules["espnow"] = fake_espnow
    sys.modules["network"] = fake_network
    from canopy.mesh import EspNowRadio

    _FakeESPNow.air = []
    meshes = [Mesh("n%d" % i, EspNowRadio(), 2) for i in range(3)]
    got = [[], [], []]
    line = b"@CNP1 n0 1 0 E code=boot arg=1 *00000001\n"
    meshes[0].send(line, len(line))
    for _ in range(3):
        for i in (1, 2, 0):
            meshes[i].poll(0, lambda b, s, e, i=i: got[i].append(bytes(b[s:e])) and False)
    del sys.modules["espnow"]
    del sys.modules["network"]
    return [[len(g) for g in got], [m.relayed for m in meshes], [m.duplicates for m in meshes],
            got[1][0].decode() if got[1] else None]
