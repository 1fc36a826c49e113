"""Host directories with mounts below them, for the tests of read-only flags and propagation (root only).

Whatever a test mounts below such a directory is unmounted when its block ends, whatever happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kata.utils.mount import MS_BIND, MS_SHARED, mount, mounts_under, unmount

# A shell function for a container: "PATH rw" when a file can be written at PATH, else "PATH ro".
PROBE_WRITE = 'w() { if echo x 2>/dev/null > "$1"; then echo "$1 rw"; else echo "$1 ro"; fi; }; '


@contextmanager
def shared_volume(path: Path) -> Iterator[Path]:
    """``path`` as a shared mount of its own (as a kubelet's pod directories are: containerd's CRI
    takes HOST_TO_CONTAINER only for a source on a shared or slave mount), with a tmpfs at
    ``sub`` and an empty directory ``late`` for a test to mount on later."""
    (path / "sub").mkdir(parents=True)
    (path / "late").mkdir()
    mount(str(path), str(path), None, MS_BIND)
    try:
        mount(None, str(path), None, MS_SHARED)
        mount("tmpfs", str(path / "sub"), "tmpfs", 0, "size=1m")
        yield path
    finally:
        for point in mounts_under(str(path)):
            unmount(point)


def mount_tmpfs(path: Path, file: str, text: str) -> None:
    """A new tmpfs at ``path`` holding ``file`` (what a container must see appear)."""
    mount("tmpfs", str(path), "tmpfs", 0, "size=1m")
    (path / file).write_text(text)
