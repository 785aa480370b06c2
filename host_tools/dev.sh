#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv (idempotent), then runs a job.
#   bash host_tools/dev.sh demo    # virtual canopy nodes, no hardware
#   bash host_tools/dev.sh test    # the whole test suite
#   bash host_tools/dev.sh bench   # benchmarks (not part of the tests)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
py=${PYTHON:-python3}

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "canopy: creating $venv" >&2
    "$py" -m venv "$venv"
  fi
  # Reinstall only when the pinned dependencies or the C accelerator change (the
  # editable install builds canopy_host/_fastscan.c next to its source).
  local stamp="$venv/.canopy-installed"
  local want
  want=$(cat "$root/host_tools/pyproject.toml" "$root/host_tools/setup.py" \
    "$root/host_tools/canopy_host/_fastscan.c" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "canopy: installing pinned dependencies into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root/host_tools[test]"
    echo "$want" > "$stamp"
  fi
}

job=${1:-help}
[ $# -gt 0 ] && shift
case "$job" in
  setup) setup ;;
  demo) setup; exec "$venv/bin/canopy" demo "$@" ;;
  test)
    setup
    cd "$root"
    # pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
    set +e
    "$venv/bin/python" -m pytest -c tests/pytest.ini tests "$@"
    rc=$?
    set -e
    [ $rc -eq 5 ] && { echo "canopy: pytest collected no tests" >&2; exit 1; }
    exit $rc ;;
  bench) setup; cd "$root"; exec "$venv/bin/python" tests/bench/run.py "$@" ;;
  *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
