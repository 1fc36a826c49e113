#!/usr/bin/env bash
# Installs what kata-runtime needs on a Debian 12 host: system packages, the Python
# environment, the generated protocol code, the default configuration and the commands on PATH.
# Idempotent: a second run only checks.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${KATA_VENV:-/opt/kata-containers/venv}
BIN_DIR=/usr/local/bin
# Debian's interpreter (python3-venv provides its venv/ensurepip), not whatever python3 is first on PATH
# (a pyenv shim on a developer machine): a fresh Debian 12 host has only this one.
PY=${PYTHON:-/usr/bin/python3}

APT_PACKAGES=(
  # the VMM and virtio-fs daemon (/usr/lib/qemu/virtiofsd is in qemu-system-common)
  qemu-system-x86 qemu-system-common qemu-utils
  # guest kernel build (osbuilder)
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev dwarves kmod cpio zstd
  # our kernel patches (kata/osbuilder/kernel-patches)
  patch
  # guest root filesystem build: apt-cache/apt-get download/dpkg-deb, mkfs.erofs/fsck.erofs
  apt dpkg erofs-utils busybox-static crun
  # python environment; libseccomp2: containers' seccomp profiles are compiled on the host
  # (kata/oci/seccomp_bpf.py), not by crun under emulation in the guest
  python3 python3-venv python3-dev libseccomp2
  # host tools the tests and demo use
  iproute2 runc util-linux procps psmisc findutils
  # containerd-shim-runc-v2: the Go ttrpc server tests/unit/test_ttrpc_interop.py talks to
  containerd
  # nft: containerd-shim-kata-v2 redirects a pod's loopback TCP to its port forwarder (Debian's default
  # firewall tool; kata/network/loopback_redirect.py)
  nftables
  # containerd's .proto files (task API, events, cgroup metrics) for containerd-shim-kata-v2's code
  golang-github-containerd-containerd-dev golang-github-containerd-cgroups-dev
  # end-to-end tests and benchmarks with a real dockerd (kata-runtime as a Docker runtime) and CNI
  # networking; skopeo and umoci build the busybox test image without a registry (tests/support/images.py)
  docker.io containernetworking-plugins skopeo umoci
  # operators' tools: podman with conmon (kata-runtime as podman's OCI runtime), a Prometheus that
  # scrapes kata-monitor, and a local image registry for the CRI tests' PullImage
  podman conmon prometheus docker-registry
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
# The osbuilder resolves and downloads the guest's packages through apt's metadata, so it must exist
# and be fresh (a stale list names versions the mirror no longer has) even when nothing is missing here.
# (The lists' own mtimes are the mirror's Last-Modified, so we keep a stamp of our last update.)
APT_STAMP=/var/lib/kata-containers/apt-update.stamp
lists_fresh() {
  [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -print -quit 2>/dev/null)" ] &&
    [ -n "$(find "$APT_STAMP" -mmin -1440 2>/dev/null)" ]
}
if [ ${#missing[@]} -gt 0 ] || ! lists_fresh; then
  step "apt: updating package lists"
  apt-get update -qq
  mkdir -p "$(dirname "$APT_STAMP")" && touch "$APT_STAMP"
fi
if [ ${#missing[@]} -gt 0 ]; then
  step "apt: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A venv whose interpreter is gone (it was made from another python, since removed) is made again.
if ! "$VENV/bin/python" -c pass 2>/dev/null; then
  step "python: creating $VENV with $PY"
  "$PY" -m venv --clear "$VENV"
fi
step "python: installing kata (editable) and its dependencies"
"$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[build,dev]"

step "protocols: generating protobuf code"
"$VENV/bin/python" -m kata.protocols.build

# Byte-compiled here, so that no command compiles its modules anew at each start: Python does not
# cache them where PYTHONDONTWRITEBYTECODE is set (it is on these machines), and every container's
# create, start and delete, and every shim, imports a hundred or more.
step "python: byte-compiling kata"
"$VENV/bin/python" -m compileall -q -j 0 "$REPO/kata"

step "config: default configuration in /usr/share/defaults/kata-containers"
install -D -m 0644 "$REPO/kata/config/configuration-qemu.toml" \
  /usr/share/defaults/kata-containers/configuration.toml

for cmd in kata-runtime kata-osbuilder containerd-shim-kata-v2 kata-monitor; do
  ln -sf "$VENV/bin/$cmd" "$BIN_DIR/$cmd"
done
step "installed: $(command -v kata-runtime)"
