"""Namespace files (/proc/PID/ns/*, or one bind-mounted elsewhere): which namespace a path names.

A spec names each namespace to join by path under a type. A path of another type (an ipc namespace
given as the cgroup one) must be refused before anything is made for the container, as runc's
setns(2) would refuse it. The file is opened with O_PATH and never read: a FIFO or a device given as
a namespace does nothing. Python 3.11 has no os.setns, hence no CLONE_* names either.
"""

from __future__ import annotations

import os

from kata.errors import KataError
from kata.utils.ids import shown

# The kernel's name of each namespace type (what a namespace file's link reads: "ipc:[4026531839]"),
# by the runtime-spec's.
KERNEL_NAMES = {"network": "net", "mount": "mnt", "pid": "pid", "ipc": "ipc", "uts": "uts", "user": "user",
                "cgroup": "cgroup", "time": "time"}
_SPEC_NAMES = {kernel: spec for spec, kernel in KERNEL_NAMES.items()}


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
        found = os.readlink(f"/proc/self/fd/{fd}").partition(":")[0]
    finally:
        os.close(fd)
    if found != KERNEL_NAMES.get(kind):
        theirs = _SPEC_NAMES.get(found, shown(found))
        raise NamespacePathError(f"{where}: the path is a namespace of type {theirs}, not {kind}")
    return st.st_ino
