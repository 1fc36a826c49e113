"""Sharing host directories with the guest: virtio-fs (through virtiofsd) by default, 9p as fallback.

9p needs no daemon (QEMU serves it); the core only has to know which kind to ask the hypervisor for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from kata.hypervisor.host import find_virtiofsd

from .virtiofsd import CacheMode, Virtiofsd, VirtiofsdError

__all__ = ["CacheMode", "SharedFsKind", "Virtiofsd", "VirtiofsdError", "choose_kind", "find_virtiofsd"]

SharedFsKind = Literal["virtio-fs", "virtio-9p"]
log = logging.getLogger(__name__)


def choose_kind(configured: SharedFsKind = "virtio-fs", virtiofsd: Path | None = None) -> SharedFsKind:
    """virtio-fs unless 9p is configured or no virtiofsd binary is found (then 9p, with a warning)."""
    if configured == "virtio-9p":
        return "virtio-9p"
    binary = virtiofsd or find_virtiofsd()
    if binary is None or not binary.is_file():
        log.warning("virtiofsd not found (%s): sharing files over virtio-9p", binary or "searched PATH")
        return "virtio-9p"
    return "virtio-fs"
