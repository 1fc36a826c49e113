"""The sandbox's shared directory on real mounts (root only): the host mounts in a host-only
``mounts/``, the guest's ``shared/`` is a read-only view that receives those mounts, read-only
shares are read-only at their top ("ro") or all the way down ("rro"), slave shares receive the
host's later mounts and send none back, and nothing planted or left mounted is ever followed or
deleted."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.fs_share.shared_dir import SharedDir, ShareError
from kata.sandbox.paths import InvalidIdError
from kata.specconv import HostShare, bind_share
from kata.utils.mount import mount, mounts_under, unmount
from tests.support.mounts import mount_tmpfs, shared_volume

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedDir]:
    sd = SharedDir(tmp_path / "sb" / "mounts", tmp_path / "sb" / "shared")
    sd.create()
    try:
        yield sd
    finally:
        for point in mounts_under(str(tmp_path)):
            unmount(point)


def _write_fails(path: Path) -> bool:
    try:
        path.write_text("x")
    except OSError as exc:
        return exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    return False


def test_guest_view_is_read_only_and_receives_mounts(shared: SharedDir, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    shared.add(HostShare(str(rootfs), "c1/rootfs", read_only=False))
    shared.add(HostShare(str(hosts), "c1/0-hosts", read_only=True))
    # The guest cannot create anything where the host mounts next.
    assert _write_fails(shared.shared / "c2")
    assert _write_fails(shared.shared / "c1" / "planted")
    # The container's rootfs is writable through the view; the read-only file is not.
    (shared.shared / "c1" / "rootfs" / "new").write_text("from the guest")
    assert (rootfs / "new").read_text() == "from the guest"
    assert (shared.shared / "c1" / "0-hosts").read_text().startswith("127.0.0.1")
    assert _write_fails(shared.shared / "c1" / "0-hosts")
    with pytest.raises(ShareError, match="does not exist"):
        shared.add(HostShare(str(tmp_path / "missing"), "c1/1-missing", read_only=False))


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    with shared_volume(tmp_path / "vol") as vol:
        yield vol


def test_read_only_share_is_read_only_at_its_top_only(shared: SharedDir, volume: Path) -> None:
    """runc's "ro": the volume's own mount; its submount keeps its own (writable) flag."""
    shared.add(bind_share(str(volume), "c1/0-vol", ["rbind", "ro"]))
    for view in (shared.mounts, shared.shared):
        assert _write_fails(view / "c1" / "0-vol" / "top")
        (view / "c1" / "0-vol" / "sub" / "deep").write_text("through the submount")
    assert (volume / "sub" / "deep").read_text() == "through the submount"
    assert shared.submounts("c1/0-vol") == [("sub", False)]


def test_recursively_read_only_share_is_read_only_with_its_submounts(shared: SharedDir, volume: Path) -> None:
    shared.add(bind_share(str(volume), "c1/0-vol", ["rbind", "rro"]))
    for view in (shared.mounts, shared.shared):
        assert _write_fails(view / "c1" / "0-vol" / "top")
        assert _write_fails(view / "c1" / "0-vol" / "sub" / "deep")
    (volume / "sub" / "host").write_text("host side stays writable")
    assert shared.submounts("c1/0-vol") == [("sub", True)]


def test_a_non_recursive_bind_shares_no_submount(shared: SharedDir, volume: Path) -> None:
    (volume / "sub" / "on-tmpfs").write_text("x")
    shared.add(bind_share(str(volume), "c1/0-vol", ["bind", "ro"]))
    assert shared.submounts("c1/0-vol") == []
    assert not (shared.shared / "c1" / "0-vol" / "sub" / "on-tmpfs").exists()  # the directory below it


@pytest.mark.parametrize("propagation", ["rslave", "slave", "rshared", "shared"])
def test_a_slave_share_receives_later_host_mounts_and_sends_none(shared: SharedDir, volume: Path,
                                                                 propagation: str) -> None:
    shared.add(bind_share(str(volume), "c1/0-vol", ["rbind", propagation]))
    mount_tmpfs(volume / "late", "file", "made after the share")
    for view in (shared.mounts, shared.shared):
        assert (view / "c1" / "0-vol" / "late" / "file").read_text() == "made after the share"
    # A mount made below the share (by the host: the guest cannot mount there) stays there.
    mount("tmpfs", str(shared.mounts / "c1" / "0-vol" / "sub"), "tmpfs")
    assert mounts_under(str(volume / "sub")) == [str(volume / "sub")]
    shared.remove("c1")  # unmounting the share's copies leaves the host's own mounts alone
    assert sorted(mounts_under(str(volume))) == [str(volume), str(volume / "late"), str(volume / "sub")]


def test_a_private_share_keeps_out_later_host_mounts(shared: SharedDir, volume: Path) -> None:
    shared.add(bind_share(str(volume), "c1/0-vol", ["rbind", "rprivate"]))
    mount_tmpfs(volume / "late", "file", "made after the share")
    assert not (shared.shared / "c1" / "0-vol" / "late" / "file").exists()
    assert shared.submounts("c1/0-vol") == [("sub", False)]


def test_remove_unmounts_and_deletes_one_container(shared: SharedDir, tmp_path: Path) -> None:
    for cid in ("c1", "c1-b"):
        d = tmp_path / f"src-{cid}"
        d.mkdir()
        shared.add(HostShare(str(d), f"{cid}/rootfs", read_only=False))
    shared.remove("c1")
    assert not (shared.mounts / "c1").exists()
    assert (shared.shared / "c1-b" / "rootfs").is_dir()  # an id that only starts alike is untouched
    assert [p for p in mounts_under(str(shared.mounts.parent)) if "/c1/" in p] == []
    with pytest.raises(InvalidIdError):
        shared.remove("../x")


def test_a_symlink_in_mounts_is_never_followed(shared: SharedDir, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (shared.mounts / "c9").symlink_to(outside)
    with pytest.raises(ShareError):
        shared.add(HostShare(str(src), "c9/rootfs", read_only=False))
    assert list(outside.iterdir()) == []
    assert mounts_under(str(outside)) == []


def test_destroy_keeps_a_busy_volume(shared: SharedDir, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data").write_text("precious")
    shared.add(HostShare(str(vol), "c1/0-vol", read_only=False))
    busy = os.open(shared.mounts / "c1" / "0-vol" / "data", os.O_RDONLY)  # a busy file in the volume
    try:
        shared.destroy()
    finally:
        os.close(busy)
    assert (vol / "data").read_text() == "precious"
    assert not shared.mounts.parent.exists()
    assert mounts_under(str(shared.mounts.parent)) == []
