"""Free memory made zero before a template VM's snapshot.

A template's RAM file keeps every page the guest ever wrote, and each virtio-fs clone gets its own
copy of that file. Pages the guest has freed (the warm-up's crun, files read once at start-up) still
hold their old bytes and would be copied into every clone. Dropping the clean caches and writing
zeroes over all free memory turns each unused page into a zero page, which the host then leaves out
of the file (kata.factory.template.punch_zero_pages).
"""

from __future__ import annotations

import mmap
import os

MEMINFO = "/proc/meminfo"
DROP_CACHES = "/proc/sys/vm/drop_caches"
# Left free throughout: the agent and the kernel's own allocations must never wait on reclaim or
# meet the OOM killer while the rest of free memory is held.
MARGIN = 24 << 20
# Taken a piece at a time, re-reading MemFree between pieces, so that a kernel allocation made
# meanwhile shrinks what is taken instead of pushing the guest short.
CHUNK = 16 << 20


def mem_free(meminfo: str = MEMINFO) -> int:
    """MemFree in bytes."""
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{meminfo} has no MemFree line")


def release_free_memory(meminfo: str = MEMINFO, drop_caches: str = DROP_CACHES,
                        margin: int = MARGIN, chunk: int = CHUNK) -> int:
    """Drop clean caches, then zero free memory down to ``margin``; returns the bytes zeroed.

    The kernel zeroes each page it hands a new anonymous mapping: populating private mappings of
    all free memory at once (none freed before the last is taken, or the allocator would hand the
    same pages out again) writes zeroes over every free page. They are free again on return.
    """
    os.sync()
    with open(drop_caches, "w") as f:
        f.write("3")  # clean page cache, dentries and inodes; dirty data was written just above
    page = mmap.PAGESIZE
    target = mem_free(meminfo) - margin
    held: list[mmap.mmap] = []
    zeroed = 0
    try:
        while zeroed < target:
            size = min(chunk, target - zeroed, mem_free(meminfo) - margin) // page * page
            if size <= 0:
                break
            held.append(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE))
            zeroed += size
    finally:
        for m in held:
            m.close()
    return zeroed
