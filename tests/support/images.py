"""The busybox container image the end-to-end tests and benchmarks load into Docker and containerd.

Built without a registry: the rootfs of ``tests.support.bundles.make_rootfs`` (busybox-static) becomes an
OCI image layout with umoci (one layer, ``Cmd ["sh"]`` and a ``PATH``), which skopeo writes out twice:

- a docker-archive, for ``docker load``;
- an oci-archive named with the normalised reference, for ``ctr images import``.

A second tag of the same layer is the pause image a CRI pod sandbox runs (``sandbox_image``): its
entrypoint waits until SIGTERM or SIGINT and exits 0 (a shell that traps them: PID 1 of a namespace
ignores signals it has no handler for). It is written as a third archive, an oci-archive.

All are cached under ``/var/cache/kata-containers/images/busybox-<key>/``, the key being a hash of the
busybox binary and of this recipe, so a later call only checks that they exist.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kata.errors import KataError
from tests.support.bundles import BUSYBOX, make_rootfs

# The name `docker images` shows, and the normalised reference containerd stores (`ctr images ls`,
# what the CRI looks up for the short name).
IMAGE_NAME = "kata-test/busybox:latest"
IMAGE_REF = "docker.io/" + IMAGE_NAME
PAUSE_NAME = "kata-test/pause:latest"
PAUSE_REF = "docker.io/" + PAUSE_NAME
# `sleep` in the background and `wait`: the shell runs its trap as soon as a signal arrives.
PAUSE_SCRIPT = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"
CACHE_DIR = Path("/var/cache/kata-containers/images")
IMAGE_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Part of the cache key: change it when the steps below change what the archives hold.
_RECIPE = f"busybox image v2 {IMAGE_REF} cmd=sh {IMAGE_PATH_ENV} pause {PAUSE_REF} {PAUSE_SCRIPT}"
_TOOL_TIMEOUT = 300


class ImageError(KataError):
    """Building the test image failed (a tool is missing or failed)."""


@dataclass(frozen=True)
class ImageArchives:
    docker: Path  # docker-archive, for `docker load -i`
    oci: Path  # oci-archive, for `ctr images import`
    pause: Path  # oci-archive of the pause image, for `ctr -n k8s.io images import`

    def all_present(self) -> bool:
        return all(p.is_file() for p in (self.docker, self.oci, self.pause))


def cache_key(busybox: str = BUSYBOX) -> str:
    h = hashlib.sha256(_RECIPE.encode())
    try:
        h.update(Path(busybox).read_bytes())
    except OSError as e:
        raise ImageError(f"cannot read {busybox}: {e.strerror} (install busybox-static)") from e
    return h.hexdigest()[:16]


def _tool(*cmd: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=_TOOL_TIMEOUT)
    except FileNotFoundError as e:
        raise ImageError(f"{cmd[0]} not found: install it (scripts/install.sh)") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"`{cmd[0]} {cmd[1]}` did not finish in {_TOOL_TIMEOUT} s") from e
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ImageError(f"`{cmd[0]} {cmd[1]}` failed: {detail}")


def _build(out: Path, work: Path) -> None:
    """Write docker.tar, oci.tar and pause.tar into ``out``, with scratch files in ``work``."""
    layout, bundle = work / "oci", work / "bundle"
    image = f"{layout}:latest"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    _tool("umoci", "init", "--layout", str(layout))
    _tool("umoci", "new", "--image", image)
    _tool("umoci", "unpack", *rootless, "--image", image, str(bundle))
    make_rootfs(bundle / "rootfs")
    _tool("umoci", "repack", "--image", image, str(bundle))
    _tool("umoci", "config", "--image", image, "--config.cmd", "sh", "--config.env", IMAGE_PATH_ENV,
          "--history.created_by", "kata.images (busybox-static)")
    pause = f"{layout}:pause"
    _tool("umoci", "config", "--image", image, "--tag", "pause", "--clear", "config.cmd",
          "--config.entrypoint", "sh", "--config.entrypoint", "-c", "--config.entrypoint", PAUSE_SCRIPT,
          "--history.created_by", "kata.images (pause)")
    _tool("umoci", "gc", "--layout", str(layout))
    # Local files only: no signature policy to consult (and none need be installed).
    _tool("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{image}",
          f"docker-archive:{out / 'docker.tar'}:{IMAGE_NAME}")
    _tool("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{image}",
          f"oci-archive:{out / 'oci.tar'}:{IMAGE_REF}")
    _tool("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{pause}",
          f"oci-archive:{out / 'pause.tar'}:{PAUSE_REF}")


def busybox_archives(cache_dir: Path = CACHE_DIR) -> ImageArchives:
    """The busybox image's archives, built on the first call for this busybox binary."""
    key = cache_key()
    final = cache_dir / f"busybox-{key}"
    archives = ImageArchives(docker=final / "docker.tar", oci=final / "oci.tar", pause=final / "pause.tar")
    if archives.all_present():
        return archives
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Built beside the cache entry and renamed into place whole: a reader never sees half of it, and
    # two concurrent builders each rename a complete one (the loser's is dropped).
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        out = work / "out"
        out.mkdir()
        _build(out, work)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete entry left by hand
        try:
            out.rename(final)
        except OSError:
            if not archives.all_present():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in cache_dir.glob("busybox-*"):  # images of an older busybox or recipe
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return archives


def busybox_docker_archive(cache_dir: Path = CACHE_DIR) -> Path:
    """A docker-archive of IMAGE_NAME, for `docker load -i`."""
    return busybox_archives(cache_dir).docker


def busybox_oci_archive(cache_dir: Path = CACHE_DIR) -> Path:
    """An oci-archive of IMAGE_REF, for `ctr images import`."""
    return busybox_archives(cache_dir).oci


def pause_oci_archive(cache_dir: Path = CACHE_DIR) -> Path:
    """An oci-archive of PAUSE_REF (a CRI sandbox image), for `ctr -n k8s.io images import`."""
    return busybox_archives(cache_dir).pause
