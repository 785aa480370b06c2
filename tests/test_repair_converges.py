"""The continuous loop's CONVERGE rule (repair_loop.settled_residual, next_trim) against
a model plant: a node whose zone sees a share k of its remaining sensor error, settling
like a first-order system. The end-to-end run against virtual nodes is in
tests/test_repair_loop_sim.py."""

from __future__ import annotations

import pytest

from canopy_host.repair_loop import (CONVERGENCE_RATIO, DONE_C, MAX_STEPS, MAX_WAIT_WINDOWS, NOISE_C,
                                     next_trim, settled_residual)


def first_order(start: float, final: float, q: float, n: int) -> list[float]:
    """Per-window values approaching `final` from `start`, each window closing (1 - q) of the gap."""
    return [final + (start - final) * q ** (i + 1) for i in range(n)]


@pytest.mark.parametrize("start,final,q", [(0.2, 1.8, 0.6), (-0.4, 0.25, 0.5), (3.0, -0.7, 0.3)])
def test_settled_residual_is_the_limit_of_a_first_order_approach(start, final, q):
    assert settled_residual(first_order(start, final, q, 2)) is None  # three windows are needed
    assert settled_residual(first_order(start, final, q, 3)) == pytest.approx(final, abs=1e-9)


def test_settled_residual_waits_while_too_slow_and_takes_a_still_one():
    assert settled_residual(first_order(0.0, 2.0, 0.95, 3)) is None  # barely moving toward far away
    assert settled_residual([0.50, 0.52, 0.51]) == pytest.approx(0.515)  # noise around a value
    assert settled_residual([0.0, 0.6, -0.2]) is None  # jumping about
    wobble = [0.3, -0.3] * (MAX_WAIT_WINDOWS // 2)
    assert settled_residual(wobble) == pytest.approx(0.0)  # averaged once it is clear it will not settle


def run_plant(error: float, k: float, detect_k: float) -> tuple[list[str], float]:
    """The loop's course on a node with a sensor error `error` whose zone sees k of it
    in service (detect_k while its control was saturated at detection)."""
    detected = detect_k * error
    history = [(detected, detected)]
    left = error - detected
    verdicts = []
    for _ in range(MAX_STEPS + 2):
        verdict, correction, _ = next_trim(k * left, history)
        verdicts.append(verdict)
        if verdict != "trim":
            break
        history.append((k * left, correction))
        left -= correction
    return verdicts, left


@pytest.mark.parametrize("k", [1.0, 0.8, 0.6, 0.5])
@pytest.mark.parametrize("detect_k", [0.4, 0.65])
def test_trims_converge_to_the_sensor_error(k, detect_k):
    verdicts, left = run_plant(5.0, k, detect_k)
    assert verdicts[-1] == "done", verdicts
    assert abs(k * left) <= DONE_C and abs(left) <= 0.5, left
    assert verdicts.count("trim") <= 3  # the secant gain makes it fast, not just geometric


def test_a_residual_that_does_not_shrink_is_escalated():
    # Calibration does not move the reading's disagreement (the sensor is broken, not offset).
    history = [(2.0, 2.0), (1.5, 1.5)]
    verdict, _, _ = next_trim(1.5 * CONVERGENCE_RATIO + 0.05, history)
    assert verdict == "escalate"
    # The detection's residual is from another regime: the first in-service one is never judged by it.
    assert next_trim(1.9, [(2.0, 2.0)])[0] == "trim"


def test_steps_are_capped():
    history = [(4.0, 4.0)] + [(4.0 * 0.5 ** i, 4.0 * 0.5 ** i) for i in range(1, MAX_STEPS)]
    assert next_trim(1.0, history)[0] == "escalate"
    # ... but spent within the noise is as good as it can be measured
    assert next_trim(NOISE_C * 0.9, history)[0] == "done"


def test_hunting_around_zero_within_the_noise_is_done():
    assert next_trim(0.8 * NOISE_C, [(3.0, 3.0), (-0.8 * NOISE_C, -0.3)])[0] == "done"
    # the same sign change far outside the noise is overshoot, not convergence
    assert next_trim(0.5, [(3.0, 3.0), (-1.2, -1.5)])[0] == "trim"


def test_first_trim_is_a_plain_fixed_point_step_and_done_is_small():
    verdict, correction, gain = next_trim(1.2, [(3.0, 3.0)])
    assert (verdict, correction, gain) == ("trim", 1.2, 1.0)
    assert next_trim(DONE_C * 0.5, [(3.0, 3.0), (1.2, 1.2)])[0] == "done"
    # A small residual is not enough when the zone sees only half of an error: 0.4 °C is left.
    verdict, correction, gain = next_trim(0.2, [(3.0, 3.0), (0.7, 1.0)])
    assert (verdict, gain) == ("trim", 0.5) and correction == pytest.approx(0.4)


def test_a_course_cut_short_is_not_reported_as_repaired(tmp_path):
    from canopy_host.repair_loop import RepairLoop

    loop = RepairLoop(tmp_path / "none.db", tmp_path / "shadow.json", lend=None, client_for=None,
                      t0=0.0, clock=lambda: 600.0)
    loop.repaired = {"n01": 120.0, "n02": 120.0, "n03": 120.0}
    loop.released = {"n02", "n03"}
    loop.steps = {"n02": [(3.0, 3.0)], "n03": [(3.0, 3.0), (1.0, 1.0)]}
    loop.outcome = {"n03": "repaired"}
    notes = {ev.node: ev.text for ev in loop.unfinished()}
    assert set(notes) == {"n01", "n02"}
    assert "still quarantined" in notes["n01"] and "released, 1 calibration step" in notes["n02"]
    assert all("not repaired yet" in t for t in notes.values())
