"""The task's root filesystem: containerd hands a shim its snapshot as mounts (Create's `rootfs`),
which the shim mounts at the bundle's `rootfs` and unmounts at Delete, as runc's shim does."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from kata.errors import KataError
from kata.utils.mount import MountError, mount, split_options, unmount

# mount(2) copies at most one page of options.
_MAX_DATA = 4096


class RootfsError(KataError):
    pass


class MountSpec(Protocol):
    type: str
    source: str
    options: Sequence[str]


def mount_rootfs(mounts: Sequence[MountSpec], bundle: Path) -> Path | None:
    """Mount ``mounts`` in order at ``bundle``/rootfs; None when there are none (the bundle's own
    rootfs directory is used as it is)."""
    if not mounts:
        return None
    target = bundle / "rootfs"
    target.mkdir(mode=0o711, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            flags, data = split_options(m.options)
            if len(data) >= _MAX_DATA:
                raise RootfsError(f"rootfs {m.type} mount: {len(data)} bytes of options exceed one page")
            mount(m.source, str(target), m.type, flags, data)
            done += 1
    except MountError as exc:
        raise RootfsError(f"mounting the rootfs: {exc.strerror}") from exc
    finally:
        if done < len(mounts):
            for _ in range(done):
                unmount(str(target))
    return target


def unmount_rootfs(bundle: Path) -> None:
    """Undo every mount at ``bundle``/rootfs (a stacked rootfs has several)."""
    target = str(bundle / "rootfs")
    for _ in range(16):
        if not os.path.ismount(target):
            return
        unmount(target)
