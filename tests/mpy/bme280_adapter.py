"""MicroPython-side adapters for tests/test_bme280*.py, called through call_batch.

Each function builds a simulated bus + SimBME280 + the real driver and returns plain
lists, so the CPython side can compare against its own references.
"""

from array import array

import micropython

from canopy.bme280 import BME280, BME280Error, parse_calibration
from canopy.sim.bme280 import SimBME280
from canopy.sim.i2c import SimI2C

NAMES = ("T1", "T2", "T3", "P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9",
         "H1", "H2", "H3", "H4", "H5", "H6")


def _rig(cal=None, **kw):
    sim = SimBME280(calibration=dict(zip(NAMES, cal)) if cal else None)
    bus = SimI2C()
    bus.attach(0x76, sim)
    return sim, bus


def compensate_raw(cal, triples):
    """For each (adc_T, adc_P, adc_H): [t_fine, T, P, H] through bus, parser and kernel.

    Oversampling x16 keeps all 20 bits of the raw values the sim latches.
    """
    sim, bus = _rig(cal)
    drv = BME280(bus, osrs_t=5, osrs_p=5, osrs_h=5)
    out = array("i", [0, 0, 0])
    res = []
    for adc_t, adc_p, adc_h in triples:
        sim.set_raw(adc_t, adc_p, adc_h)
        drv.start()
        if not drv.ready():
            return ["not ready"]
        drv.read_into(out)
        res.append([drv.t_fine, out[0], out[1], out[2]])
    return res


def read_blocking(cal, adc_t, adc_p, adc_h):
    """`read()` on a sim holding these raw values: [t_fine, t, p, h]."""
    sim, bus = _rig(cal)
    sim.set_raw(adc_t, adc_p, adc_h)
    drv = BME280(bus, osrs_t=5, osrs_p=5, osrs_h=1)
    t, p, h = drv.read()
    return [drv.t_fine, t, p, h]


def calibration_from_registers(e1_e7):
    """Driver-parsed calibration when 0xE1..0xE7 hold these bytes (rest: sim defaults)."""
    sim, bus = _rig()
    for i, b in enumerate(e1_e7):
        sim._regs[0xE1 + i] = b
    drv = BME280(bus)
    direct = array("i", [0] * 18)
    parse_calibration(bytearray(26), bytearray(e1_e7), direct)
    return [list(drv.calibration), list(direct)]


def error_case(name):
    """[exception class, is OSError, message] for one failure scenario, or ['ok']."""
    bus = SimI2C()
    sim = SimBME280()
    try:
        if name == "missing":
            BME280(bus)
        elif name == "wrong_address":
            bus.attach(0x77, sim)
            BME280(bus, address=0x76)
        elif name == "gone":
            bus.attach(0x76, sim)
            sim.present = False
            BME280(bus)
        elif name in ("bmp280", "unknown_id"):
            sim.chip_id = 0x58 if name == "bmp280" else 0x61
            bus.attach(0x76, sim)
            BME280(bus)
        elif name == "timeout":
            bus.attach(0x76, sim)
            drv = BME280(bus)
            sim.busy_polls = 1000000
            drv.read()
        elif name == "bad_osrs":
            bus.attach(0x76, sim)
            BME280(bus, osrs_t=7)
        elif name == "bad_iir":
            bus.attach(0x76, sim)
            BME280(bus, iir=16)
        elif name == "bad_address":
            BME280(bus, address=0x176)
        elif name == "read_into_gone":
            bus.attach(0x76, sim)
            drv = BME280(bus)
            sim.present = False
            drv.read_into(array("i", [0, 0, 0]))
        else:
            return ["unknown case " + name]
    except Exception as e:  # the test inspects the type and message
        return [type(e).__name__, isinstance(e, OSError), str(e), e.errno if isinstance(e, OSError) else None]
    return ["ok"]


def measuring(busy):
    """Read A, then switch the sim to B and make it report 'measuring' on `busy` polls.

    Returns [first read, second read, status reads during the second read,
    data reads while measuring, pipelined ready() results while busy].
    """
    sim, bus = _rig()
    drv = BME280(bus, osrs_t=5, osrs_p=5)
    sim.set_environment(10.0, 95000.0, 30.0)
    first = list(drv.read())
    sim.set_environment(30.0, 102000.0, 70.0)
    sim.busy_polls = busy
    before = sim.status_reads
    second = list(drv.read())
    polls = sim.status_reads - before
    drv.start()
    pipelined = [drv.ready() for _ in range(busy + 1)]
    return [first, second, polls, sim.data_reads_while_measuring, pipelined]


def heap_locked(n, faults):
    """Run start/ready/read_into `n` times with the heap locked; then read_into on a gone device.

    With `faults`, the sim's temperature offset, drift and a spike are active, so each
    completed measurement re-inverts the compensation inside the locked region.
    """
    sim, bus = _rig()
    drv = BME280(bus)
    sim.set_environment(21.5, 99000.0, 45.0)
    if faults:
        sim.offset_t_c = 0.5
        sim.drift_t_c_per_s = 0.001
    out = array("i", [0, 0, 0])
    acc = array("i", [0, 0, 0])
    drv.start()
    drv.ready()
    drv.read_into(out)  # warm-up: first calls may intern/cache
    readies = 0
    errno = 0
    spiked = 0
    if faults:
        sim.spike(5.0)
    micropython.heap_lock()
    try:
        for i in range(n):
            drv.start()
            if drv.ready():
                readies += 1
            drv.read_into(out)
            if i == 0:
                spiked = out[0]
            acc[0] = out[0]
            acc[1] = out[1]
            acc[2] = out[2]
        sim.present = False
        try:
            drv.read_into(out)
        except OSError as e:
            errno = e.errno
    finally:
        micropython.heap_unlock()
    return [readies, list(acc), errno, spiked]
