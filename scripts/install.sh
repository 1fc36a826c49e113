#!/usr/bin/env bash
# Installs what kata-runtime needs on a Debian 12 host: system packages, the Python
# environment, the generated protocol code, the default configuration and the commands on PATH.
# Idempotent: a second run only checks.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${KATA_VENV:-/opt/kata-containers/venv}
BIN_DIR=/usr/local/bin
PY=${PYTHON:-python3}

APT_PACKAGES=(
  # the VMM and virtio-fs daemon
  qemu-system-x86 qemu-utils
  # guest kernel build (osbuilder)
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev dwarves kmod cpio zstd
  # guest root filesystem build
  erofs-utils busybox-static crun
  # python environment
  python3 python3-venv python3-dev
  # host tools the tests and demo use
  iproute2 runc util-linux procps psmisc
)

step() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: must run as root (it installs packages and writes /usr/share/kata-containers)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "python: creating $VENV"
  "$PY" -m venv "$VENV"
fi
step "python: installing kata (editable) and its dependencies"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[build,dev]"

step "protocols: generating protobuf code"
"$VENV/bin/python" -m kata.protocols.build

step "config: default configuration in /usr/share/defaults/kata-containers"
install -D -m 0644 "$REPO/kata/config/configuration-qemu.toml" \
  /usr/share/defaults/kata-containers/configuration.toml

for cmd in kata-runtime kata-osbuilder; do
  ln -sf "$VENV/bin/$cmd" "$BIN_DIR/$cmd"
done
step "installed: $(command -v kata-runtime)"
