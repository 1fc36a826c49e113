"""Install built assets under Kata's well-known names: versioned files, atomically replaced symlinks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kata.osbuilder.cache import DIGEST_LEN

KERNEL_LINK = "vmlinux.container"
IMAGE_LINK = "kata-containers.img"


def link_atomically(link: Path, target: Path) -> None:
    """Point link at target (relative, same dir) with rename(2), so readers see the old or the new asset."""
    tmp = link.with_name(f".{link.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target.name if target.parent == link.parent else str(target), tmp)
    os.replace(tmp, link)


def installed_target(link: Path) -> Path | None:
    """Where link points, if it is a symlink to an existing file."""
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return target if target.exists() else None


def built_names(prefix: str, suffix: str = "") -> str:
    """The glob pattern of our builds' names, PREFIX + a digest + SUFFIX, and of nothing else: what an
    operator keeps beside them (a host kernel's vmlinux-6.1.0-amd64, linux-headers-*) never matches
    the digest's DIGEST_LEN hex digits."""
    return prefix + "[0-9a-f]" * DIGEST_LEN + suffix


def prune_others(current: Path, pattern: str) -> list[str]:
    """Remove the siblings of ``current`` that match ``pattern`` (older builds of the same asset).

    Each guest-code change makes a new ~50 MB image; without this they pile up. A VM still running
    from a removed image keeps its open file, and templates made from it are pruned with it.
    """
    removed = []
    for other in current.parent.glob(pattern):
        if other != current and not other.is_symlink():
            if other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
            else:
                other.unlink(missing_ok=True)
            removed.append(other.name)
    return removed
