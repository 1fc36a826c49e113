"""mount(2) and umount2(2) through libc, for the host runtime and the guest agent alike.

No fork of /bin/mount on the container start path; and only ctypes and os, since the guest agent
pays for every import at start-up.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

_FLAGS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "remount": MS_REMOUNT, "bind": MS_BIND, "rbind": MS_BIND | MS_REC,
}
_NO_FLAGS = {"rw", "suid", "dev", "exec", "defaults"}


def split_options(options: Iterable[str]) -> tuple[int, str]:
    """Mount options → (flags, data string) as mount(2) wants them."""
    flags = 0
    data = []
    for opt in options:
        for o in opt.split(","):
            if o in _FLAGS:
                flags |= _FLAGS[o]
            elif o and o not in _NO_FLAGS:
                data.append(o)
    return flags, ",".join(data)


# The process's own symbols include libc's (no ctypes.util lookup: it imports subprocess and more).
libc = ctypes.CDLL(None, use_errno=True)


class MountError(OSError):
    pass


def _enc(s: str | None) -> bytes | None:
    return s.encode() if s else None


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    if libc.mount(_enc(source), target.encode(), _enc(fstype), ctypes.c_ulong(flags), _enc(data)) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {fstype or ''} {source or ''} on {target}: {os.strerror(err)}")


def bind_mount(source: str, target: str, read_only: bool = False, recursive: bool = True) -> None:
    """Bind ``source`` on ``target`` (which must exist, same type as source)."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    # A private mount keeps later host mounts/unmounts under source from leaking into the share.
    mount(None, target, None, MS_PRIVATE | MS_REC)
    if read_only:
        # MS_RDONLY is ignored on the initial bind; it needs a remount of the bind mount.
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def unmount(target: str) -> None:
    """Detach ``target`` (lazy, so a busy mount never blocks cleanup); a non-mount is no error."""
    if libc.umount2(target.encode(), MNT_DETACH) != 0:
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
