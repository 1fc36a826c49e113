"""Files a caller names, read bounded and without blocking; small state files, written whole and
root-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
