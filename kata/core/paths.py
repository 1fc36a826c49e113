"""Where a sandbox keeps its things on the host, following Kata's layout under /run."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kata.errors import KataError

# Kata's locations: persisted sandbox state under /run/vc/sbs, VMM sockets under /run/vc/vm,
# and the directory shared into the guest under /run/kata-containers/shared/sandboxes.
STATE_ROOT = Path(os.environ.get("KATA_STATE_ROOT", "/run/vc"))
SHARED_ROOT = Path(os.environ.get("KATA_SHARED_ROOT", "/run/kata-containers/shared/sandboxes"))

_ID_RE = re.compile(r"[\w+\-.]+")


class InvalidIdError(KataError, ValueError):
    pass


def validate_id(id_: str) -> str:
    """runc's rule for container ids: also keeps ids safe to use as path components."""
    if not id_ or id_ in (".", "..") or not _ID_RE.fullmatch(id_) or len(id_) > 1024:
        raise InvalidIdError(f"invalid id format: {id_!r}")
    return id_


@dataclass(frozen=True)
class SandboxPaths:
    id: str

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / "sbs" / self.id

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "lock"

    @property
    def vm_dir(self) -> Path:
        return STATE_ROOT / "vm" / self.id

    @property
    def virtiofsd_socket(self) -> Path:
        return self.vm_dir / "vhost-fs.sock"

    @property
    def shared_base(self) -> Path:
        return SHARED_ROOT / self.id

    @property
    def mounts_dir(self) -> Path:
        """Where the host mounts containers' rootfs and volumes: never exported to the guest."""
        return self.shared_base / "mounts"

    @property
    def shared_dir(self) -> Path:
        """The directory exported to the guest: a read-only view of mounts_dir that receives its mounts."""
        return self.shared_base / "shared"

    def all_dirs(self) -> tuple[Path, ...]:
        return (self.state_dir, self.vm_dir, self.shared_base)
