"""Persisted state: atomic JSON files and per-object locks, so racing CLI calls see whole states."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kata.utils.files import write_private


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write then rename: readers see the old file or the new one, never half of one. The file is
    born root-only (0600), whatever the umask: it may name bundles, pids and configuration."""
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
