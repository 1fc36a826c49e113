#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install everything, build (or reuse) the
# guest kernel and root filesystem, and run a busybox container inside a VM.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/install.sh
/opt/kata-containers/venv/bin/kata-osbuilder build
# Boot and snapshot the template VM now, so that the first container starts as fast as the rest.
/opt/kata-containers/venv/bin/kata-runtime factory init
exec /opt/kata-containers/venv/bin/python scripts/demo.py
