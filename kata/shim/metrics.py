"""The agent's container statistics in containerd's cgroup v1 metrics type, as `ctr task metrics`
and the CRI plugin read them (Kata reports the same type)."""

from __future__ import annotations

from kata.protocols import agent_pb2 as apb
from kata.protocols.cgroups.stats.v1 import metrics_pb2 as mpb

# The guest's cgroup v2 memory.stat keys that have a cgroup v1 counterpart.
_MEMORY_KEYS = {
    "anon": "rss", "anon_thp": "rss_huge", "file_mapped": "mapped_file", "file_dirty": "dirty",
    "file_writeback": "writeback", "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault",
    "inactive_anon": "inactive_anon", "active_anon": "active_anon", "inactive_file": "inactive_file",
    "active_file": "active_file", "unevictable": "unevictable",
}


def _memory_entry(data: apb.MemoryData) -> mpb.MemoryEntry:
    return mpb.MemoryEntry(limit=data.limit, usage=data.usage, max=data.max_usage, failcnt=data.failcnt)


def to_metrics(stats: apb.StatsContainerResponse) -> mpb.Metrics:
    cg = stats.cgroup_stats
    cpu = cg.cpu_stats
    usage = cpu.cpu_usage
    mem = cg.memory_stats
    memory = mpb.MemoryStat(cache=mem.cache, usage=_memory_entry(mem.usage),
                            swap=_memory_entry(mem.swap_usage), kernel=_memory_entry(mem.kernel_usage),
                            **{v1: mem.stats[v2] for v2, v1 in _MEMORY_KEYS.items() if v2 in mem.stats})
    memory.total_cache, memory.total_rss = memory.cache, memory.rss
    # A container's limit is also its hierarchy's: the guest cgroup has no parent with a lower one.
    memory.hierarchical_memory_limit = mem.usage.limit
    return mpb.Metrics(
        pids=mpb.PidsStat(current=cg.pids_stats.current, limit=cg.pids_stats.limit),
        cpu=mpb.CPUStat(
            usage=mpb.CPUUsage(total=usage.total_usage, kernel=usage.usage_in_kernelmode,
                               user=usage.usage_in_usermode, per_cpu=list(usage.percpu_usage)),
            throttling=mpb.Throttle(periods=cpu.throttling_data.periods,
                                    throttled_periods=cpu.throttling_data.throttled_periods,
                                    throttled_time=cpu.throttling_data.throttled_time)),
        memory=memory,
        blkio=mpb.BlkIOStat(
            io_service_bytes_recursive=[_blkio(e) for e in cg.blkio_stats.io_service_bytes_recursive],
            io_serviced_recursive=[_blkio(e) for e in cg.blkio_stats.io_serviced_recursive]),
        network=[mpb.NetworkStat(name=n.name, rx_bytes=n.rx_bytes, rx_packets=n.rx_packets,
                                 rx_errors=n.rx_errors, rx_dropped=n.rx_dropped, tx_bytes=n.tx_bytes,
                                 tx_packets=n.tx_packets, tx_errors=n.tx_errors, tx_dropped=n.tx_dropped)
                 for n in stats.network_stats],
    )


def _blkio(e: apb.BlkioStatsEntry) -> mpb.BlkIOEntry:
    return mpb.BlkIOEntry(op=e.op, major=e.major, minor=e.minor, value=e.value)
