"""OCI spec + configuration -> what the VM and the guest agent need. Pure: no I/O, no mounts.

The host spec describes a container on the host; the guest spec describes the same container as
crun inside the VM must see it: paths point into the shared filesystem, and everything that names a
host object (namespace files, device nodes, hooks, host cgroups, LSM labels) is removed.
"""

from __future__ import annotations

import copy
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from kata.config.model import HypervisorConfig
from kata.errors import KataError
from kata.oci.spec import Bundle, linux_resources

# Where the sandbox's shared filesystem is mounted in the guest.
GUEST_SHARED_DIR = "/run/kata-containers/shared/containers"

# Filesystems the guest kernel provides itself: their mounts mean the same inside the VM.
GUEST_LOCAL_FS_TYPES = frozenset(
    {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "ramfs", "hugetlbfs", "securityfs"}
)

# crun in the guest has no AppArmor or SELinux to apply these to.
_LSM_PROCESS_KEYS = ("apparmorProfile", "selinuxLabel")
_LSM_LINUX_KEYS = ("mountLabel",)

DEFAULT_CPU_PERIOD_US = 100_000

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class SpecConvError(KataError):
    """The spec asks for something a container in a VM cannot have; one line for the user."""


@dataclass(frozen=True)
class HostShare:
    """Bind ``source`` (a host path) at ``name`` under the sandbox's shared directory."""

    source: str
    name: str
    read_only: bool


@dataclass(frozen=True)
class ContainerPlan:
    guest_spec: dict[str, Any]
    shares: tuple[HostShare, ...]  # shares[0] is the rootfs


@dataclass(frozen=True)
class VMSizing:
    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int = 0  # what hotplug may grow it to (0: memory_mib, no growth)


def guest_path(share_name: str) -> str:
    return f"{GUEST_SHARED_DIR}/{share_name}"


def guest_cgroups_path(container_id: str) -> str:
    return f"/kata/{container_id}"


def plan_container(bundle: Bundle, container_id: str) -> ContainerPlan:
    spec = copy.deepcopy(bundle.spec)  # bundle.spec is never modified

    # Shared writable even for a read-only root: the guest runtime must still create mount points
    # in it before it remounts the root read-only, as runc does on the host.
    rootfs = HostShare(str(bundle.root_path), f"{container_id}/rootfs", read_only=False)
    spec["root"] = {"path": guest_path(rootfs.name), "readonly": bundle.root_readonly}

    shares = [rootfs]
    mounts = []
    for index, mount in enumerate(spec.get("mounts") or ()):
        options = mount.get("options") or []
        is_bind = mount.get("type") == "bind" or "bind" in options or "rbind" in options
        if is_bind:
            if not mount.get("source"):
                raise SpecConvError(f"mount {mount['destination']}: bind mount without a source")
            # A relative source is relative to the bundle, as for runc (whose working directory it is).
            source = posixpath.join(str(bundle.path), mount["source"])
            share = HostShare(
                source=posixpath.normpath(source),
                name=f"{container_id}-{index}-{_share_basename(source)}",
                read_only="ro" in options,
            )
            shares.append(share)
            mount = {**mount, "source": guest_path(share.name)}
        elif mount.get("type") not in GUEST_LOCAL_FS_TYPES:
            raise SpecConvError(
                f"mount {mount['destination']}: type {mount.get('type') or '(none)'!r} "
                "cannot be passed into the VM (only bind mounts and virtual filesystems)"
            )
        mounts.append(mount)
    if "mounts" in spec:
        spec["mounts"] = mounts

    # The host runs the hooks (they act on host namespaces, e.g. docker's network setup).
    spec.pop("hooks", None)

    process = spec.get("process")
    if isinstance(process, dict):
        for key in _LSM_PROCESS_KEYS:
            process.pop(key, None)

    linux = spec.get("linux")
    if isinstance(linux, dict):
        _convert_linux(linux, container_id)

    return ContainerPlan(guest_spec=spec, shares=tuple(shares))


GUEST_NETNS = {"type": "network", "path": "/proc/1/ns/net"}


def _convert_linux(linux: dict[str, Any], container_id: str) -> None:
    if "namespaces" in linux:
        # The guest creates fresh namespaces: host paths mean nothing there. The container's network
        # is the VM's own (it mirrors the host netns), so a network namespace becomes the guest's
        # initial one, named by path: crun then accepts the spec's net.* sysctls (Docker always sets
        # one), which act on this pod's VM alone.
        linux["namespaces"] = [GUEST_NETNS if ns.get("type") == "network" else {"type": ns["type"]}
                               for ns in linux["namespaces"]]
        # The guest is cgroup v2, where runtimes give each container its own cgroup namespace (a
        # v1 host's spec, e.g. Docker's, asks for none): /sys/fs/cgroup then shows the container's
        # own cgroup and its limits, not the guest's root.
        if not any(ns["type"] == "cgroup" for ns in linux["namespaces"]):
            linux["namespaces"].append({"type": "cgroup"})
    # Device nodes named by host major/minor; the guest's devices are its own.
    linux.pop("devices", None)
    linux["cgroupsPath"] = guest_cgroups_path(container_id)
    for key in _LSM_LINUX_KEYS:
        linux.pop(key, None)


def _share_basename(source: str) -> str:
    # Only a readable hint for people looking at the shared dir; the index keeps names unique.
    base = posixpath.basename(posixpath.normpath(source))
    return _UNSAFE_NAME_CHARS.sub("_", base) or "root"


def vm_sizing(spec: dict[str, Any], hv: HypervisorConfig, host_cpus: int, host_memory_mib: int) -> VMSizing:
    """Kata's static sizing: the configured defaults plus the container's own CPU and memory limits."""
    host_cpus = max(1, host_cpus)
    # Kata: 0 means one vCPU; negative, or more than the host has, means all host CPUs.
    base = hv.default_vcpus
    if base == 0:
        base = 1
    elif base < 0 or base > host_cpus:
        base = host_cpus
    # Kata: 0, or more than the host has, means the host's CPU count.
    max_vcpus = hv.default_maxvcpus
    if max_vcpus <= 0 or max_vcpus > host_cpus:
        max_vcpus = host_cpus
    max_vcpus = max(max_vcpus, base)

    res = linux_resources(spec)
    vcpus = base
    if res.cpu_quota is not None:
        # An unset period is the kernel's default CFS period.
        vcpus += math.ceil(res.cpu_quota / (res.cpu_period or DEFAULT_CPU_PERIOD_US))
    vcpus = min(vcpus, max_vcpus)

    memory = hv.default_memory if hv.default_memory > 0 else HypervisorConfig().default_memory
    if res.memory_limit is not None:
        memory += math.ceil(res.memory_limit / (1024 * 1024))
    # More than the host has cannot be backed; QEMU would start and the host would swap or OOM.
    if host_memory_mib > 0:
        memory = min(memory, host_memory_mib)
    # Kata: memory may be hot-added up to the host's size (plus memory_offset).
    max_memory = max(memory, host_memory_mib + hv.memory_offset)
    return VMSizing(vcpus=vcpus, max_vcpus=max_vcpus, memory_mib=memory, max_memory_mib=max_memory)
