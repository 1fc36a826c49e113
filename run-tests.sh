#!/usr/bin/env bash
# The whole test suite: installs what it needs (as setup.sh does), builds or reuses the guest
# assets, then runs lint, type checks and the tests (unit and real-VM integration).
set -euo pipefail
cd "$(dirname "$0")"
VENV=/opt/kata-containers/venv
./scripts/install.sh
"$VENV/bin/kata-osbuilder" build
"$VENV/bin/ruff" check kata tests bench deploy scripts
"$VENV/bin/mypy" kata deploy scripts tests/support bench/ttrpc_roundtrip.py
# -rfEs: failures, errors and skips (with reasons) in the short summary; --durations: the time budget.
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -o console_output_style=classic -rfEs --durations=15 \
  "$@" tests || status=$?
if [ "$status" = 5 ]; then
  echo "run-tests.sh: pytest collected no tests (exit 5): that is a failure" >&2
fi
exit "$status"
