"""Simulated I2C bus with the `machine.I2C` memory-access API, for the unix port and CPython.

Devices are plain objects with `read_reg(reg) -> int`, `write_reg(reg, value)` and a
`present` flag; register addresses auto-increment within a burst, like the BME280's.

Usage::

    from canopy.sim.i2c import SimI2C
    from canopy.sim.bme280 import SimBME280
    bus = SimI2C()
    bus.attach(0x76, SimBME280())
    bus.scan()                       # [118]
    bus.readfrom_mem(0x76, 0xD0, 1)  # b'`' (chip id 0x60)
"""

try:
    import micropython
except ImportError:  # CPython: @micropython.native is then a no-op
    class micropython:
        native = staticmethod(lambda f: f)

# Raised, never constructed, on the allocation-free paths: allocating an exception while
# the heap is locked would itself fail. errno 19 = ENODEV, as machine.I2C reports a NACK.
_ENODEV = OSError(19, "ENODEV")


class SimI2C:
    def __init__(self):
        self._devices = {}

    def attach(self, addr, device):
        if not isinstance(addr, int) or addr < 0 or addr > 0x7F:
            raise ValueError("I2C address must be 0..0x7f, got %r" % (addr,))
        self._devices[addr] = device

    def detach(self, addr):
        self._devices.pop(addr, None)

    def _device(self, addr):
        dev = self._devices.get(addr)
        if dev is None or not dev.present:
            raise _ENODEV
        return dev

    def scan(self):
        # MicroPython appends to a raised exception's traceback each time it is raised,
        # so the shared instance would grow with every outage. scan() runs between ticks
        # (the node re-probes with it), where allocating a fresh one is allowed.
        global _ENODEV
        _ENODEV = OSError(19, "ENODEV")
        return sorted(a for a, d in self._devices.items() if d.present)

    def readfrom_mem(self, addr, reg, n, addrsize=8):
        buf = bytearray(n)
        self.readfrom_mem_into(addr, reg, buf)
        return bytes(buf)

    # Transfers run inside the node's control tick in the unix port. Native, because the
    # bytecode frame of these 5-argument loops exceeds the VM's 11-word C-stack budget
    # and would be heap-allocated on every call; native frames live on the C stack and
    # the unix port keeps machine code outside the GC heap.
    @micropython.native
    def readfrom_mem_into(self, addr, reg, buf, addrsize=8):
        dev = self._device(addr)
        for i in range(len(buf)):
            buf[i] = dev.read_reg((reg + i) & 0xFF)

    @micropython.native
    def writeto_mem(self, addr, reg, buf, addrsize=8):
        dev = self._device(addr)
        for i in range(len(buf)):
            dev.write_reg((reg + i) & 0xFF, buf[i])
