"""Kata's metric families of one sandbox, made with prometheus-client from checked figures.

Names follow Kata 2's (kata_hypervisor_*, kata_virtiofsd_*, kata_shim_*, kata_agent_*, kata_guest_*), with
Kata's `item` labels, so that dashboards made for Kata keep working; the `*_process_*` families (CPU seconds,
resident memory, PSS, descriptors) are given for every process kind, not only the shim and the agent.
Counters carry prometheus-client's `_total` suffix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kata.metrics.figures import GuestFigures, HostFigures, ProcessFigures

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# /proc/PID/status keys as Kata's items name them.
_STATUS_ITEMS = {"VmPeak": "vmpeak", "VmSize": "vmsize", "VmLck": "vmlck", "VmPin": "vmpin", "VmHWM": "vmhwm",
                 "VmRSS": "vmrss", "RssAnon": "rssanon", "RssFile": "rssfile", "RssShmem": "rssshmem",
                 "VmData": "vmdata", "VmStk": "vmstk", "VmExe": "vmexe", "VmLib": "vmlib", "VmPTE": "vmpte",
                 "VmSwap": "vmswap", "HugetlbPages": "hugetlbpages",
                 "voluntary_ctxt_switches": "voluntary_ctxt_switches",
                 "nonvoluntary_ctxt_switches": "nonvoluntary_ctxt_switches"}
_STAT_ITEMS = ("utime", "stime", "cutime", "cstime")
# The host's kinds name /proc/PID/io's items without underscores, as Kata's runtime does; its agent
# keeps them.
_IO_ITEMS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes", "cancelled_write_bytes")
# /proc/meminfo names that the plain CamelCase rule below does not turn into Kata's items.
_MEMINFO_ITEMS = {"SReclaimable": "s_reclaimable", "SUnreclaim": "s_unreclaim",
                  "KReclaimable": "k_reclaimable", "AnonHugePages": "anon_hugepages",
                  "ShmemHugePages": "shmem_hugepages",
                  "ShmemPmdMapped": "shmem_pmd_mapped", "FileHugePages": "file_hugepages",
                  "FilePmdMapped": "file_pmd_mapped", "HugePages_Total": "hugepages_total",
                  "HugePages_Free": "hugepages_free", "HugePages_Rsvd": "hugepages_rsvd",
                  "HugePages_Surp": "hugepages_surp", "Hugepagesize": "hugepagesize", "Percpu": "per_cpu",
                  "Committed_AS": "committed_as", "NFS_Unstable": "nfs_unstable",
                  "DirectMap4k": "direct_map_4k", "DirectMap2M": "direct_map_2M",
                  "DirectMap4M": "direct_map_4M", "DirectMap1G": "direct_map_1G"}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_HELP = {"hypervisor": "the VMM (QEMU)", "virtiofsd": "virtiofsd",
         "shim": "the process serving the sandbox (the shim, or the runc path's monitor)",
         "agent": "the agent"}


def meminfo_item(name: str) -> str:
    """Kata's item for a /proc/meminfo line: MemTotal -> mem_total, Active(anon) -> active_anon."""
    return _MEMINFO_ITEMS.get(name) or _CAMEL.sub("_", name.replace("(", "_").replace(")", "")).lower()


def _items(name: str, doc: str, values: dict[str, int] | dict[str, float],
           items: dict[str, str] | None = None) -> GaugeMetricFamily:
    """A gauge with one series per item; ``items`` renames the keys, and leaves out those it lacks."""
    g = GaugeMetricFamily(name, doc, labels=["item"])
    for key, value in values.items():
        item = items.get(key) if items is not None else key
        if item is not None:
            g.add_metric([item], value)
    return g


