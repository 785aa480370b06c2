"""Node side of `canopy repair`: staged config push, activation, quarantine, calibration.

The Link calls `attach(link)` when it starts. That cleans up the flash after a reset
(`ConfigStore.recover`), brings the running node in line with what the flash says
(active config, quarantine flag, calibration offsets) and registers these commands
(docs/repair.md has the whole exchange)::

    cfg_stage     ver=<int> size=<bytes> digest=<64 hex>  -> off=0
    cfg_chunk     off=<int> a=x<hex> [b=x<hex>]            -> off=<bytes on flash>
    cfg_commit                                             -> digest=<staged digest>
    cfg_activate  digest=<64 hex>                          -> result=activated|already ...
    repair_status                                          -> cfg_version cfg_digest trial quar staged cal
    quarantine    on=1|0                                   -> quar
    cal_set       channel=t|p|h offset=<int>               -> channel offset

Every command is idempotent, so the host can repeat any of them after a lost ack.
After an activation the new config is on trial: it passes after `TRIAL_GOOD` healthy
ticks in a row, and is reverted to the fallback when a node that was healthy before
has not managed that within `TRIAL_TICKS`.

Usage::

    from canopy.link import Link
    link = Link(node)          # attaches this agent; link.repair is the RepairAgent
"""

from micropython import const

from canopy import config as _config
from canopy.configstore import ConfigStore

TRIAL_GOOD = const(5)
TRIAL_TICKS = const(60)
CHUNK_BYTES = const(62)  # config bytes per cfg_chunk frame: two 62-hex-char values
_CHANNELS = {"t": 0, "p": 1, "h": 2, 0: 0, 1: 1, 2: 2}


class RepairAgent:
    def __init__(self, node, store=None):
        self.node = node
        self.store = store if store is not None else ConfigStore()
        self.recovered = self.store.recover()
        self._trial_left = 0
        self._good = 0
        self._last_tick = -1
        self._was_healthy = False
        self.reverts = 0
        self._sync_node()

    # -- bringing the running node in line with the flash -------------------------------

    def _apply_cfg(self, cfg):
        node = self.node
        if _config.digest(node.cfg) != _config.digest(cfg):
            node.set_config(cfg)

    def _sync_node(self):
        st = self.store
        if st._exists("config.json"):
            self._apply_cfg(st.load()[0])
        self.node.set_quarantine(st.quarantined())
        if st._exists("cal.json"):
            cal = st.load_cal()
            for ch in range(3):
                if cal[ch] != self.node.cal[ch]:
                    self.node.calibrate_offset(ch, cal[ch] - self.node.cal[ch])
        if st.trial() is not None:
            self._start_trial()

    def _start_trial(self):
        node = self.node
        self._was_healthy = not node.failsafe and node.faults == 0
        self._trial_left = TRIAL_TICKS
        self._good = 0
        self._last_tick = node.ticks

    # -- the trial health check, called by the Link between ticks --------------------------

    def poll(self):
        if self._trial_left <= 0:
            return  # steady state: nothing allocated, nothing touched
        node = self.node
        t = node.ticks
        if t == self._last_tick:
            return
        self._last_tick = t
        self._trial_left -= 1
        if node.faults == 0 and not node.failsafe:
            self._good += 1
        else:
            self._good = 0
        if self._good >= TRIAL_GOOD:
            self._trial_left = 0
            self.store.trial_passed()
        elif self._trial_left <= 0:
            if self._was_healthy:
                # Healthy before, not after: the new config is the likely cause.
                self.store.revert()
                self.reverts += 1
                self._apply_cfg(self.store.load()[0])
            else:
                # The sensor was already failing; this config is not to blame.
                self.store.trial_passed()

    # -- command handlers: each returns the reply's (key, value) pairs ----------------------

    def _status(self, args):
        _only(args, ())
        st = self.store
        cfg, digest = st.load()
        staged = st.staged()
        cal = self.node.cal
        return (("cfg_version", cfg["version"]), ("cfg_digest", digest),
                ("trial", 1 if st.trial() is not None else 0),
                ("quar", 1 if self.node.quarantined else 0),
                ("staged", staged[0] if staged else 0),
                ("cal", "%d,%d,%d" % (cal[0], cal[1], cal[2])))

    def _stage(self, args):
        _only(args, ("ver", "size", "digest"))
        return (("off", self.store.stage_begin(args.get("ver"), args.get("size"), args.get("digest"))),)

    def _chunk(self, args):
        # Two text values of at most 64 chars each (the protocol's cap), "x"-prefixed so
        # a short all-digit piece is not taken for an int.
        _only(args, ("off", "a", "b"))
        a = args.get("a")
        b = args.get("b", "x")
        if not isinstance(a, str) or not isinstance(b, str) or a[:1] != "x" or b[:1] != "x":
            raise ValueError("cfg_chunk: needs off=<int> a=x<hex> [b=x<hex>]")
        return (("off", self.store.stage_chunk(args.get("off"), a[1:] + b[1:])),)

    def _commit(self, args):
        _only(args, ())
        return (("digest", self.store.stage_commit()),)

    def _activate(self, args):
        _only(args, ("digest",))
        result = self.store.activate(args.get("digest"))
        cfg, digest = self.store.load()
        if result == "activated":
            self._apply_cfg(cfg)
            self._start_trial()
        return (("result", result), ("cfg_version", cfg["version"]), ("cfg_digest", digest))

    def _quarantine(self, args):
        _only(args, ("on",))
        on = args.get("on")
        if on not in (0, 1):
            raise ValueError("quarantine: on=1 or on=0")
        self.store.set_quarantine(on == 1)
        self.node.set_quarantine(on == 1)
        return (("quar", on),)

    def _cal_set(self, args):
        _only(args, ("channel", "offset"))
        ch = _CHANNELS.get(args.get("channel"))
        offset = args.get("offset")
        if ch is None or not isinstance(offset, int):
            raise ValueError("cal_set: needs channel=t|p|h and offset=<int>")
        node = self.node
        if offset != node.cal[ch]:
            node.calibrate_offset(ch, offset - node.cal[ch])  # checks the limits
        cal = [node.cal[0], node.cal[1], node.cal[2]]
        self.store.save_cal(cal)
        return (("channel", ch), ("offset", node.cal[ch]))

    def register(self, link):
        link.register("repair_status", self._status)
        link.register("cfg_stage", self._stage)
        link.register("cfg_chunk", self._chunk)
        link.register("cfg_commit", self._commit)
        link.register("cfg_activate", self._activate)
        link.register("quarantine", self._quarantine)
        link.register("cal_set", self._cal_set)
        link.add_service_hook(self.poll)


def attach(link, store=None):
    agent = RepairAgent(link.node, store)
    agent.register(link)
    return agent


def _only(args, allowed):
    for k in args:
        if k not in allowed:
            raise ValueError("unexpected argument " + k)
