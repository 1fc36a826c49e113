"""Namespace files (/proc/PID/ns/*, or one bind-mounted elsewhere): which namespace a path names.

A spec names each namespace to join by path under a type. A path of another type (an ipc namespace
given as the cgroup one) must be refused before anything is made for the container, as runc's
setns(2) would refuse it. The file is opened with O_PATH first, and opened for the type's ioctl only
once it is known to be on nsfs: a FIFO or a device given as a namespace does nothing. Python 3.11
has no os.setns, hence no CLONE_* names either.
"""

from __future__ import annotations

import fcntl
import os

from kata.errors import KataError
from kata.utils.ids import shown

# NS_GET_NSTYPE (linux/nsfs.h: _IO(0xb7, 0x3)) answers with the namespace's CLONE_NEW* flag.
_NS_GET_NSTYPE = 0xB703
# Each runtime-spec namespace type's CLONE_NEW* flag (linux/sched.h).
_CLONE_FLAGS = {"network": 0x40000000, "mount": 0x00020000, "pid": 0x20000000, "ipc": 0x08000000,
                "uts": 0x04000000, "user": 0x10000000, "cgroup": 0x02000000, "time": 0x00000080}


class NamespacePathError(KataError):
    """A namespace path that names no namespace, or one of another type; one line for the user."""


def identify(kind: str, path: str) -> int:
    """The inode of the ``kind`` namespace (a runtime-spec type) at ``path``; NamespacePathError
    when there is none there, or the namespace there is of another type."""
    where = f"{kind} namespace {shown(path)}"
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespacePathError(f"{where}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        # Every namespace file is on nsfs: one filesystem, the one our own are on.
        if st.st_dev != os.stat("/proc/self/ns/net").st_dev:
            raise NamespacePathError(f"{where}: not a namespace")
        found = _nstype(fd, where)
    finally:
        os.close(fd)
    if found != _CLONE_FLAGS[kind]:
        theirs = next((name for name, flag in _CLONE_FLAGS.items() if flag == found), f"0x{found:x}")
        raise NamespacePathError(f"{where}: the path is a namespace of type {theirs}, not {kind}")
    return st.st_ino


def _nstype(path_fd: int, where: str) -> int:
    """NS_GET_NSTYPE of the nsfs file behind ``path_fd``. The link of /proc/self/fd/N names the type
    only for /proc/PID/ns/* ("ipc:[...]"), not for a namespace bind-mounted elsewhere (/run/netns/x),
    and an O_PATH descriptor takes no ioctl: the file is opened again, now known to be on nsfs."""
    try:
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespacePathError(f"{where}: {exc.strerror}") from None
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError as exc:
        raise NamespacePathError(f"{where}: {exc.strerror}") from None
    finally:
        os.close(fd)
