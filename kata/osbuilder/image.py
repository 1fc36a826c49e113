"""The guest root as a read-only erofs image, byte-for-byte reproducible from the same tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kata.hypervisor.qemu_argv import PMEM_ALIGN

# A fixed UUID and timestamp: otherwise mkfs.erofs stamps each build with a random UUID and the build time.
FIXED_UUID = "00000000-0000-4000-8000-00006b617461"


class ImageError(RuntimeError):
    """A one-line reason why the image could not be made."""


@dataclass(frozen=True)
class ErofsOptions:
    compression: str | None = None  # e.g. "lz4hc"; None = uncompressed (DAX maps only those files)
    timestamp: int = 0
    # Padded with zeroes to a multiple of this: the guest maps the image as persistent memory,
    # in 2 MiB sections, and QEMU maps a read-only file only whole.
    align: int = PMEM_ALIGN

    def args(self) -> list[str]:
        args = [f"-T{self.timestamp}", f"-U{FIXED_UUID}", "--all-root", "-x-1", "--quiet"]
        if self.compression:
            args.append(f"-z{self.compression}")
        else:
            # Every file's data in whole blocks: erofs maps only such files with DAX (a file whose
            # tail is packed beside its inode goes through the guest's page cache).
            args.append("-Enoinline_data")
        return args


def make_erofs(tree: Path, target: Path, options: ErofsOptions) -> Path:
    """Write the image next to target, then rename: a reader never sees a half-written image."""
    if shutil.which("mkfs.erofs") is None:
        raise ImageError("mkfs.erofs not found: apt-get install erofs-utils")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(options.timestamp))
    res = subprocess.run(
        ["mkfs.erofs", *options.args(), str(tmp), str(tree)], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        err = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"mkfs.erofs failed (exit {res.returncode}): {err}")
    size = tmp.stat().st_size
    os.truncate(tmp, -(-size // options.align) * options.align)  # erofs ignores what follows it
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target
