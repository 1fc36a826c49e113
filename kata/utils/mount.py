"""mount(2) and umount2(2) through libc, for the host runtime and the guest agent alike.

No fork of /bin/mount on the container start path; and only ctypes and os, since the guest agent
pays for every import at start-up.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from typing import NamedTuple

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

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
    return os.fsencode(s) if s else None


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    if libc.mount(_enc(source), os.fsencode(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data)) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {fstype or ''} {source or ''} on {target}: {os.strerror(err)}")


def unmount(target: str) -> None:
    """Detach ``target`` (lazy, so a busy mount never blocks cleanup); a non-mount is no error.
    A symlink at ``target`` is never followed: it cannot send the unmount elsewhere."""
    if libc.umount2(os.fsencode(target), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone already
            raise MountError(err, f"unmount {target}: {os.strerror(err)}")


def unescape_mountinfo(field: bytes) -> bytes:
    """A mountinfo path field as the bytes of the path: the kernel writes space, tab, newline and
    backslash as three-digit octal escapes (\\040 ...); everything else, UTF-8 or not, is raw."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        octal = field[i + 1:i + 4]
        if field[i] == 0x5C and len(octal) == 3 and all(0x30 <= c <= 0x37 for c in octal):
            out.append(int(octal, 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


class _Mount(NamedTuple):
    point: str
    kind: str
    read_only: bool  # the mount's own flag (not its superblock's)


def _mounts(mountinfo: bytes | None) -> list[_Mount]:
    """Each mount, in mount order (a later one covers an earlier one on the same point). Points
    are Python paths (os.fsdecode of the raw bytes, so that a non-UTF-8 name compares equal to the
    path that names it)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo", "rb") as f:
            mountinfo = f.read()
    found = []
    for line in mountinfo.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 5:
            # The type is the field after the "-" that ends the optional fields.
            kind = fields[fields.index(b"-") + 1] if b"-" in fields[:-1] else b""
            found.append(_Mount(os.fsdecode(unescape_mountinfo(fields[4])), os.fsdecode(kind),
                                b"ro" in fields[5].split(b",")))
    return found


def mount_points(mountinfo: bytes | None = None) -> list[str]:
    """Every mount point of this mount namespace."""
    return [m.point for m in _mounts(mountinfo)]


def submounts(top: str, mountinfo: bytes | None = None) -> list[tuple[str, bool]]:
    """The mounts strictly below the mount point ``top``: (path relative to it, read-only), a
    parent before its children."""
    prefix = top.rstrip("/") + "/"
    found = [(m.point[len(prefix):], m.read_only) for m in _mounts(mountinfo) if m.point.startswith(prefix)]
    return sorted(found, key=lambda sub: sub[0].count("/"))


def fs_type(path: str, mountinfo: bytes | None = None) -> str | None:
    """The filesystem type that holds ``path`` (or would, for a path not made yet): the type of the
    deepest mount at or above it. None when no mount covers it."""
    path = os.path.normpath(path)
    best: tuple[int, str] | None = None
    for point, kind, _ in _mounts(mountinfo):
        if path == point or path.startswith(point.rstrip("/") + "/"):
            depth = 0 if point == "/" else point.count("/")
            if best is None or depth >= best[0]:
                best = (depth, kind)
    return best[1] if best else None


def mounts_under(prefix: str, mountinfo: bytes | None = None) -> list[str]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount them)."""
    prefix = prefix.rstrip("/")
    found = [p for p in mount_points(mountinfo) if p == prefix or p.startswith(prefix + "/")]
    return sorted(found, key=lambda p: p.count("/"), reverse=True)
