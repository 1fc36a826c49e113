"""The narrow interface between the core and a VMM, and the typed description of a VM.

The core builds a :class:`VMConfig` (from configuration.toml and the OCI spec via specconv) and
drives a :class:`Hypervisor`; it never sees QEMU arguments or QMP.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kata.errors import KataError
from kata.protocols.agent_api import AgentEndpoint
from kata.utils.process import ProcessId


class HypervisorError(KataError):
    """A VMM failed to start, answer or stop; the message is one line for the user."""


@dataclass(frozen=True)
class SharedFs:
    """A host directory exported to the guest under ``tag``."""

    kind: Literal["virtio-fs", "virtio-9p"]
    host_dir: Path
    tag: str = "kataShared"
    # virtio-fs only: the vhost-user socket of the virtiofsd serving host_dir.
    vhost_user_socket: Path | None = None
    # virtio-fs only: the device is added after start (attach_shared_fs), into a PCIe root port the
    # VM is given for it. A VM with a vhost-user-fs device cannot be snapshotted (QEMU 7.2), so VMs
    # made from a template get theirs this way.
    hotplug: bool = False


def clone_maps_template(shared_fs: SharedFs | None) -> bool:
    """Whether a clone restored from a template maps the template's RAM file copy-on-write
    (share=off: clones share every page none of them wrote) rather than getting its own copy in a
    memfd. virtiofsd maps all guest RAM that has a file (vhost-user), so a virtio-fs clone cannot."""
    return shared_fs is None or shared_fs.kind != "virtio-fs"


@dataclass(frozen=True)
class VMConfig:
    id: str
    hypervisor_path: Path
    kernel: Path
    image: Path | None  # read-only root filesystem image (None: initrd only)
    initrd: Path | None
    kernel_params: tuple[str, ...]
    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    machine_type: str  # "microvm", "q35" or "pc"
    accel: Literal["kvm", "tcg"]
    agent_channel: Literal["vsock", "virtio-serial"]
    run_dir: Path  # QMP socket, agent socket, pid file live here
    shared_fs: SharedFs | None = None
    extra_args: tuple[str, ...] = field(default=())
    # Guest RAM in this file, mapped shared (virtio-fs needs shared RAM): a template's memory. A
    # clone's private copy of it is handed to restore() as a memfd instead. None: in an anonymous
    # memfd (virtio-fs) or private memory.
    memory_file: Path | None = None
    # The guest agent offers a root shell on a channel of its own (Kata's debug_console_enabled).
    debug_console: bool = False
    # The image's size when it may be mapped into the guest as persistent memory (read-only,
    # mounted with DAX: every VM reads its files from the host's one page cache); 0: a virtio-blk
    # disk. Whether it is, the machine and memory decide (kata.hypervisor.qemu_argv.pmem_layout):
    # it must be a multiple of 2 MiB, as kata.osbuilder pads its images.
    image_pmem_size: int = 0
    # A virtio-balloon device with free page reporting (Kata's reclaim_guest_freed_memory): the
    # guest reports the 2 MiB blocks it frees and QEMU discards them, so a pod gives back what a
    # spike of its workload took. Never for RAM mapped copy-on-write from a template's file: QEMU
    # 7.2 discards a file's pages by punching holes in the file, which all clones map.
    free_page_reporting: bool = False


class Hypervisor(abc.ABC):
    """One VM. Methods raise HypervisorError with a one-line message."""

    @abc.abstractmethod
    def start(self, config: VMConfig, timeout: float) -> None:
        """Launch the VMM and return once it is running (not once the guest agent is up)."""

    @abc.abstractmethod
    def restore(self, config: VMConfig, state_file: Path, timeout: float,
                memory_fd: int | None = None, memory_path: Path | None = None) -> None:
        """Launch the VM that save() wrote to ``state_file`` (same config) and let it run on. When
        the saved VM kept its RAM in a file: ``memory_fd``, a copy for this VM, or ``memory_path``,
        that file itself, mapped copy-on-write."""

    @abc.abstractmethod
    def agent_endpoint(self) -> AgentEndpoint: ...

    def debug_console_endpoint(self) -> AgentEndpoint | None:
        """Where the guest's debug console answers; None when the VM was given none."""
        return None

    def log_tail(self) -> str:
        """The last lines of the VMM's own output, as one line for an error message; "" when none."""
        return ""

    def console_output(self) -> str:
        """What the guest printed on its console lately (a bounded tail); "" when unknown."""
        return ""

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Stop the VM; idempotent; kills the VMM if it does not go in time."""

    @abc.abstractmethod
    def attach_shared_fs(self, fs: SharedFs) -> None:
        """Hot-add the shared-fs device of a VM started with ``fs.hotplug`` (e.g. after a restore)."""

    @abc.abstractmethod
    def pause(self) -> None: ...

    @abc.abstractmethod
    def resume(self) -> None: ...

    @abc.abstractmethod
    def save(self, path: Path) -> None:
        """Snapshot the paused VM's device and memory state into ``path``."""

    def release(self) -> None:  # noqa: B027 - most drivers hold nothing
        """Drop this process's handles on the VM (e.g. a QMP session) and leave it running."""

    def memory_mib(self) -> int:
        """The guest's memory now: what it booted with plus what was hot-added."""
        raise HypervisorError(f"{type(self).__name__} cannot report its memory")

    @abc.abstractmethod
    def hotplug_memory(self, size_mib: int) -> int:
        """Add memory; returns the MiB actually added."""

    @abc.abstractmethod
    def hotplug_vcpus(self, count: int) -> int:
        """Add vCPUs; returns how many were added."""

    @abc.abstractmethod
    def nic_queues(self) -> int:
        """Queue pairs a hot-added network interface gets (one per vCPU, as Kata does)."""

    @abc.abstractmethod
    def hotplug_nic(self, index: int, tap: str, mac: str, mtu: int, queues: int = 1,
                    tap_fds: Sequence[int] = ()) -> None:
        """Add network interface ``index`` on the existing tap device ``tap`` (in the VMM's network
        namespace), with the guest-side MAC ``mac``; or, for a VMM in another namespace, on
        ``tap_fds``, one descriptor of that tap per queue."""

    def unplug_nic(self, index: int) -> None:
        """Ask the guest to give network interface ``index`` back (it goes once the guest lets go)."""
        raise HypervisorError(f"{type(self).__name__} cannot unplug network interfaces")

    def vcpu_threads(self) -> list[int]:
        """The host thread ids of the VM's vCPUs (the host's cgroups hold them apart from the rest)."""
        raise HypervisorError(f"{type(self).__name__} cannot name its vCPU threads")

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Host processes of this VM (the VMM itself first)."""

    def process_ids(self) -> list[ProcessId]:
        """The VMM's processes with their start times, which another process can check against pid
        reuse; a driver that knows them lists those that have died too."""
        return [p for p in (ProcessId.of(pid) for pid in self.pids()) if p is not None]

    @abc.abstractmethod
    def is_running(self) -> bool: ...
