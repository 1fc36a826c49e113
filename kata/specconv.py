"""OCI spec + configuration -> what the VM and the guest agent need. Pure: no I/O, no mounts.

The host spec describes a container on the host; the guest spec describes the same container as
crun inside the VM must see it: paths point into the shared filesystem, everything that names a
host object (namespace files, device nodes, hooks, host cgroups, LSM labels) is removed, and a newer
runtime-spec version is told as one the guest's crun takes (kata.oci.versions says which).
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
from kata.oci import cri_annotations, versions
from kata.oci.spec import Bundle, Resources, linux_resources
from kata.utils.ids import id_problem

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
    # The id names the container's shares on the host and its cgroup in the guest.
    problem = id_problem(container_id)
    if problem:
        raise SpecConvError(problem)
    spec = copy.deepcopy(bundle.spec)  # bundle.spec is never modified
    version = spec.get("ociVersion")
    if isinstance(version, str):
        # Validation refused what the guest's crun would not honour; the rest it takes as its own.
        spec["ociVersion"] = versions.guest_version(version)

    # Shared writable even for a read-only root: the guest runtime must still create mount points
    # in it before it remounts the root read-only, as runc does on the host.
    rootfs = HostShare(str(bundle.root_path), f"{container_id}/rootfs", read_only=False)
    spec["root"] = {"path": guest_path(rootfs.name), "readonly": bundle.root_readonly}

    shares = [rootfs]
    mounts = []
    for index, mount in enumerate(spec.get("mounts") or ()):
        if not mount["destination"].startswith("/"):
            # Relative to the container's root (runtime-spec 1.2): absolute, as every crun takes it.
            mount = {**mount, "destination": "/" + mount["destination"]}
        options = mount.get("options") or []
        is_bind = mount.get("type") == "bind" or "bind" in options or "rbind" in options
        if is_bind:
            if not mount.get("source"):
                raise SpecConvError(f"mount {mount['destination']}: bind mount without a source")
            # A relative source is relative to the bundle, as for runc (whose working directory it is).
            source = posixpath.join(str(bundle.path), mount["source"])
            share = HostShare(
                source=posixpath.normpath(source),
                # Under the container's own directory: a name beside it ("ID-0-x") would share
                # its prefix with another container's ("ID-0" is a valid id too).
                name=f"{container_id}/{index}-{_share_basename(source)}",
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
_POD_SHARED_NAMESPACES = ("ipc", "uts")


def _convert_linux(linux: dict[str, Any], container_id: str) -> None:
    if "namespaces" in linux:
        # The guest creates fresh namespaces: host paths mean nothing there. The container's network
        # is the VM's own (it mirrors the host netns), so a network namespace becomes the guest's
        # initial one, named by path: crun then accepts the spec's net.* sysctls (Docker always sets
        # one), which act on this pod's VM alone.
        # IPC and UTS namespaces joined by path are a pod's shared ones (a Kubernetes container joins
        # its sandbox's): in the VM, which is the pod's, the guest's own stand for them.
        linux["namespaces"] = [GUEST_NETNS if ns.get("type") == "network" else {"type": ns["type"]}
                               for ns in linux["namespaces"]
                               if not (ns.get("type") in _POD_SHARED_NAMESPACES and ns.get("path"))]
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

    res = pod_resources(spec) or linux_resources(spec)
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


# ---- pods (Kubernetes through containerd's CRI plugin) -------------------------------------------
CRI_CONTAINER_TYPE = cri_annotations.CONTAINER_TYPE
CRI_SANDBOX_ID = cri_annotations.SANDBOX_ID
CRI_SANDBOX_CPU_QUOTA = cri_annotations.SANDBOX_CPU_QUOTA
CRI_SANDBOX_CPU_PERIOD = cri_annotations.SANDBOX_CPU_PERIOD
CRI_SANDBOX_MEMORY = cri_annotations.SANDBOX_MEMORY


@dataclass(frozen=True)
class PodRole:
    """What a container is to its pod: the sandbox (whose VM it brings up), or a container that
    joins the sandbox ``sandbox_id``. A container without CRI (or CRI-O) annotations is a pod of its
    own; so is podman's infra container, which has none."""

    is_sandbox: bool
    sandbox_id: str


def pod_role(annotations: dict[str, str] | Any, container_id: str) -> PodRole:
    type_key, sandbox_key = cri_annotations.pod_keys(annotations)
    kind = annotations.get(type_key, "")
    sandbox_id = annotations.get(sandbox_key, "") or container_id
    if kind == "container":
        if sandbox_id == container_id:
            raise SpecConvError(f"container {container_id}: {type_key} is container, "
                                f"but {sandbox_key} names no other sandbox")
        problem = id_problem(sandbox_id)
        if problem:
            raise SpecConvError(f"annotation {sandbox_key}: {problem}")
        return PodRole(is_sandbox=False, sandbox_id=sandbox_id)
    return PodRole(is_sandbox=True, sandbox_id=container_id)


def pod_resources(spec: dict[str, Any]) -> Resources | None:
    """The whole pod's limits, when the CRI plugin passes them on the sandbox (its own spec has
    none): the VM is then sized for every container of the pod up front."""
    annotations = spec.get("annotations") or {}
    if annotations.get(CRI_CONTAINER_TYPE) != "sandbox":
        return None

    def number(key: str) -> int | None:
        value = annotations.get(key)
        if value in (None, ""):
            return None
        try:
            n = int(value)
        except ValueError:
            raise SpecConvError(f"annotation {key}: {value!r} is not a number") from None
        return n if n > 0 else None

    quota, period, memory = (number(CRI_SANDBOX_CPU_QUOTA), number(CRI_SANDBOX_CPU_PERIOD),
                             number(CRI_SANDBOX_MEMORY))
    if quota is None and memory is None:
        return None
    return Resources(memory_limit=memory, cpu_quota=quota, cpu_period=period)


def container_growth(spec: dict[str, Any]) -> tuple[int, int]:
    """(vCPUs, MiB) a joining container adds to its pod's VM: its own limits, as vm_sizing counts
    the first container's. Nothing when the pod was sized as a whole (see pod_resources)."""
    res = linux_resources(spec)
    vcpus = math.ceil(res.cpu_quota / (res.cpu_period or DEFAULT_CPU_PERIOD_US)) if res.cpu_quota else 0
    memory = math.ceil(res.memory_limit / (1024 * 1024)) if res.memory_limit else 0
    return vcpus, memory
