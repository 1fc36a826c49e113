"""Container statistics from cgroup v2 files (cpu.stat, memory.*, pids.*, io.stat)."""

from __future__ import annotations

import os

from kata.protocols import agent_pb2 as pb


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _int(text: str) -> int:
    text = text.strip()
    if not text or text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        return 0


def _flat_keyed(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _io_entries(text: str) -> tuple[list[pb.BlkioStatsEntry], list[pb.BlkioStatsEntry]]:
    by_bytes: list[pb.BlkioStatsEntry] = []
    by_ops: list[pb.BlkioStatsEntry] = []
    for line in text.splitlines():
        dev, *kvs = line.split()
        major, _, minor = dev.partition(":")
        vals = dict(kv.split("=", 1) for kv in kvs if "=" in kv)
        for key, op, dest in (("rbytes", "Read", by_bytes), ("wbytes", "Write", by_bytes),
                              ("rios", "Read", by_ops), ("wios", "Write", by_ops)):
            if key in vals:
                dest.append(pb.BlkioStatsEntry(major=_int(major), minor=_int(minor), op=op,
                                               value=_int(vals[key])))
    return by_bytes, by_ops


def cgroup_stats(cg: str) -> pb.StatsContainerResponse:
    cpu = _flat_keyed(_read(os.path.join(cg, "cpu.stat")))
    mem = _flat_keyed(_read(os.path.join(cg, "memory.stat")))
    events = _flat_keyed(_read(os.path.join(cg, "memory.events")))
    by_bytes, by_ops = _io_entries(_read(os.path.join(cg, "io.stat")))
    stats = pb.CgroupStats(
        cpu_stats=pb.CpuStats(
            cpu_usage=pb.CpuUsage(
                total_usage=cpu.get("usage_usec", 0) * 1000,
                usage_in_usermode=cpu.get("user_usec", 0) * 1000,
                usage_in_kernelmode=cpu.get("system_usec", 0) * 1000,
            ),
            throttling_data=pb.ThrottlingData(
                periods=cpu.get("nr_periods", 0),
                throttled_periods=cpu.get("nr_throttled", 0),
                throttled_time=cpu.get("throttled_usec", 0) * 1000,
            ),
        ),
        memory_stats=pb.MemoryStats(
            cache=mem.get("file", 0),
            usage=pb.MemoryData(
                usage=_int(_read(os.path.join(cg, "memory.current"))),
                max_usage=_int(_read(os.path.join(cg, "memory.peak"))),
                failcnt=events.get("max", 0),
                limit=_int(_read(os.path.join(cg, "memory.max"))),
            ),
            swap_usage=pb.MemoryData(
                usage=_int(_read(os.path.join(cg, "memory.swap.current"))),
                limit=_int(_read(os.path.join(cg, "memory.swap.max"))),
            ),
            kernel_usage=pb.MemoryData(usage=mem.get("kernel", mem.get("kernel_stack", 0))),
            use_hierarchy=True,
            stats=mem,
        ),
        pids_stats=pb.PidsStats(
            current=_int(_read(os.path.join(cg, "pids.current"))),
            limit=_int(_read(os.path.join(cg, "pids.max"))),
        ),
        blkio_stats=pb.BlkioStats(io_service_bytes_recursive=by_bytes, io_serviced_recursive=by_ops),
    )
    return pb.StatsContainerResponse(cgroup_stats=stats, network_stats=network_stats())


def network_stats() -> list[pb.NetworkStats]:
    """Per-interface counters from /proc/net/dev (the sandbox shares one network namespace)."""
    out: list[pb.NetworkStats] = []
    for line in _read("/proc/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        f = [_int(x) for x in rest.split()]
        if len(f) >= 12 and name.strip() != "lo":
            out.append(pb.NetworkStats(
                name=name.strip(), rx_bytes=f[0], rx_packets=f[1], rx_errors=f[2], rx_dropped=f[3],
                tx_bytes=f[8], tx_packets=f[9], tx_errors=f[10], tx_dropped=f[11],
            ))
    return out
