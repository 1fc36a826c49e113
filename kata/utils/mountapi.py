"""Linux's file-descriptor mount API (open_tree, move_mount, mount_setattr) and openat2, through
libc's syscall().

The host uses them wherever a path could have been touched by the guest: a mount is prepared as a
detached tree (cloned from an fd, its flags set while nobody can see it) and attached to a target
fd that was resolved without following symlinks. No path is looked up twice, so there is no window
for a swapped component. These syscalls have the same number on every architecture (they came
after the syscall tables were unified), and exist since Linux 5.12 (mount_setattr) and 5.6 (openat2).
"""

from __future__ import annotations

import ctypes
import os

from kata.utils.mount import libc

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

RESOLVE_NO_XDEV = 0x1
RESOLVE_NO_MAGICLINKS = 0x2
RESOLVE_NO_SYMLINKS = 0x4
RESOLVE_BENEATH = 0x8

libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(number: int, what: str, *args: object) -> int:
    result = int(libc.syscall(ctypes.c_long(number), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat(2) with resolution rules (RESOLVE_*); the caller owns the returned fd."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _syscall(_SYS_OPENAT2, f"open {path}", ctypes.c_int(dir_fd), os.fsencode(path),
                    ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))


def clone_tree(source_fd: int, recursive: bool = True) -> int:
    """A detached copy of the mount (tree) at ``source_fd``, visible nowhere until move_mount()."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    return _syscall(_SYS_OPEN_TREE, "clone mount", ctypes.c_int(source_fd), b"", ctypes.c_uint(flags))


def set_attributes(mount_fd: int, attr_set: int = 0, attr_clr: int = 0, propagation: int = 0,
                   recursive: bool = True) -> None:
    """mount_setattr(2) on the mount at ``mount_fd`` (and every mount below it when ``recursive``)."""
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _syscall(_SYS_MOUNT_SETATTR, "set mount attributes", ctypes.c_int(mount_fd), b"", ctypes.c_uint(flags),
             ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def attach(mount_fd: int, target_fd: int) -> None:
    """Attach the detached tree ``mount_fd`` on the directory or file open at ``target_fd``."""
    _syscall(_SYS_MOVE_MOUNT, "attach mount", ctypes.c_int(mount_fd), b"", ctypes.c_int(target_fd), b"",
             ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
