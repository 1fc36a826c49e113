"""Reading a file a caller names (a bundle's config.json, a --process or --resources file): it may
be anything, so it is read without blocking and bounded."""

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
