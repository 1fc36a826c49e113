"""Files: those a caller names, read bounded and without blocking; state files, written whole and
root-only, as JSON too; and flock-based locks, so that racing commands each see whole states."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Real specs, processes and resources are a few KiB.
MAX_JSON_BYTES = 16 << 20


class NotReadable(ValueError):
    """The path names something other than a regular file, or one larger than allowed."""


def read_regular_file(path: Path | str, limit: int = MAX_JSON_BYTES) -> bytes:
    """At most ``limit`` bytes of ``path``, which must be a regular file once symlinks are followed:
    opened without blocking (a FIFO would hang the open) and never read past the limit (a symlink to
    /dev/zero would fill memory). OSError as open(2) fails; NotReadable for the rest."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotReadable("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotReadable(f"larger than {limit >> 20} MiB")
    return data


def regular_file_size(path: Path | str) -> int:
    """The size of ``path`` once symlinks are followed, when it is a regular file; 0 otherwise
    (missing, unreadable, a device, a FIFO, a directory)."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def write_private(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``data`` to a temporary file born with ``mode`` (no umask window, no symlink followed),
    then rename it over ``path``: readers see the old file or the new one, never half of one."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as a whole file, root-only (write_private): it may name bundles, pids and configuration."""
    write_private(path, json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


@contextmanager
def locked(lock_file: Path, shared: bool = False) -> Iterator[None]:
    """flock-based lock; released when the process dies, so a crash never leaves it stuck."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lock_held(lock_file: Path) -> bool:
    """Whether some process holds a flock on ``lock_file`` (False if there is no such file)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def pid_lock(lock_file: Path, wait: float = 0.0) -> int | None:
    """A daemon's lock: ``lock_file`` (made 0600, never through a symlink) flocked, within ``wait``
    seconds, with this process's pid written in it; the descriptor, to hold for the daemon's life,
    or None when another process holds it."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
