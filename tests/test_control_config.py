"""canopy.config: defaults are valid, bad settings are rejected clearly, digest is canonical."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from canopy_host.paths import FIRMWARE_DIR
from canopy_host.unixport import run_code

if str(FIRMWARE_DIR) not in sys.path:
    sys.path.insert(0, str(FIRMWARE_DIR))

from canopy import config  # noqa: E402


def test_defaults_are_valid_and_json_serialisable() -> None:
    cfg = config.merged()
    assert cfg == config.DEFAULT_CONFIG
    assert json.loads(json.dumps(cfg)) == cfg


def test_digest_is_sha256_of_sorted_compact_json() -> None:
    cfg = config.merged({"t_setpoint": 2345, "ema_shift": [1, 2, 3]})
    ref = hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert config.digest(cfg) == ref
    assert config.digest(config.merged()) != ref


def test_digest_identical_on_the_node() -> None:
    cfg = config.merged({"h_ceiling": 80 * 1024})
    proc = run_code(
        "from canopy import config\n"
        "import json, sys\n"
        "print(config.digest(config.merged(json.loads(sys.stdin.read()))))\n",
        stdin=json.dumps({"h_ceiling": 80 * 1024}),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == config.digest(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"nope": 1}, "unknown setting 'nope'"),
        ({"t_setpoint": "25"}, "'t_setpoint' must be an int"),
        ({"t_setpoint": 2500.0}, "'t_setpoint' must be an int"),
        ({"shade_kp": 1 << 29}, "'shade_kp'"),
        ({"safe_shade": -1}, "'safe_shade'=-1 outside 0..10000"),
        ({"stuck_n": 1}, "'stuck_n'"),
        ({"ema_shift": [1, 2]}, "list of 3"),
        ({"ema_shift": [1, 2, 8]}, "0..7"),
        ({"t_min": 9000}, "t_min must be below t_max"),
    ],
)
def test_bad_settings_are_rejected_with_a_clear_message(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config.merged(override)


def test_load(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"tick_ms": 500}))
    assert config.load(str(p))["tick_ms"] == 500
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        config.load(str(p))


def test_controller_and_health_reject_out_of_domain_settings() -> None:
    proc = run_code(
        "from canopy.control import Controller\n"
        "from canopy.health import SensorHealth\n"
        "from canopy.config import merged\n"
        "c = merged()\n"
        "for mk, key, val in ((Controller, 'fan_kp', 1 << 29), (Controller, 'mist_slew', -1),\n"
        "                     (SensorHealth, 'stuck_n', 1), (SensorHealth, 'p_min', 200000)):\n"
        "    d = dict(c); d[key] = val\n"
        "    try:\n"
        "        mk(d)\n"
        "        print('accepted', key)\n"
        "    except ValueError as e:\n"
        "        print('rejected', key)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "rejected", "fan_kp", "rejected", "mist_slew", "rejected", "stuck_n", "rejected", "p_min",
    ]
