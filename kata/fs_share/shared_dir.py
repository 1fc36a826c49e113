"""The host directory a sandbox exports to its guest, and the bind mounts that fill it.

Each container's rootfs and each of its bind-mount sources is bind-mounted under this directory
before the agent is asked to create the container; the guest sees them through virtio-fs or 9p.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kata.core.paths import validate_id
from kata.errors import KataError
from kata.specconv import HostShare
from kata.utils.mount import bind_mount, mounts_under, unmount


class ShareError(KataError):
    pass


def check_source(share: HostShare) -> Path:
    """The share's source, which must exist (as for runc's bind mounts)."""
    source = Path(share.source)
    if not source.exists():
        raise ShareError(f"mount source {share.source} does not exist")
    return source


class SharedDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def add(self, share: HostShare) -> Path:
        target = self.root / share.name
        source = check_source(share)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The mount point must be of the same kind as the source (file over file, dir over dir).
        if source.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.touch(exist_ok=True)
        try:
            bind_mount(str(source), str(target), read_only=share.read_only)
        except OSError as exc:
            raise ShareError(str(exc)) from exc
        return target

    def remove(self, cid: str) -> None:
        """Unmount everything container ``cid`` put here (all of it under the directory named by its
        id, see kata.specconv.plan_container)."""
        own = self.root / validate_id(cid)
        for point in mounts_under(str(own)):
            unmount(point)

    def destroy(self) -> None:
        """Unmount everything under the root, then delete it; never follows into a mount."""
        for point in mounts_under(str(self.root)):
            unmount(point)
        if self.root.exists():
            leftover = mounts_under(str(self.root))
            if leftover:
                raise ShareError(f"still mounted: {leftover[0]}")
            shutil.rmtree(self.root, ignore_errors=True)
