"""virtiofsd lifecycle without a VM: socket up, found again from the pid file, stopped without leftovers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kata.fs_share import Virtiofsd, VirtiofsdError, choose_kind
from kata.hypervisor.host import find_virtiofsd
from tests.conftest import process_gone as gone

BINARY = find_virtiofsd()
needs_virtiofsd = pytest.mark.skipif(BINARY is None, reason="no virtiofsd binary on this host")
pytestmark = pytest.mark.timeout(60)

STARTER = """
import sys
from pathlib import Path
from kata.fs_share import Virtiofsd
Virtiofsd(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), cache="never").start(timeout=5)
"""


@needs_virtiofsd
def test_start_in_other_process_attach_and_stop(tmp_path: Path) -> None:
    assert BINARY is not None
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "run" / "vfs.sock"
    argv = [sys.executable, "-c", STARTER, str(BINARY), str(sock), str(share)]
    subprocess.run(argv, check=True, timeout=30)
    fsd = Virtiofsd.attach(BINARY, sock, share)
    try:
        assert sock.exists()
        pid = fsd.pid
        assert pid is not None and fsd.is_running()
        assert "cache=none" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
    finally:
        fsd.stop()
    assert gone(pid)
    assert not sock.exists() and not fsd.pid_file.exists()
    fsd.stop()  # idempotent
    assert not Virtiofsd.attach(BINARY, sock, share).is_running()


@needs_virtiofsd
def test_missing_shared_dir_is_one_line(tmp_path: Path) -> None:
    assert BINARY is not None
    with pytest.raises(VirtiofsdError, match="does not exist"):
        Virtiofsd(BINARY, tmp_path / "s.sock", tmp_path / "absent").start()


def test_missing_binary_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(VirtiofsdError, match="cannot execute") as info:
        Virtiofsd(tmp_path / "no-virtiofsd", tmp_path / "s.sock", tmp_path).start()
    assert "\n" not in str(info.value)


def test_daemon_that_exits_reports_its_stderr(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    fake.write_text("#!/bin/sh\necho 'fuse: bad option' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(VirtiofsdError, match="exited during start: fuse: bad option"):
        Virtiofsd(fake, tmp_path / "s.sock", tmp_path).start()


def test_choose_kind(tmp_path: Path) -> None:
    present = tmp_path / "virtiofsd"
    present.write_text("")
    assert choose_kind("virtio-fs", present) == "virtio-fs"
    assert choose_kind("virtio-9p", present) == "virtio-9p"
    assert choose_kind("virtio-fs", tmp_path / "absent") == "virtio-9p"
