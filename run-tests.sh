#!/usr/bin/env bash
# The whole test suite: installs what it needs (as setup.sh does), builds or reuses the guest
# assets, then runs lint, type checks and the tests (unit and real-VM integration).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/install.sh
kata-osbuilder build
VENV=/opt/kata-containers/venv
"$VENV/bin/ruff" check kata tests bench
"$VENV/bin/mypy" kata
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -o console_output_style=classic "$@" tests
