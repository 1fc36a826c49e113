#!/usr/bin/env bash
# Builds the kata-deploy installer image (deploy/Dockerfile) from this checkout's committed files and
# the guest assets this host built (setup.sh or `kata-osbuilder build` first), then saves it as an
# archive, since there is no registry to push to. On every node:
#     ctr -n k8s.io images import kata-deploy.tar
# Needs docker and network access to Debian's mirror and PyPI (the base image and the venv).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-localhost/kata-containers-py/kata-deploy:latest}
OUT=${1:-kata-deploy.tar}
ASSETS=${ASSETS:-/usr/share/kata-containers}

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
git -C "$REPO" archive HEAD | tar -x -C "$ctx"
mkdir "$ctx/assets"
# the names the configuration uses, as files (on the build host they link to content-hashed names)
for f in vmlinux.container kata-containers.img; do
  cp -L "$ASSETS/$f" "$ctx/assets/$f"
done
docker build -t "$IMAGE" -f "$ctx/deploy/Dockerfile" "$ctx"
docker save -o "$OUT" "$IMAGE"
echo "build-image.sh: $IMAGE saved to $OUT"
