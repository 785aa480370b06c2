"""The canopy node: sensor -> conditioning -> control -> actuators, one tick at a time.

``Node(hw, cfg)`` allocates every buffer up front; ``tick()`` then runs without touching
the heap (the tests run it under ``micropython.heap_lock()``), so a long-running node
never fragments its heap or stalls in the garbage collector mid-tick.

The BME280 measurement is pipelined: each tick reads the conversion the previous tick
started and then starts the next one, so the tick never waits for the sensor.

Sensor faults (device gone = I2C OSError, stuck registers, values out of range, as
judged by ``SensorHealth``) put the node in failsafe: shade to the configured safe
position, mist off, fan to its safe duty. The node keeps polling the sensor and leaves
failsafe by itself once ``recover_m`` good readings in a row have come in.

A node quarantined by the repair agent keeps reading its sensor but holds the
actuators at failsafe too; ``held()`` says why the actuators are held (the reading's
``failsafe`` field): HELD_FAILSAFE (its own sensor failsafe) | HELD_QUARANTINE.

Usage::

    from canopy import board, hal
    from canopy.config import DEFAULT_CONFIG
    from canopy.node import Node
    hw = hal.open(board.load())
    node = Node(hw, DEFAULT_CONFIG)
    node.tick()                     # every cfg["tick_ms"]; see firmware/main.py
    node.out                        # array('i', [shade, mist, fan])
    node.pop_event()                # ("failsafe", 1) / ("recovered", 0) / ... or None
"""

from array import array

from micropython import const

from canopy import config as _config
from canopy.bme280 import BME280
from canopy.condition import Conditioner
from canopy.control import Controller
from canopy.health import FAULT_MISSING, FAULT_RANGE, FAULT_STUCK, SensorHealth

FW_VERSION = "0.1.0"

# Event codes; names are what the link reports (protocol event `code`).
EV_BOOT = const(0)
EV_FAULT = const(1)
EV_FAILSAFE = const(2)
EV_RECOVERED = const(3)
EV_CONFIG = const(4)
EV_CALIBRATE = const(5)
EV_IDENTIFY = const(6)
EV_SENSOR = const(7)
EVENT_NAMES = ("boot", "fault", "failsafe", "recovered", "config", "calibrate", "identify", "sensor")
EVENT_SLOTS = const(16)

# Why the actuators are held at failsafe: the reading's `failsafe` field is a bitmask,
# so a quarantined node is not reported as healthy (docs/protocol.md "reading").
HELD_FAILSAFE = const(1)  # the node's own sensor failsafe (fault, or no reading yet)
HELD_QUARANTINE = const(2)  # quarantined by the repair agent; its readings stay valid

BME280_ADDR = const(0x76)
# Largest calibration offset per channel (0.01 C, Pa, 1/1024 %RH): beyond this the sensor
# is broken, not miscalibrated.
_CAL_LIMIT = (1000, 5000, 20 * 1024)
BOOT_ID_FILE = "boot_id"
# Ticks a conversion may stay unfinished before the sensor counts as missing.
_LATE_TICKS = const(3)

__all__ = ("Node", "EVENT_NAMES", "FAULT_MISSING", "FAULT_STUCK", "FAULT_RANGE",
           "HELD_FAILSAFE", "HELD_QUARANTINE")


def next_boot_id(path=BOOT_ID_FILE):
    """Increment the boot counter kept in flash (node folder in the unix port)."""
    n = 0
    try:
        with open(path) as f:
            n = int(f.read().strip() or 0)
    except (OSError, ValueError):
        n = 0
    n = (n + 1) & 0x3FFFFFFF
    try:
        with open(path, "w") as f:
            f.write(str(n))
    except OSError:
        pass  # read-only flash: boot ids then repeat, the link's seq still orders frames
    return n


