"""The PID 1 filesystems and the storages the host asks for (mount(2) itself: kata.utils.mount)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from kata.guest.agent import log
from kata.utils.mount import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    mount,
    split_options,
)

# (source, target, fstype, flags, data) in order; the root is a read-only erofs.
_EARLY = [
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
]


def _mounted(target: str) -> bool:
    return os.path.ismount(target)


def mount_early() -> None:
    for source, target, fstype, flags, data in _EARLY:
        if _mounted(target):
            continue  # e.g. devtmpfs auto-mounted by the kernel
        try:
            os.makedirs(target, exist_ok=True)
        except OSError:
            pass  # read-only root: the image must have the directory already
        try:
            mount(source, target, fstype, flags, data)
        except OSError as e:
            log.warn(str(e))
    # /dev/ptmx must be the one of our devpts instance for crun's ptys.
    try:
        if not os.path.islink("/dev/ptmx"):
            os.unlink("/dev/ptmx")
            os.symlink("pts/ptmx", "/dev/ptmx")
    except OSError as e:
        log.warn(f"/dev/ptmx: {e}")
    enable_cgroup_controllers()


def enable_cgroup_controllers(root: str = "/sys/fs/cgroup") -> None:
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            controllers = f.read().split()
    except OSError as e:
        log.warn(f"cgroup2: {e}")
        return
    for c in controllers:
        # One at a time: a controller the kernel refuses must not block the others.
        try:
            with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
                f.write(f"+{c}")
        except OSError as e:
            log.warn(f"cgroup2 controller {c}: {e}")


def mount_storage(driver: str, source: str, fstype: str, options: Iterable[str], mount_point: str) -> None:
    """Mount one Storage of the agent API."""
    if not mount_point.startswith("/"):
        raise ValueError(f"storage mount point {mount_point!r} is not absolute")
    flags, data = split_options(options)
    if driver in ("virtio-fs", "virtiofs"):
        fstype = fstype or "virtiofs"
    elif driver == "9p":
        fstype = fstype or "9p"
        if "trans=" not in data:
            data = ",".join(x for x in (data, "trans=virtio,version=9p2000.L") if x)
    elif driver in ("bind", "local") and not fstype:
        flags |= MS_BIND
        fstype = "none"
    if not fstype:
        raise ValueError(f"storage {source!r}: no fstype for driver {driver!r}")
    os.makedirs(mount_point, exist_ok=True)
    if fstype == "virtiofs":
        _mount_when_present(source, mount_point, fstype, flags, data)
        widen_readahead(mount_point, VIRTIOFS_READAHEAD_KB)
    else:
        mount(source, mount_point, fstype, flags, data)
    log.info(f"mounted {driver} {source} on {mount_point}")


# FUSE starts a mount with a 128 KiB read-ahead window: a sequential read costs a round trip to
# virtiofsd per 128 KiB. QEMU's virtiofsd takes up to 1 MiB per request (256 pages); with the window
# that wide a 256 MiB read from a container took 15% less time here (TCG). Linux grows the window
# only for reads it sees are sequential, so random reads do not fetch more.
VIRTIOFS_READAHEAD_KB = 1024


def widen_readahead(mount_point: str, kib: int) -> None:
    """Set the read-ahead window of the filesystem mounted on mount_point (its bdi, by device)."""
    st = os.stat(mount_point)
    knob = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.warn(f"{knob}: {e}")


# A virtio-fs device hot-added to a VM restored from a template shows up a little after the host's
# device_add returns (PCIe hotplug in the guest); until then its tag is unknown (EINVAL/ENOENT).
VIRTIOFS_APPEAR_TIMEOUT = 10.0


def _mount_when_present(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    import errno
    import time

    deadline = time.monotonic() + VIRTIOFS_APPEAR_TIMEOUT
    while True:
        try:
            mount(source, target, fstype, flags, data)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)
