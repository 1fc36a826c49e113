"""Configuration → the typed VM description a hypervisor driver starts.

Host facts (accelerator, vsock) are passed in; the one read here is the guest image's size."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Literal

from kata.config import HypervisorConfig
from kata.hypervisor.base import SharedFs, VMConfig, clone_maps_template
from kata.sandbox.paths import SandboxPaths
from kata.specconv import VMSizing
from kata.utils.files import regular_file_size

# Measured under TCG (see the report in the commit): the timer/tsc/i8042 options skip probes that cost
# tens of milliseconds each when emulated; panic=-1 + reboot=t make a crashed guest end QEMU at once.
GUEST_KERNEL_PARAMS: tuple[str, ...] = (
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "reboot=t",
    "no_timer_check",
    "tsc=reliable",
    "cryptomgr.notests",
    "random.trust_cpu=on",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
)

# The driver mounts the image as root and names the agent channel; the agent is PID 1.
AGENT_INIT_PARAM = "init=/usr/bin/kata-agent"
SHARED_FS_TAG = "kataShared"


def agent_channel(configured: str, vsock_available: bool) -> Literal["vsock", "virtio-serial"]:
    """virtio-serial unless vsock is asked for: its unix socket lives in a root-only directory,
    while a vsock port answers every local user (the agent has no authentication of its own)."""
    if configured in ("auto", "virtio-serial"):
        return "virtio-serial"
    if not vsock_available:
        raise ValueError("agent channel vsock needs /dev/vhost-vsock, which this host lacks")
    return "vsock"


def vsock_available() -> bool:
    return os.path.exists("/dev/vhost-vsock")


def build_vm_config(sid: str, hv: HypervisorConfig, sizing: VMSizing, paths: SandboxPaths,
                    accel: Literal["kvm", "tcg"], channel: Literal["vsock", "virtio-serial"],
                    base_params: tuple[str, ...], debug: bool, from_template: bool = False,
                    debug_console: bool = False) -> VMConfig:
    """``from_template``: the VM is restored from a snapshot, so a virtio-fs share is hot-added.
    ``debug_console``: the guest offers a root shell on a channel of its own."""
    params = [*base_params, AGENT_INIT_PARAM]
    if debug:
        params.append("agent.log=debug")
    params += shlex.split(hv.kernel_params or "")
    shared: SharedFs | None = None
    if hv.shared_fs == "virtio-fs":
        shared = SharedFs("virtio-fs", paths.shared_dir, SHARED_FS_TAG, paths.virtiofsd_socket,
                          hotplug=from_template)
    elif hv.shared_fs == "virtio-9p":
        shared = SharedFs("virtio-9p", paths.shared_dir, SHARED_FS_TAG)
    return VMConfig(
        id=sid,
        hypervisor_path=Path(hv.path),
        kernel=Path(hv.kernel),
        image=Path(hv.image) if hv.image else None,
        initrd=Path(hv.initrd) if hv.initrd else None,
        kernel_params=tuple(params),
        vcpus=sizing.vcpus,
        max_vcpus=sizing.max_vcpus,
        memory_mib=sizing.memory_mib,
        max_memory_mib=max(sizing.memory_mib, sizing.max_memory_mib),
        machine_type=hv.machine_type,
        accel=accel,
        agent_channel=channel,
        run_dir=paths.vm_dir,
        shared_fs=shared,
        debug_console=debug_console,
        # Only a regular file is ever mapped (a device or sysfs file, which an annotation could
        # name, is not); 0, a disk, also for one that cannot be read: the VM's start reports that.
        image_pmem_size=0 if hv.disable_image_nvdimm or not hv.image else regular_file_size(hv.image),
        # A template's device set is its clones': one whose clones map its RAM file never reports.
        free_page_reporting=(hv.reclaim_guest_freed_memory
                             and not (from_template and clone_maps_template(shared))),
    )

