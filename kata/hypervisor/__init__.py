"""The VMM drivers behind kata.hypervisor.base.Hypervisor, found by the configuration's name
([hypervisor.NAME]): nothing above this package names a driver's class."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kata.config import HypervisorConfig
    from kata.hypervisor.base import Hypervisor


def new(hv: HypervisorConfig) -> Hypervisor:
    """A driver for a VM yet to start, as the configuration asks."""
    if hv.name == "qemu":
        from kata.hypervisor.qemu import Qemu

        return Qemu(seccomp=hv.seccompsandbox, vhost_net=not hv.disable_vhost_net)
    raise ValueError(f"no driver for hypervisor {hv.name!r}")


def attach(hv: HypervisorConfig, run_dir: Path) -> Hypervisor:
    """The driver of a VM another process started in ``run_dir``; HypervisorError when there is none."""
    if hv.name == "qemu":
        from kata.hypervisor.qemu import Qemu

        return Qemu.attach(run_dir, vhost_net=not hv.disable_vhost_net)
    raise ValueError(f"no driver for hypervisor {hv.name!r}")
