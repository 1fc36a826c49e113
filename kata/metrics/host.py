"""The host's figures of one sandbox: its VMM, virtiofsd and the process that serves the sandbox (the
shim, or the runc path's init monitor), read from /proc, and the network devices of the VMM's namespace."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kata.metrics.figures import HostFigures, ProcessFigures
from kata.utils import procfs
from kata.utils.process import ProcessId

KINDS = ("hypervisor", "virtiofsd", "shim")
# The VMM's namespace holds the pod's interfaces and their taps: a few, unless something went wrong.
MAX_INTERFACES = 256


def process_figures(proc: ProcessId) -> ProcessFigures | None:
    """None once the process is gone, or its pid is another process's now."""
    if not proc.is_alive():
        return None
    figures = ProcessFigures(stat=procfs.process_stat(proc.pid), status=procfs.process_status(proc.pid),
                             io=procfs.process_io(proc.pid), open_fds=procfs.open_fds(proc.pid),
                             pss=procfs.pss_bytes(proc.pid))
    # Read while it lived, and still the same process after: the figures are its own.
    return figures if proc.is_alive() else None


def gather(processes: Mapping[str, Sequence[ProcessId]]) -> HostFigures:
    """``processes``: by kind (KINDS), the first live one of each is reported."""
    found: dict[str, ProcessFigures] = {}
    for kind, procs in processes.items():
        for proc in procs:
            figures = process_figures(proc)
            if figures is not None:
                found[kind] = figures
                break
    netdev: dict[str, dict[str, int]] = {}
    vmm = next((p for p in processes.get("hypervisor", ()) if p.is_alive()), None)
    if vmm is not None:
        devices = procfs.netdev(f"/proc/{vmm.pid}/net/dev")
        netdev = dict(sorted(devices.items())[:MAX_INTERFACES])
    return HostFigures(processes=found, netdev=netdev, clock_ticks=procfs.clock_ticks())
