"""A provisioned node calls itself by the id in identity.json (written by `canopy provision`).

Without that, a board provisioned as "n07" kept announcing its MAC-derived id, and its
key file (derived for "n07") could never verify.
"""

from __future__ import annotations

import json
from pathlib import Path

from canopy_host.unixport import run_code

CODE = "from canopy.link import default_node_id\nprint('ID=' + default_node_id(None))"


def _node_id_in(folder: Path) -> str:
    proc = run_code(CODE, cwd=folder, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("ID=")[1].strip()


def test_identity_file_names_the_node(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text(json.dumps({"version": 1, "node_id": "n07", "zone": "B"}))
    assert _node_id_in(tmp_path) == "n07"


def test_damaged_or_invalid_identity_falls_back(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text("{not json")
    broken = _node_id_in(tmp_path)
    (tmp_path / "identity.json").write_text(json.dumps({"node_id": "bad id with spaces"}))
    invalid = _node_id_in(tmp_path)
    assert broken == invalid and broken not in ("n07", "bad id with spaces")
    assert broken  # still a usable id (the unix port's fallback)
