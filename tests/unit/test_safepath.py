"""Paths handled without following symlinks or crossing mounts (kata.utils.safepath), and mountinfo
parsed as bytes (kata.utils.mount). The mount cases need root: they mount tmpfs in a temp dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.utils import safepath
from kata.utils.mount import MS_BIND, mount, mounts_under, submounts, unescape_mountinfo, unmount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def test_mountinfo_octal_escapes_and_raw_bytes() -> None:
    assert unescape_mountinfo(b"/a\\040b\\011c\\012d\\134e") == b"/a b\tc\nd\\e"
    assert unescape_mountinfo(b"/caf\xc3\xa9/\xff") == b"/caf\xc3\xa9/\xff"
    assert unescape_mountinfo(b"/x\\0") == b"/x\\0"  # not an escape: kept as is


def test_mounts_under_non_ascii_names() -> None:
    info = (b"1 0 8:1 / / rw - ext4 /dev/sda rw\n"
            b"2 1 0:5 / /run/vol\\040caf\xc3\xa9 rw - tmpfs t rw\n"
            b"3 2 0:6 / /run/vol\\040caf\xc3\xa9/\xff\xfe rw - tmpfs t rw\n"
            b"4 1 0:7 / /run/volume rw - tmpfs t rw\n")
    found = mounts_under("/run/vol café", info)
    assert found == [os.fsdecode(b"/run/vol caf\xc3\xa9/\xff\xfe"), "/run/vol café"]


def test_submounts_relative_with_their_own_read_only_flag_parents_first() -> None:
    info = (b"1 0 8:1 / / rw - ext4 /dev/sda rw\n"
            b"2 1 8:1 /srv/v /m/c1/0-v ro,relatime - ext4 /dev/sda rw\n"
            b"5 3 0:9 / /m/c1/0-v/a\\040b/deep ro,nosuid master:3 - tmpfs t rw\n"
            # The superblock's "ro" (after the "-") is not the mount's own flag.
            b"3 2 0:6 / /m/c1/0-v/a\\040b rw,relatime shared:7 - tmpfs t ro\n"
            b"4 1 0:7 / /m/c1/0-vol rw - tmpfs t rw\n")  # a sibling whose name only starts alike
    assert submounts("/m/c1/0-v", info) == [("a b", False), ("a b/deep", True)]
    assert submounts("/m/c1/0-v/", info) == submounts("/m/c1/0-v", info)


def test_components_refuse_escapes() -> None:
    for bad in ("", "/abs", "a/../b", "..", ".", "a//b", "a/"):
        with pytest.raises(safepath.UnsafePathError):
            safepath.components(bad)
    assert safepath.components("c1/rootfs") == ["c1", "rootfs"]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    base = tmp_path / "root"
    base.mkdir()
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    try:
        yield base, fd
    finally:
        os.close(fd)


def test_mount_point_refuses_a_planted_symlink(root: tuple[Path, int], tmp_path: Path) -> None:
    base, fd = root
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "c1").symlink_to(outside)
    with pytest.raises(safepath.UnsafePathError):
        safepath.make_mount_point(fd, "c1/rootfs", directory=True)
    assert list(outside.iterdir()) == []
    (base / "c2").mkdir()
    (base / "c2" / "vol").symlink_to(outside / "file")
    with pytest.raises(safepath.UnsafePathError):
        safepath.make_mount_point(fd, "c2/vol", directory=False)
    assert not (outside / "file").exists()


def test_mount_point_is_new_and_of_its_kind(root: tuple[Path, int]) -> None:
    base, fd = root
    os.close(safepath.make_mount_point(fd, "c1/rootfs", directory=True))
    os.close(safepath.make_mount_point(fd, "c1/0-hosts", directory=False))
    assert (base / "c1" / "rootfs").is_dir() and (base / "c1" / "0-hosts").is_file()
    with pytest.raises(safepath.UnsafePathError, match="exists"):
        safepath.make_mount_point(fd, "c1/rootfs", directory=True)
    with pytest.raises(safepath.UnsafePathError):
        safepath.open_beneath(fd, "c1/0-hosts", directory=True)


def test_remove_tree_never_follows_symlinks(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    doomed = tmp_path / "doomed"
    (doomed / "a" / "b").mkdir(parents=True)
    (doomed / "a" / "link").symlink_to(keep)
    (doomed / "a" / "b" / "f").write_text("y")
    safepath.remove_tree(str(doomed))
    assert not doomed.exists()
    assert (keep / "precious").read_text() == "x"
    safepath.remove_tree(str(doomed))  # gone already: no error


@needs_root
def test_remove_tree_refuses_a_mount_below(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data").write_text("keep me")
    doomed = tmp_path / "doomed é"
    target = doomed / "deep" / "mnt\nx"
    target.mkdir(parents=True)
    mount(str(vol), str(target), None, MS_BIND)
    try:
        with pytest.raises(safepath.UnsafePathError, match="still mounted"):
            safepath.remove_tree(str(doomed))
        # Even when mountinfo is not consulted, the walk stops at the mount's boundary.
        fd = os.open(doomed, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(safepath.UnsafePathError, match="mounted there"):
                safepath._clear(fd, str(doomed), safepath.mount_id(fd))
        finally:
            os.close(fd)
        assert (vol / "data").read_text() == "keep me"
    finally:
        unmount(str(target))
    safepath.remove_tree(str(doomed))
    assert not doomed.exists() and (vol / "data").exists()
