"""Reading traces of virtual nodes for the consensus tests: the fields a `reading` frame
carries (docs/protocol.md), tick by tick, from the real firmware on the simulated canopy.

Runs in the unix port via canopy_host.unixport.call_batch; one node per case, as fast as
the interpreter goes (sim speed 0: simulated time only advances with the ticks).
"""

from canopy import board
from canopy.node import Node
from canopy.sim import hal as sim_hal

COLUMNS = ("tick", "t", "p", "h", "faults", "failsafe")


def trace(sim, ticks):
    """Per column (COLUMNS order) a list with one value per tick."""
    sim = dict(sim)
    sim["speed"] = 0
    hw = sim_hal.open(board.load("unix-sim"), sim)
    node = Node(hw, None, boot_id=1)
    period = node.period_ms
    cols = [[] for _ in COLUMNS]
    for _ in range(ticks):
        node.tick()
        r = node.reading()
        for k in range(len(COLUMNS)):
            cols[k].append(r[COLUMNS[k]])
        while node.pop_event() is not None:
            pass
        node.service()
        hw.sleep_ms(period)
    return cols
