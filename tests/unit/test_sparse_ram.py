"""Sparse RAM files (kata.factory.sparse) and the guest's side of it (kata.guest.agent.freemem)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kata.factory.sparse import PAGE, data_regions, punch_zero_pages, sparse_copy
from kata.guest.agent import freemem


def _allocated(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(end - start for start, end in data_regions(f.fileno()))


def _ram_file(path: Path, pages: dict[int, bytes], size_pages: int) -> None:
    """A file of ``size_pages`` pages: holes, except ``pages`` (page number -> one byte to fill with)."""
    with open(path, "wb") as f:
        f.truncate(size_pages * PAGE)
        for n, fill in pages.items():
            f.seek(n * PAGE)
            f.write(fill * PAGE)


def test_punch_zero_pages_keeps_content_and_frees_zero_runs(tmp_path: Path) -> None:
    ram = tmp_path / "memory"
    # Data pages, written zero pages between them (single, and a run across a 2 MiB scan boundary),
    # a zero tail, and holes.
    pages = {0: b"a", 1: b"\0", 2: b"b", 3: b"\0", 4: b"\0", 600: b"c"}
    pages |= {n: b"\0" for n in range(500, 530)}
    pages |= {n: b"\0" for n in range(1000, 1024)}
    _ram_file(ram, pages, 1100)
    before = ram.read_bytes()
    if _allocated(ram) == 1100 * PAGE:
        pytest.skip("this filesystem reports no holes")

    freed = punch_zero_pages(ram)

    assert ram.read_bytes() == before
    assert freed == (1 + 2 + 30 + 24) * PAGE
    # What remains allocated is the three non-zero pages (filesystems may round to their blocks).
    assert _allocated(ram) <= 3 * max(PAGE, os.statvfs(ram).f_bsize) + 2 * PAGE
    assert punch_zero_pages(ram) == 0  # nothing left to free


def test_sparse_copy_copies_only_data(tmp_path: Path) -> None:
    ram = tmp_path / "memory"
    _ram_file(ram, {5: b"x", 9: b"y"}, 64)
    fd = os.memfd_create("test-clone")
    try:
        sparse_copy(ram, fd)
        assert os.fstat(fd).st_size == 64 * PAGE
        assert os.pread(fd, 64 * PAGE, 0) == ram.read_bytes()
        assert os.fstat(fd).st_blocks * 512 <= 2 * PAGE
    finally:
        os.close(fd)


def test_punch_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    _ram_file(target, {0: b"\0"}, 1)
    (tmp_path / "memory").symlink_to(target)
    with pytest.raises(OSError):
        punch_zero_pages(tmp_path / "memory")


def test_release_free_memory_takes_free_memory_down_to_the_margin(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000000 kB\nMemFree:   12288 kB\nMemAvailable: 20000 kB\n")
    drop = tmp_path / "drop_caches"
    drop.write_text("0")
    zeroed = freemem.release_free_memory(str(meminfo), str(drop), margin=4 << 20, chunk=1 << 20)
    # A MemFree that never moves (a file) still stops at what was free at the start, less the margin.
    assert zeroed == (12 << 20) - (4 << 20)
    assert drop.read_text() == "3"


def test_release_free_memory_takes_nothing_under_the_margin(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:   2048 kB\n")
    drop = tmp_path / "drop_caches"
    drop.write_text("0")
    assert freemem.release_free_memory(str(meminfo), str(drop), margin=4 << 20) == 0


def test_mem_free_needs_the_line(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1 kB\n")
    with pytest.raises(ValueError):
        freemem.mem_free(str(meminfo))
