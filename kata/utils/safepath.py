"""Creating, opening and removing host paths without following symlinks or crossing mounts.

Used wherever a path lies in a directory the guest can write, or could once have written, and for
every removal of runtime state: a symlink planted by the guest must never send the host elsewhere,
and a removal must never descend into a bind mount (a volume still mounted would lose its files).
"""

from __future__ import annotations

import os
import stat

from kata.utils.mount import mounts_under
from kata.utils.mountapi import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2

_RESOLVE = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS


class UnsafePathError(OSError):
    """A path was refused: a symlink, the wrong kind of file, a name that leaves its root, or a mount."""


def components(relative: str) -> list[str]:
    """The names of a relative path; refuses anything that could step out of its root."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"unsafe relative path {relative!r}")
    return parts


def open_beneath(root_fd: int, relative: str, directory: bool | None = None) -> int:
    """An O_PATH fd of ``relative`` below ``root_fd``, resolved without following any symlink and
    without leaving the root. ``directory`` True/False also requires that kind of file."""
    components(relative)
    try:
        fd = openat2(root_fd, relative, os.O_PATH, _RESOLVE)
    except OSError as exc:
        raise UnsafePathError(exc.errno, f"{relative}: {exc.strerror}") from None
    try:
        _check_kind(fd, relative, directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_kind(fd: int, name: str, directory: bool | None) -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISLNK(mode):
        raise UnsafePathError(f"{name} is a symlink")
    if directory is True and not stat.S_ISDIR(mode):
        raise UnsafePathError(f"{name} is not a directory")
    if directory is False and not stat.S_ISREG(mode):
        raise UnsafePathError(f"{name} is not a regular file")


def make_dirs_beneath(root_fd: int, relative: str, mode: int = 0o700) -> int:
    """Create the directories of ``relative`` below ``root_fd`` as needed (a component that exists
    must be a real directory) and return an O_PATH fd of the last one."""
    fd = os.dup(root_fd)
    try:
        for name in components(relative):
            try:
                os.mkdir(name, mode, dir_fd=fd)
            except FileExistsError:
                pass
            child = open_beneath(fd, name, directory=True)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_mount_point(root_fd: int, relative: str, directory: bool, mode: int = 0o700) -> int:
    """A new, empty mount point at ``relative`` below ``root_fd`` (a directory, or an empty file for
    a file's bind mount), made here and now: an existing entry is refused. Returns its O_PATH fd."""
    parts = components(relative)
    parent = make_dirs_beneath(root_fd, "/".join(parts[:-1]), mode) if len(parts) > 1 else os.dup(root_fd)
    name = parts[-1]
    try:
        if directory:
            os.mkdir(name, mode, dir_fd=parent)
        else:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             mode & 0o666, dir_fd=parent))
        return open_beneath(parent, name, directory=directory)
    except FileExistsError:
        raise UnsafePathError(f"{relative} exists already") from None
    finally:
        os.close(parent)


def mount_id(fd: int) -> int:
    """The id of the mount that ``fd`` lies on (from /proc/self/fdinfo): bind mounts of the same
    filesystem share st_dev, but never a mount id."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise UnsafePathError(f"no mount id for fd {fd}")


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it, refusing (UnsafePathError, nothing of the mount
    touched) when a mount lies at or below it: never descends into another mount, never follows a
    symlink. A missing path is no error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    mounted = mounts_under(path)
    if mounted:
        raise UnsafePathError(f"refusing to remove {path}: {mounted[0]} is still mounted")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _clear(fd, path, mount_id(fd))
    finally:
        os.close(fd)
    os.rmdir(path)


def _clear(dir_fd: int, where: str, top_mount: int) -> None:
    with os.scandir(dir_fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        if not is_dir:
            os.unlink(name, dir_fd=dir_fd)
            continue
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if mount_id(child) != top_mount:
                raise UnsafePathError(f"refusing to remove {where}/{name}: a filesystem is mounted there")
            _clear(child, f"{where}/{name}", top_mount)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=dir_fd)
