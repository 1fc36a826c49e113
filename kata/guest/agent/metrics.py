"""GetMetrics: the guest kernel's figures, the agent's own and each container's cgroup figures, by the
kernel's names. The host checks them and makes the metric families (kata.metrics)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from kata.guest.agent.stats import _flat_keyed, _int, _read
from kata.protocols import agent_pb2 as pb
from kata.utils import procfs

# The memory.stat keys a container reports, beside memory.current, .max and .peak.
_MEMORY_KEYS = ("anon", "file", "kernel", "kernel_stack", "slab", "sock", "shmem", "file_mapped",
                "file_dirty", "file_writeback", "pgfault", "pgmajfault", "oom_kill")
_CPU_KEYS = ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec")


def _figures(values: Mapping[str, int | float]) -> list[pb.Figure]:
    return [pb.Figure(name=k, value=int(v)) for k, v in values.items() if v >= 0]


def _named(values: Mapping[str, Mapping[str, int]]) -> list[pb.NamedFigures]:
    return [pb.NamedFigures(name=k, figures=_figures(v)) for k, v in values.items()]


def agent_figures() -> pb.ProcessFigures:
    return pb.ProcessFigures(stat=_figures(procfs.process_stat("self")),
                             status=_figures(procfs.process_status("self")),
                             io=_figures(procfs.process_io("self")),
                             open_fds=procfs.open_fds("self") or 0)


def container_figures(cid: str, cgroup: str) -> pb.ContainerFigures:
    cpu = _flat_keyed(_read(os.path.join(cgroup, "cpu.stat")))
    mem = _flat_keyed(_read(os.path.join(cgroup, "memory.stat")))
    memory = {k: mem[k] for k in _MEMORY_KEYS if k in mem}
    memory.update(_single_values(cgroup, "memory", ("current", "max", "peak")))
    pids = _single_values(cgroup, "pids", ("current", "max"))
    io: dict[str, int] = {}
    for line in _read(os.path.join(cgroup, "io.stat")).splitlines():
        for kv in line.split()[1:]:
            key, _, value = kv.partition("=")
            if key in ("rbytes", "wbytes", "rios", "wios"):
                io[key] = io.get(key, 0) + _int(value)
    return pb.ContainerFigures(container_id=cid, cpu=_figures({k: cpu[k] for k in _CPU_KEYS if k in cpu}),
                               memory=_figures(memory), pids=_figures(pids), io=_figures(io))


def _single_values(cgroup: str, controller: str, names: Iterable[str]) -> dict[str, int]:
    """Files of one number each (``controller``.NAME); "max" (no limit) and missing files are left out."""
    out = {}
    for name in names:
        text = _read(os.path.join(cgroup, f"{controller}.{name}")).strip()
        if text and text != "max":
            out[name] = _int(text)
    return out


def guest_metrics(containers: Iterable[tuple[str, str]], scrapes: int) -> pb.Metrics:
    """``containers``: (id, cgroup directory) of each running container."""
    load = procfs.loadavg()
    return pb.Metrics(
        clock_ticks=procfs.clock_ticks(),
        meminfo=_figures(procfs.meminfo()),
        cpu=_named(procfs.cpu_times()),
        stat=_figures(procfs.stat_counters()),
        load=_figures({k: round(load[k] * 1000) for k in ("load1", "load5", "load15") if k in load}),
        tasks=_figures({k: load[k] for k in ("cur", "max") if k in load}),
        netdev=_named({k: v for k, v in procfs.netdev().items() if k != "lo"}),
        agent=agent_figures(),
        containers=[container_figures(cid, cg) for cid, cg in containers],
        scrapes=scrapes,
    )
