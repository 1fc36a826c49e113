"""The virtio-fs share a pooled VM gets before any sandbox asks for it (kata.factory.pool).

Each clone gets a shared directory pair of its own in POOL_SHARES_ROOT/<key>/<slot> (kata.fs_share's
layout: ``mounts/`` for the host, ``shared/`` its read-only view), a virtiofsd serving it, and the
vhost-user-fs device hot-added: the guest has taken the device (PCIe hotplug, about 0.15 s under TCG)
long before a sandbox's CreateSandbox mounts it.

Handing over moves both with the VM. The directory is renamed to SHARED_ROOT/<sid>: the mounts below
it move with it, and virtiofsd serves the directory it opened (in a mount namespace of its own that
still receives the sandbox's later mounts, by slave propagation). Its socket, pid file and log live
in the VM's directory, which the pool renames to VM_ROOT/<sid>, where the sandbox finds them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kata.fs_share.shared_dir import SharedDir
from kata.fs_share.virtiofsd import Virtiofsd
from kata.sandbox.paths import POOL_SHARES_ROOT, SHARED_ROOT, VIRTIOFSD_SOCKET
from kata.utils.mount import mounts_under, unmount
from kata.utils.process import ProcessId, terminate
from kata.utils.safepath import remove_tree

if TYPE_CHECKING:
    from kata.config import HypervisorConfig
    from kata.hypervisor.base import Hypervisor, VMConfig

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class PooledShare:
    base: Path  # POOL_SHARES_ROOT/<key>/<slot>, holding mounts/ and shared/
    virtiofsd: Virtiofsd

    @property
    def dirs(self) -> SharedDir:
        return SharedDir(self.base / "mounts", self.base / "shared")


def prepare(hv: HypervisorConfig, config: VMConfig, vmm: Hypervisor, run_dir: Path,
            base: Path) -> PooledShare:
    """The clone's shared directory, served and hot-added to ``vmm``; nothing is left on failure."""
    assert config.shared_fs is not None
    share = PooledShare(base, Virtiofsd.configured(hv, run_dir / VIRTIOFSD_SOCKET, base / "shared"))
    share.dirs.create()
    try:
        share.virtiofsd.start(timeout=5.0)
        vmm.attach_shared_fs(dataclasses.replace(config.shared_fs, host_dir=base / "shared",
                                                 vhost_user_socket=share.virtiofsd.socket_path))
    except BaseException:
        remove(share)
        raise
    return share


def remove(share: PooledShare) -> None:
    share.virtiofsd.stop(timeout=1.0)
    share.dirs.destroy()


def _rename(src_dir: Path, src: str, dst_dir: Path, dst: str) -> None:
    """Rename between directory descriptors opened without following links."""
    sfd = os.open(src_dir, _DIR_FLAGS)
    try:
        dfd = os.open(dst_dir, _DIR_FLAGS)
        try:
            os.rename(src, dst, src_dir_fd=sfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def hand_over(share: PooledShare, sid: str) -> None:
    """Rename the clone's shared directory to sandbox ``sid``'s (absent: the sandbox removed its own,
    still empty, before asking)."""
    _rename(share.base.parent, share.base.name, SHARED_ROOT, sid)


def take_back(share: PooledShare, sid: str) -> None:
    """Undo hand_over when the VM itself could not be handed over."""
    _rename(SHARED_ROOT, sid, share.base.parent, share.base.name)


def sweep(run_dirs: Path, root: Path = POOL_SHARES_ROOT) -> None:
    """What shares a pool left: the virtiofsd in each clone's directory in ``run_dirs`` (its pid
    file names it) killed, every mount in ``root`` undone, and ``root``'s contents removed."""
    if run_dirs.is_dir():
        for pid_file in run_dirs.glob(f"*/*/{VIRTIOFSD_SOCKET}.pid"):
            try:
                pid, start_time = (int(x) for x in pid_file.read_text().split())
            except (OSError, ValueError):
                continue
            terminate(ProcessId(pid, start_time), 1.0)
    if not root.is_dir():
        return
    for point in mounts_under(str(root)):
        if Path(point) != root:
            unmount(point)
    for entry in root.iterdir():
        if not mounts_under(str(entry)):
            remove_tree(str(entry))
