"""A consensus offset corrects on top of the node's existing calibration.

faults.Action documents the offset as measured on what the node reports, which
already includes its calibration; replacing the calibration would undo an earlier
repair whenever a second one is needed.
"""

from __future__ import annotations

from canopy_host.faults import Action, Finding
from canopy_host.repair import plan
from canopy_host.shadow import Actual, Shadow


def _recalibrate(node: str, offset: float) -> Finding:
    return Finding(node=node, zone="A", quantity="t", window_start=0.0, fault="drift", alarm=True,
                   actionable=True, action=Action("recalibrate", node, quantity="t", offset=offset))


def test_second_recalibration_adds_to_the_first() -> None:
    shadow = Shadow({}, {"a": {"cal": {"t": -35}}})
    actual = {"a": Actual(1, "x", quarantine=False)}
    p = plan(shadow, actual, [_recalibrate("a", 0.20)])
    targets = [s.target for s in p.steps if s.node == "a" and s.action == "recalibrate"]
    assert targets == [{"channel": "t", "offset": -55}]
    assert shadow.nodes["a"]["cal"]["t"] == -55
