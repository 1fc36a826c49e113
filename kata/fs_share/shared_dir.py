"""The host directories behind a sandbox's shared filesystem, and the bind mounts that fill them.

Kata's layout (its fix for CVE-2020-2024, a guest that planted symlinks where the host mounts next):
the host mounts each container's rootfs and volumes in ``mounts/``, which only the host can write,
and the guest is given ``shared/``, a read-only view of it that receives every mount made there
(slave propagation). The guest cannot create an entry anywhere the host will mount, and the host
never follows a symlink below ``mounts/``: targets are created and opened with no-follow rules and
mounted through their file descriptors.

A share is a detached clone of its source's mount (with its submounts for "rbind"), given its
flags and propagation before it becomes visible, then attached; the propagated copy in ``shared/``
carries the same flags. A read-only share is read-only at its top, as runc's "ro" is, and all the
way down for "rro"; a submount of a share stays a mount of its own with its own flags (virtiofsd
announces it to the guest as such).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from kata.errors import KataError
from kata.sandbox.paths import validate_id
from kata.utils import mountapi
from kata.utils.mount import (
    MS_BIND,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    mount,
    mounts_under,
    submounts,
    unmount,
)
from kata.utils.safepath import make_mount_point, remove_tree

if TYPE_CHECKING:
    from kata.specconv import HostShare  # the OCI translation: only what it hands us


SHARE_DIR_MODE = 0o711


class ShareError(KataError):
    pass


def check_source(share: HostShare) -> Path:
    """The share's source, which must exist (as for runc's bind mounts)."""
    source = Path(share.source)
    if not source.exists():
        raise ShareError(f"mount source {share.source} does not exist")
    return source


class SharedDir:
    def __init__(self, mounts: Path, shared: Path) -> None:
        self.mounts = mounts  # where the host mounts: never exported
        self.shared = shared  # the guest's read-only view of it

    def create(self) -> None:
        """Both directories, and the propagation from ``mounts/`` to the read-only ``shared/``."""
        # The sandbox's directory keeps other host users out (0700). What the guest sees below it
        # may be traversed by anyone (0711): a container in a user namespace whose root is not the
        # guest's must reach its rootfs through these directories (runc needs the same of a bundle).
        self.mounts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.mounts, self.shared):
            d.mkdir(mode=0o700, exist_ok=True)
            d.chmod(SHARE_DIR_MODE)
        try:
            # A mount of its own, private first so nothing of ours reaches the parent's peers, then
            # shared so that what is mounted below it shows in shared/ too.
            mount(str(self.mounts), str(self.mounts), None, MS_BIND)
            mount(None, str(self.mounts), None, MS_PRIVATE)
            mount(None, str(self.mounts), None, MS_SHARED)
            mount(str(self.mounts), str(self.shared), None, MS_BIND)
            mount(None, str(self.shared), None, MS_SLAVE)
            mount(None, str(self.shared), None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError as exc:
            raise ShareError(f"preparing the shared directory: {exc.strerror or exc}") from exc

    def add(self, share: HostShare) -> None:
        """Bind ``share.source`` (the caller's path, resolved as runc resolves mount sources) at
        ``share.name`` below ``mounts/``; it appears at the same name in ``shared/``."""
        try:
            source = os.open(share.source, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ShareError(f"mount source {share.source} does not exist") from None
        except OSError as exc:
            raise ShareError(f"mount source {share.source}: {exc.strerror}") from None
        fds = [source]
        try:
            directory = stat.S_ISDIR(os.fstat(source).st_mode)
            root = os.open(self.mounts, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds.append(root)
            target = make_mount_point(root, share.name, directory, mode=SHARE_DIR_MODE)
            fds.append(target)
            tree = mountapi.clone_tree(source, recursive=share.recursive)
            fds.append(tree)
            # Private: later mounts at the source stay out of the guest's view (runc's default).
            # Slave: they come in (mount events flow from the source's peers to the share only,
            # never back, so nothing made below the share reaches the source).
            mountapi.set_attributes(tree, propagation=MS_SLAVE if share.slave else MS_PRIVATE)
            if share.read_only:
                # All flags are set while the tree is detached: the guest never sees it writable.
                mountapi.set_attributes(tree, attr_set=mountapi.MOUNT_ATTR_RDONLY,
                                        recursive=share.recursive_read_only)
            mountapi.attach(tree, target)
        except OSError as exc:
            raise ShareError(f"sharing {share.source} as {share.name}: {exc.strerror or exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)

    def submounts(self, name: str) -> list[tuple[str, bool]]:
        """The mounts below the share ``name`` now (relative path, read-only), parents first."""
        return submounts(str(self.mounts / name))

    def remove(self, container_id: str) -> None:
        """Unmount and delete everything a container shared (all of it under the directory named by
        its id, see kata.specconv.plan_container)."""
        top = self.mounts / validate_id(container_id)
        for point in mounts_under(str(top)):
            unmount(point)
        try:
            remove_tree(str(top))
        except OSError as exc:
            raise ShareError(f"removing the shares of {container_id}: {exc.strerror or exc}") from exc

    def destroy(self) -> None:
        """Unmount everything, then delete both directories; never descends into a mount."""
        for root in (self.shared, self.mounts):
            for point in mounts_under(str(root)):
                unmount(point)
        base = self.mounts.parent
        leftover = mounts_under(str(base))
        if leftover:
            raise ShareError(f"still mounted: {leftover[0]}")
        try:
            remove_tree(str(base))
        except OSError as exc:
            raise ShareError(f"removing {base}: {exc.strerror or exc}") from exc
