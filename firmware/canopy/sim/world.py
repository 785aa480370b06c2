"""The virtual node's world: microclimate + simulated BME280 + actuators + simulated clock.

Built from the virtual node's ``sim.json`` (see docs/firmware.md)::

    {"node_id": "n01", "zone": "A", "seed": 1234, "zone_seed": 77, "speed": 10.0,
     "weather": "hot", "board": "unix-sim",
     "start_hour": 13.0, "gusts": 1.0,          # optional: local time at boot, weather gustiness
     "faults": [{"at_s": 300, "kind": "stuck|drift|spike|sensor_off",
                 "duration_s": 120, "value": 0.02}]}

``advance(ms)`` runs between control ticks (never inside one): it reads the actuator
positions from the simulated PWMs, integrates the microclimate, applies the fault
schedule and writes the new environment into the SimBME280 registers.

Fault kinds, times in simulated seconds since boot:
- ``stuck``: the sensor's data registers freeze for ``duration_s``;
- ``drift``: the temperature reading drifts by ``value`` C per second (default 0.01)
  for ``duration_s``, then snaps back (a recalibrated or replaced sensor);
- ``spike``: one reading jumps by ``value`` C (default 15);
- ``sensor_off``: the sensor leaves the I2C bus for ``duration_s`` (a loose connector).

Usage::

    w = World({"seed": 1, "weather": "hot"})
    w.connect(shade_pwm, mist_pwm, fan_pwm, led_pin)
    w.advance(1000)
"""

from canopy.sim.bme280 import SimBME280
from canopy.sim.climate import Canopy, Rng, Weather
from canopy.sim.i2c import SimI2C

# The per-tick model code is @micropython.native: the unix port keeps machine code
# outside the GC heap, so the simulation (absent on the chip) leaves more of the 64k
# heap the node is tested in to the firmware itself.
try:
    import micropython
except ImportError:  # CPython (tests import this model): @micropython.native is a no-op
    class micropython:
        native = staticmethod(lambda f: f)

BME280_ADDR = 0x76
STEP_MS = 1000
# Measurement noise of a real BME280 (datasheet RMS noise at oversampling x1 is about
# 0.005 C / 3 Pa / 0.02 %RH; we use a little more so readings are never frozen exactly).
NOISE_T_C = 0.02
NOISE_P_PA = 3.0
NOISE_H_PCT = 0.05
_AT_REST = (0.0, 0.0, 0.0)  # shade, mist, fan before the firmware drives them


class World:
    def __init__(self, sim=None):
        sim = sim or {}
        # sim.json as given, for the link (mesh section) and tools; the fault list is kept
        # parsed (self.faults) only, not twice on a small heap
        self.sim = {k: v for k, v in sim.items() if k != "faults"}
        self.node_id = sim.get("node_id", "sim")
        self.now_ms = 0
        kind = sim.get("weather", "mild")
        from canopy.sim.build import SimError, parse_faults

        try:
            self.weather = Weather(int(sim.get("zone_seed", 0)), kind, float(sim.get("start_hour", 13.0)),
                                   float(sim.get("gusts", 1.0)))
        except ValueError as e:
            raise SimError("sim.json: %s" % e)
        self.canopy = Canopy(self.weather, int(sim.get("seed", 0)))
        self.faults = parse_faults(sim.get("faults"))
        self._spiked = [False] * len(self.faults)
        self._noise = Rng(int(sim.get("seed", 0)) + 101)
        self.i2c = SimI2C()
        self.sensor = SimBME280(clock_ms=self.clock_ms)
        self.i2c.attach(BME280_ADDR, self.sensor)
        self._pwm = None
        self.led = None
        self.positions = _AT_REST
        self.active = ()
        self._apply_faults()
        self._feed_sensor()

    def clock_ms(self):
        return self.now_ms

    def connect(self, shade_pwm, mist_pwm, fan_pwm, led_pin=None):
        """Wire the actuators the firmware drives into the physics."""
        self._pwm = (shade_pwm, mist_pwm, fan_pwm)
        self.led = led_pin

    @micropython.native

    def actuator_positions(self):
        """(shade, mist, fan) as 0..1, as the hardware would move them."""
        if self._pwm is None:
            return _AT_REST
        s, m, f = self._pwm
        # The servo's travel maps 1.0..2.0 ms; outside that it sits at its end stop.
        shade = (s.pulse_ns() - 1000000) / 1000000
        shade = 0.0 if shade < 0 else (1.0 if shade > 1 else shade)
        return (shade, m.fraction(), f.fraction())

    @micropython.native

    def advance(self, ms):
        """Let `ms` simulated milliseconds pass."""
        while ms > 0:
            h = STEP_MS if ms > STEP_MS else ms
            ms -= h
            self.positions = self.actuator_positions()
            shade, mist, fan = self.positions
            self.canopy.step(h / 1000, shade, mist, fan)
            self.now_ms += h
            self._apply_faults()
        self._feed_sensor()

    @micropython.native

    def _apply_faults(self):
        now = self.now_ms
        stuck = False
        present = True
        offset = 0.0
        active = []
        for i, (kind, start, end, value) in enumerate(self.faults):
            if kind == "spike":
                if now >= start and not self._spiked[i]:
                    self._spiked[i] = True
                    self.sensor.spike(value)
                    active.append(kind)
                continue
            if not (start <= now < end):
                continue
            active.append(kind)
            if kind == "stuck":
                stuck = True
            elif kind == "sensor_off":
                present = False
            elif kind == "drift":
                offset += value * (now - start) / 1000
        self.sensor.stuck = stuck
        self.sensor.present = present
        self.sensor.offset_t_c = offset
        self.active = tuple(active)

    @micropython.native

    def _feed_sensor(self):
        c = self.canopy
        n = self._noise
        self.sensor.set_environment(
            c.t_c + n.uniform(-NOISE_T_C, NOISE_T_C),
            c.p_pa + n.uniform(-NOISE_P_PA, NOISE_P_PA),
            min(100.0, max(0.0, c.rh_pct + n.uniform(-NOISE_H_PCT, NOISE_H_PCT))),
        )
