"""Sparse RAM files: a template's guest RAM keeps only the pages the guest uses.

A clone's copy takes only the file's data regions; zero pages in those regions are cut out once,
when the template is made, so that no clone copies (or maps) them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

PAGE = 4096
# Pages scanned per read: big enough that Python's per-read cost vanishes, small enough to stay light.
_SCAN = 2 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def data_regions(fd: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data region of ``fd``'s file (SEEK_DATA/SEEK_HOLE), in order."""
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to the end
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def sparse_copy(src: Path, dest_fd: int) -> None:
    """Copy only the data regions of ``src`` to ``dest_fd``: holes stay holes, unallocated.
    sendfile, since copy_file_range refuses a copy between filesystem types."""
    with open(src, "rb") as fin:
        os.ftruncate(dest_fd, os.fstat(fin.fileno()).st_size)
        for start, end in data_regions(fin.fileno()):
            os.lseek(dest_fd, start, os.SEEK_SET)
            while start < end:
                n = os.sendfile(dest_fd, fin.fileno(), start, end - start)
                if n <= 0:
                    raise OSError(f"copy of {src} stopped at {start}")
                start += n


def _punch(fd: int, start: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"punch hole: {os.strerror(err)}")


def punch_zero_pages(path: Path) -> int:
    """Turn every all-zero page of ``path`` into a hole (reads still return zeroes); returns the
    bytes freed. Runs of zero pages are punched as one range."""
    zero = bytes(_SCAN)
    zero_page = bytes(PAGE)
    freed = 0
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for start, end in list(data_regions(fd)):
            run = -1  # offset where the current run of zero pages began
            pos = start
            while pos < end:
                buf = os.pread(fd, min(_SCAN, end - pos), pos)
                if not buf:
                    break
                view = memoryview(buf)
                if buf == zero[:len(buf)]:
                    run = pos if run < 0 else run
                else:
                    for off in range(0, len(buf), PAGE):
                        page = view[off:off + PAGE]
                        if page == (zero_page if len(page) == PAGE else zero[:len(page)]):
                            run = pos + off if run < 0 else run
                        elif run >= 0:
                            _punch(fd, run, pos + off - run)
                            freed += pos + off - run
                            run = -1
                pos += len(buf)
            if run >= 0:
                _punch(fd, run, pos - run)
                freed += pos - run
    finally:
        os.close(fd)
    return freed