class Node:
    def __init__(self, hw, cfg=None, boot_id=None, address=BME280_ADDR):
        self.hw = hw
        self.cfg = _config.merged(cfg) if cfg is not None else _config.merged()
        self.boot_id = next_boot_id() if boot_id is None else boot_id
        self.address = address
        self.raw = array("i", (0, 0, 0))
        self.adj = array("i", (0, 0, 0))  # raw + calibration offsets: what conditioning sees
        self.cal = array("i", (0, 0, 0))
        self.meas = array("i", (0, 0, 0))
        self.out = array("i", (0, 0, 0))
        self.faults = 0
        self.failsafe = True  # until the first good reading
        self.ticks = 0
        self.readings = 0  # good readings since boot
        self.sensor = None
        self._pending = False
        self._late = 0
        self._faulted = False
        self._ev_code = array("i", bytes(4 * EVENT_SLOTS))
        self._ev_arg = array("i", bytes(4 * EVENT_SLOTS))
        self._ev_head = 0
        self._ev_len = 0
        self.events_dropped = 0
        self._identify_left = 0
        self._led_on = False
        self.quarantined = False  # set by the repair agent: actuators held at failsafe
        self.cond = Conditioner(3, self.cfg["ema_shift"])
        self.ctrl = Controller(self.cfg)
        self.health = SensorHealth(self.cfg)
        self.ctrl.failsafe(self.out)
        self._actuate()
        self._push(EV_BOOT, self.boot_id)
        self.probe()

    # --- start-up and between-tick work (may allocate) -------------------------------

    def probe(self):
        """(Re)create the sensor driver; False if the BME280 is not answering.

        Called at boot and from `service()` while the sensor is missing: a BME280 that
        lost power forgets its settings, so a returning sensor is set up from scratch.
        """
        was = self.sensor is not None
        try:
            # Ask the bus first: scan() answers without raising, while every failed
            # transfer raises (and re-raising one preallocated exception grows its
            # traceback each time), so a long outage stays cheap.
            if self.address not in self.hw.i2c.scan():
                raise OSError(19)
            self.sensor = None  # the old driver's memory may be needed for the new one
            self.sensor = BME280(self.hw.i2c, address=self.address)
            self.sensor.start()
            self._pending = True
        except OSError:  # BME280Error included: missing device or wrong chip
            if was or self.ticks == 0:
                self._push(EV_SENSOR, 0)
            self.sensor = None
            self._pending = False
            return False
        if not was and self.ticks:
            self._push(EV_SENSOR, 1)
        return True

    def service(self):
        """Between-tick housekeeping: re-probe a missing sensor (allocation allowed here)."""
        if self.faults & FAULT_MISSING and not self._pending:
            self.probe()

    @property
    def period_ms(self):
        return self.cfg["tick_ms"]

    # --- the control tick (allocation-free) ------------------------------------------

    # Every method here keeps its bytecode frame (locals + value stack, plus 3 words per
    # active try) within the VM's 11-word C-stack budget (VM_MAX_STATE_ON_STACK); a bigger
    # frame is taken from the heap on every call, even though it is freed on return.
    # Hence the small helpers, each try in a method of its own, and few locals.

    def tick(self):
        """read -> condition -> control -> actuate; allocates nothing."""
        self.ticks += 1
        got = self._read()
        if got < 0:
            # Conversion still running (first tick after boot, or a tick period shorter
            # than the conversion): hold everything, read it next tick.
            self._status_led()
            return
        faults = self.health.check(self.raw, got)
        if faults != self.faults:
            if faults:
                self._push(EV_FAULT, faults)
            self.faults = faults
        self._adjust()
        if faults:
            self._faulted = True
            if not self.failsafe:
                self.failsafe = True
                self._push(EV_FAILSAFE, faults)
            self.ctrl.failsafe(self.out)
        elif got:
            self.readings += 1
            if self.failsafe:
                # Stale history from before the fault must not leak into the new estimate.
                self.cond.reset(self.adj)
                self.failsafe = False
                if self._faulted:  # not on the first reading after a clean boot
                    self._faulted = False
                    self._push(EV_RECOVERED, 0)
            self.cond.update(self.adj, self.meas)
            self.ctrl.step(self.meas, self.out)
        if self.quarantined:
            # Readings go on (consensus decides on release), the actuators stay safe.
            self.ctrl.failsafe(self.out)
        self._actuate()
        self._status_led()
        self._start_next()

    def _read(self):
        # 1: a new reading is in self.raw; 0: none (no sensor, failed or late read);
        # -1: the conversion is still running and may be waited for.
        s = self.sensor
        if s is None or not self._pending:
            return 0
        try:
            if s.ready():
                s.read_into(self.raw)
                self._late = 0
                return 1
        except OSError:  # not bound: binding would allocate
            return 0
        if self._late < _LATE_TICKS:
            self._late += 1
            return -1
        return 0

    def _adjust(self):
        raw = self.raw
        cal = self.cal
        adj = self.adj
        adj[0] = raw[0] + cal[0]
        adj[1] = raw[1] + cal[1]
        adj[2] = raw[2] + cal[2]

    def _start_next(self):
        # Start the next conversion now; it completes long before the next tick.
        self._pending = False
        s = self.sensor
        if s is not None:
            try:
                s.start()
                self._pending = True
            except OSError:
                pass

    def _actuate(self):
        hw = self.hw
        out = self.out
        hw.shade.set(out[0])
        hw.mist.set(out[1])
        hw.fan.set(out[2])

    def _status_led(self):
        # Identify: blink at the tick rate; otherwise lit = failsafe.
        if self._identify_left > 0:
            self._identify_left -= 1
            on = not self._led_on
        else:
            on = self.failsafe
        if on != self._led_on:
            self._led_on = on
            led = self.hw.led
            if led is not None:
                led.value(on)

    def _push(self, code, arg):
        i = self._ev_head + self._ev_len
        if i >= EVENT_SLOTS:
            i -= EVENT_SLOTS
        if self._ev_len == EVENT_SLOTS:
            # Full: the oldest event goes, the newest state matters most.
            self._ev_head = self._ev_head + 1 if self._ev_head + 1 < EVENT_SLOTS else 0
            self.events_dropped += 1
        else:
            self._ev_len += 1
        self._ev_code[i] = code
        self._ev_arg[i] = arg

    # --- what the link uses (outside the tick; may allocate) ---------------------------

    def pop_event(self):
        """Oldest pending event as (name, arg), or None."""
        if self._ev_len == 0:
            return None
        i = self._ev_head
        self._ev_head = i + 1 if i + 1 < EVENT_SLOTS else 0
        self._ev_len -= 1
        return (EVENT_NAMES[self._ev_code[i]], self._ev_arg[i])

    def set_config(self, changes):
        """Apply config changes (validated as a whole; nothing changes on error)."""
        merged = dict(self.cfg)
        merged.update(changes)
        cfg = _config.merged(merged)  # raises ValueError naming the bad setting
        self.ctrl.set_setpoints(cfg)
        self.health.configure(cfg)
        self.cond.set_shifts(cfg["ema_shift"])
        self.cfg = cfg
        self._push(EV_CONFIG, cfg["version"])
        return cfg

    def calibrate_offset(self, channel, delta):
        """Add `delta` (channel units) to every future reading of `channel` (0=T, 1=P, 2=H)."""
        if not isinstance(channel, int) or not 0 <= channel <= 2:
            raise ValueError("calibrate: channel must be 0 (T), 1 (P) or 2 (H)")
        if not isinstance(delta, int):
            raise ValueError("calibrate: delta must be an int in channel units")
        total = self.cal[channel] + delta
        if abs(total) > _CAL_LIMIT[channel]:
            raise ValueError("calibrate: offset %d exceeds +-%d" % (total, _CAL_LIMIT[channel]))
        self.cal[channel] = total
        # Jumping the conditioner to the new offset avoids a slow EMA ramp toward it.
        if not self.failsafe:
            self._adjust()
            self.cond.reset(self.adj)
        self._push(EV_CALIBRATE, channel)
        return total

    def set_quarantine(self, on):
        """Hold the actuators at their failsafe positions (on) or hand them back (off)."""
        self.quarantined = bool(on)
        if self.quarantined:
            self.ctrl.failsafe(self.out)
            self._actuate()

    def held(self):
        """Why the actuators are held at failsafe: HELD_* bits, 0 = under control."""
        return (HELD_FAILSAFE if self.failsafe else 0) | (HELD_QUARANTINE if self.quarantined else 0)

    def identify(self, seconds):
        """Blink the status LED for `seconds` so a person can find this node."""
        if not isinstance(seconds, int) or not 0 <= seconds <= 3600:
            raise ValueError("identify: seconds must be an int 0..3600")
        self._identify_left = seconds * 1000 // self.cfg["tick_ms"]
        self._push(EV_IDENTIFY, seconds)

    def reboot(self):
        self.hw.reboot()

    def reading(self):
        """The reading fields the link reports (protocol `reading` frame)."""
        raw = self.raw
        meas = self.meas
        out = self.out
        st = self.ctrl._st
        return {
            "t_raw": raw[0], "p_raw": raw[1], "h_raw": raw[2],
            "t": meas[0], "p": meas[1], "h": meas[2],
            "shade": out[0], "mist": out[1], "fan": out[2],
            "faults": self.faults, "failsafe": self.held(),
            "tick": self.ticks,
            # Integrators in output units (Q16.16 >> 16): enough to see windup on the host.
            "i_shade": st[0] >> 16, "i_mist": st[2] >> 16, "i_fan": st[4] >> 16,
        }
