"""Gives the container's device nodes the modes the spec asks for.

crun (1.8) makes linux.devices nodes with mknod under its umask, so a node asked for as 0660 comes
out 0640; runc makes them under umask 0. Between `crun create` and `crun start` only crun's init
runs in the container, so the agent sets each node's mode then, through the init's root and without
following any symlink (RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH: a path of the image cannot send the
agent out of the container).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from kata.guest.agent import log
from kata.utils.safepath import UnsafePathError, open_beneath


def fix_device_modes(init_pid: int, spec: dict[str, Any]) -> None:
    devices = (spec.get("linux") or {}).get("devices") or ()
    wanted = [(d["path"], d["fileMode"]) for d in devices if isinstance(d, dict)
              and isinstance(d.get("path"), str) and isinstance(d.get("fileMode"), int)]
    if not wanted:
        return
    try:
        root = os.open(f"/proc/{init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:  # the init is gone: start reports that
        log.warn(f"device modes not set: {e}")
        return
    try:
        for path, mode in wanted:
            try:
                fd = open_beneath(root, os.path.normpath(path).lstrip("/"))
            except (UnsafePathError, OSError) as e:
                log.warn(f"device {path}: mode not set: {e}")
                continue
            try:
                kind = os.fstat(fd).st_mode
                if stat.S_ISCHR(kind) or stat.S_ISBLK(kind) or stat.S_ISFIFO(kind):
                    os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
            finally:
                os.close(fd)
    finally:
        os.close(root)