def process_families(kind: str, p: ProcessFigures, clock_ticks: int) -> Iterator[Metric]:
    prefix, who = f"kata_{kind}", _HELP[kind]
    io_items = {k: k if kind == "agent" else k.replace("_", "") for k in _IO_ITEMS}
    yield _items(f"{prefix}_proc_stat", f"CPU times of {who}, in clock ticks (/proc/PID/stat).",
                 {k: p.stat[k] for k in _STAT_ITEMS if k in p.stat})
    yield _items(f"{prefix}_proc_status", f"Memory (bytes) and context switches of {who} (/proc/PID/status).",
                 p.status, _STATUS_ITEMS)
    yield _items(f"{prefix}_io_stat", f"IO of {who} (/proc/PID/io).", p.io, io_items)
    if "num_threads" in p.stat:
        yield GaugeMetricFamily(f"{prefix}_threads", f"Threads of {who}.", value=p.stat["num_threads"])
    if p.open_fds is not None:
        yield GaugeMetricFamily(f"{prefix}_fds", f"Open file descriptors of {who}.", value=p.open_fds)
        yield GaugeMetricFamily(f"{prefix}_process_open_fds", f"Open file descriptors of {who}.",
                                value=p.open_fds)
    if "utime" in p.stat and "stime" in p.stat:
        yield CounterMetricFamily(f"{prefix}_process_cpu_seconds", f"CPU time of {who} (user and system).",
                                  value=(p.stat["utime"] + p.stat["stime"]) / clock_ticks)
    if "VmRSS" in p.status:
        yield GaugeMetricFamily(f"{prefix}_process_resident_memory_bytes", f"Resident memory of {who}.",
                                value=p.status["VmRSS"])
    if "VmSize" in p.status:
        yield GaugeMetricFamily(f"{prefix}_process_virtual_memory_bytes", f"Virtual memory of {who}.",
                                value=p.status["VmSize"])
    if p.pss is not None:
        yield GaugeMetricFamily(f"{prefix}_process_pss_bytes",
                                f"Proportional share of the memory {who} maps.", value=p.pss)


def host_families(h: HostFigures) -> Iterator[Metric]:
    for kind, p in h.processes.items():
        yield from process_families(kind, p, h.clock_ticks)
    netdev = GaugeMetricFamily("kata_hypervisor_netdev",
                               "Network devices of the VMM's namespace (/proc/net/dev).",
                               labels=["interface", "item"])
    for interface, counters in h.netdev.items():
        for item, value in counters.items():
            netdev.add_metric([interface, item], value)
    yield netdev


def guest_families(g: GuestFigures) -> Iterator[Metric]:
    yield _items("kata_guest_meminfo", "The guest's /proc/meminfo, in bytes (HugePages_* are counts).",
                 {meminfo_item(k): v for k, v in g.meminfo.items()})
    cpu = GaugeMetricFamily("kata_guest_cpu_time", "The guest's CPU times, in seconds (/proc/stat).",
                            labels=["cpu", "item"])
    for name, times in g.cpu.items():
        for item, ticks in times.items():
            cpu.add_metric(["total" if name == "cpu" else name[3:], item], ticks / g.clock_ticks)
    yield cpu
    yield _items("kata_guest_stat", "The guest kernel's counters of /proc/stat.", g.stat)
    yield _items("kata_guest_load", "The guest's load averages.", g.load)
    yield _items("kata_guest_tasks", "The guest's running (cur) and all (max) tasks.", g.tasks)
    netdev = GaugeMetricFamily("kata_guest_netdev_stat", "The guest's network devices (/proc/net/dev).",
                               labels=["interface", "item"])
    for interface, counters in g.netdev.items():
        for item, value in counters.items():
            netdev.add_metric([interface, item], value)
    yield netdev
    yield from process_families("agent", g.agent, g.clock_ticks)
    yield CounterMetricFamily("kata_agent_scrape_count", "GetMetrics calls the agent has answered.",
                              value=g.scrapes)
    yield from container_families(g)


def container_families(g: GuestFigures) -> Iterator[Metric]:
    seconds = CounterMetricFamily("kata_guest_container_cpu_seconds",
                                  "CPU time of a container's cgroup in the guest (usage, user, system).",
                                  labels=["container_id", "item"])
    groups = {name: GaugeMetricFamily(f"kata_guest_container_{name}", doc, labels=["container_id", "item"])
              for name, doc in (("cpu_stat", "A container's cpu.stat in the guest (microseconds, counts)."),
                                ("memory", "A container's memory in the guest: memory.current, .max, .peak "
                                           "and memory.stat (bytes; pgfault, pgmajfault, oom_kill: counts)."),
                                ("pids", "A container's pids.current and pids.max in the guest."),
                                ("io", "A container's IO in the guest, over every device (io.stat)."))}
    for c in g.containers:
        for item in ("usage", "user", "system"):
            if f"{item}_usec" in c.cpu:
                seconds.add_metric([c.id, item], c.cpu[f"{item}_usec"] / 1e6)
        for name, values in (("cpu_stat", c.cpu), ("memory", c.memory), ("pids", c.pids), ("io", c.io)):
            for item, value in values.items():
                groups[name].add_metric([c.id, item], value)
    yield seconds
    yield from groups.values()


class _Figures(Collector):
    def __init__(self, host: HostFigures, guest: GuestFigures) -> None:
        self.host, self.guest = host, guest

    def collect(self) -> Iterator[Metric]:
        yield from host_families(self.host)
        yield from guest_families(self.guest)


def render(host: HostFigures, guest: GuestFigures) -> bytes:
    """The sandbox's figures as Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Figures(host, guest))
    return generate_latest(registry)
