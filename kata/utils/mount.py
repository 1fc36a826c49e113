"""Bind mounts through the mount(2) syscall: no fork of /bin/mount on the container start path."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class MountError(OSError):
    pass


def _check(ret: int, what: str, path: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"{what} {path}: {os.strerror(err)}")


def bind_mount(source: str, target: str, read_only: bool = False, recursive: bool = True) -> None:
    """Bind ``source`` on ``target`` (which must exist, same type as source)."""
    flags = MS_BIND | (MS_REC if recursive else 0)
    _check(_libc.mount(source.encode(), target.encode(), None, flags, None), "bind mount", target)
    # A private mount keeps later host mounts/unmounts under source from leaking into the share.
    _check(_libc.mount(None, target.encode(), None, MS_PRIVATE | MS_REC, None), "make private", target)
    if read_only:
        # MS_RDONLY is ignored on the initial bind; it needs a remount of the bind mount.
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        _check(_libc.mount(None, target.encode(), None, flags, None), "read-only remount", target)


def unmount(target: str) -> None:
    """Detach ``target`` (lazy, so a busy mount never blocks cleanup); a non-mount is no error."""
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone already
            raise MountError(err, f"unmount {target}: {os.strerror(err)}")


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount them)."""
    prefix = prefix.rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)
