"""The figures of one sandbox, checked, as the families are made from them (kata.metrics.families)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProcessFigures:
    """One process, by the kernel's names (kata.utils.procfs): stat in clock ticks, status in bytes."""

    stat: dict[str, int] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    io: dict[str, int] = field(default_factory=dict)
    open_fds: int | None = None
    pss: int | None = None  # the host's processes only


@dataclass(frozen=True)
class HostFigures:
    """The sandbox's host processes by kind ("hypervisor", "virtiofsd", "shim"), and the network
    devices of the VMM's namespace (the pod's interfaces and their taps)."""

    processes: dict[str, ProcessFigures]
    netdev: dict[str, dict[str, int]]
    clock_ticks: int


@dataclass(frozen=True)
class ContainerFigures:
    id: str
    cpu: dict[str, int]
    memory: dict[str, int]
    pids: dict[str, int]
    io: dict[str, int]


@dataclass(frozen=True)
class GuestFigures:
    clock_ticks: int
    meminfo: dict[str, int]
    cpu: dict[str, dict[str, int]]  # "cpu" (all) and "cpuN"
    stat: dict[str, int]
    load: dict[str, float]
    tasks: dict[str, int]
    netdev: dict[str, dict[str, int]]
    agent: ProcessFigures
    containers: list[ContainerFigures]
    scrapes: int
