"""OCI spec + configuration -> what the VM and the guest agent need. Pure: no I/O, no mounts.

The host spec describes a container on the host; the guest spec describes the same container as
crun inside the VM must see it: paths point into the shared filesystem, everything that names a
host object (namespace files, device nodes, hooks, host cgroups, LSM labels) is removed, and a newer
runtime-spec version is told as one the guest's crun takes (kata.oci.versions says which).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kata.config.model import HypervisorConfig
from kata.errors import KataError
from kata.oci import cri_annotations, sysctls, versions
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
    read_only: bool  # the share's own mount; its submounts keep their flags (runc's "ro")
    recursive: bool = True  # the source's submounts come along ("rbind"), each a mount of its own
    recursive_read_only: bool = False  # ...read-only as well ("rro")
    # Mounts made below the source later appear in the share (and so in the guest); none travels
    # back. For "slave"/"rslave", and for "shared"/"rshared", which a VM can only half honour.
    slave: bool = False

    @property
    def read_only_at_top(self) -> bool:
        """Read-only itself while its submounts keep their own flags (see submount_binds)."""
        return self.read_only and self.recursive and not self.recursive_read_only


# Propagation options that ask for the host's later mounts below a bind's source.
_RECEIVING_PROPAGATION = frozenset({"slave", "rslave", "shared", "rshared"})
_PROPAGATION = _RECEIVING_PROPAGATION | {"private", "rprivate", "unbindable", "runbindable"}


def bind_share(source: str, name: str, options: list[str]) -> HostShare:
    """The share behind a bind mount with runc's reading of its options: "ro"/"rw" set the mount's
    own flag, "rro"/"rrw" then set or clear it on every mount of the tree (the last of each pair
    wins), and the last propagation option decides whether later host mounts reach it."""
    read_only = False
    recursive_attr: bool | None = None  # True: rro, False: rrw, None: neither
    propagation = "rprivate"
    for opt in options:
        if opt in ("ro", "rw"):
            read_only = opt == "ro"
        elif opt in ("rro", "rrw"):
            recursive_attr = opt == "rro"
        elif opt in _PROPAGATION:
            propagation = opt
    if recursive_attr is not None:
        read_only = recursive_attr
    return HostShare(source, name, read_only=read_only, recursive="rbind" in options,
                     recursive_read_only=bool(recursive_attr), slave=propagation in _RECEIVING_PROPAGATION)


@dataclass(frozen=True)
class ContainerPlan:
    guest_spec: dict[str, Any]
    shares: tuple[HostShare, ...]  # shares[0] is the rootfs
    # Sysctls of namespaces the container shares with its pod: the agent sets them in the guest's own.
    pod_sysctls: dict[str, str] = dataclasses.field(default_factory=dict)


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
            # Under the container's own directory: a name beside it ("ID-0-x") would share its
            # prefix with another container's ("ID-0" is a valid id too).
            name = f"{container_id}/{index}-{_share_basename(source)}"
            share = bind_share(posixpath.normpath(source), name, options)
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

    pod_sysctls: dict[str, str] = {}
    linux = spec.get("linux")
    if isinstance(linux, dict):
        annotations = spec.get("annotations") or {}
        # containerd's or CRI-O's (podman's) keys, as pod_role reads them
        is_pod_sandbox = annotations.get(cri_annotations.pod_keys(annotations)[0]) == "sandbox"
        _convert_linux(linux, container_id, is_pod_sandbox)
        if is_pod_sandbox:
            # The pod's IPC and UTS namespaces are the guest's own, which its containers join
            # (below); the sandbox container joins them too, so that its sysctls and hostname are
            # the pod's. The agent set the hostname when it made the sandbox.
            spec.pop("hostname", None)
        pod_sysctls = _route_sysctls(linux)

    return ContainerPlan(guest_spec=spec, shares=tuple(shares), pod_sysctls=pod_sysctls)


def _route_sysctls(linux: dict[str, Any]) -> dict[str, str]:
    """Leave in the spec the sysctls crun can set; return those of the pod's namespaces."""
    wanted = linux.get("sysctl")
    if not wanted:
        return {}
    own_namespaces = {ns["type"] for ns in linux.get("namespaces") or ()}
    try:
        own, pod = sysctls.split(wanted, own_namespaces)
    except sysctls.SysctlError as e:
        raise SpecConvError(str(e)) from None
    if own:
        linux["sysctl"] = own
    else:
        del linux["sysctl"]
    return pod


def shared_binds(guest_spec: dict[str, Any]) -> list[str]:
    """The destinations of the shares whose bind asks for shared propagation, which a VM honours
    one way only: the host's mounts come in, the guest's never go out (see docs/security.md)."""
    found = []
    for m in guest_spec.get("mounts") or ():
        propagation = [opt for opt in m.get("options") or () if opt in _PROPAGATION]
        last = propagation[-1] if propagation else ""
        if last in ("shared", "rshared") and str(m.get("source", "")).startswith(GUEST_SHARED_DIR + "/"):
            found.append(m["destination"])
    return found


# Per volume: what a host with many mounts below a read-only volume (e.g. "/" for a node agent)
# adds to the guest spec at most. The rest stay read-only in the container: the safe side.
MAX_SUBMOUNT_BINDS = 64


def submount_binds(guest_spec: dict[str, Any], share: HostShare,
                   submounts: Sequence[tuple[str, bool]]) -> dict[str, Any]:
    """The guest spec with a bind of its own, right after ``share``'s mount, for each of the share's
    submounts (path relative to the share, read-only on the host), with the host's flag.

    A volume read-only at its top only needs them: in the guest, virtio-fs mounts a submount on
    first use with the flags of the mount it is found under (read-only there, whatever the host
    says), and 9p shows no submounts at all. The host enforces its own flags either way; these
    binds give the container the same ones."""
    if not share.read_only_at_top or not submounts:
        return guest_spec
    spec = copy.deepcopy(guest_spec)
    mounts = spec.get("mounts") or []
    source = guest_path(share.name)
    index = next((i for i, m in enumerate(mounts) if m.get("source") == source), None)
    if index is None:
        raise SpecConvError(f"share {share.name}: no mount of the guest spec uses it")
    parent = mounts[index]
    propagation = [opt for opt in parent.get("options") or () if opt in _PROPAGATION]
    binds = []
    for relative, read_only in submounts[:MAX_SUBMOUNT_BINDS]:
        relative = posixpath.normpath(relative)
        if relative.startswith(("/", "..")) or relative == ".":
            continue  # never outside the share (mountinfo gives paths below it: a stale read)
        binds.append({"destination": posixpath.join(parent["destination"], relative), "type": "bind",
                      "source": posixpath.join(source, relative),
                      "options": ["rbind", "ro" if read_only else "rw", *propagation]})
    mounts[index + 1:index + 1] = binds
    return spec


GUEST_NETNS = {"type": "network", "path": "/proc/1/ns/net"}
_POD_SHARED_NAMESPACES = ("ipc", "uts")


def _convert_linux(linux: dict[str, Any], container_id: str, is_pod_sandbox: bool) -> None:
    if "namespaces" in linux:
        # The guest creates fresh namespaces: host paths mean nothing there. The container's network
        # is the VM's own (it mirrors the host netns), so a network namespace becomes the guest's
        # initial one, named by path: crun then accepts the spec's net.* sysctls (Docker always sets
        # one), which act on this pod's VM alone.
        # IPC and UTS namespaces joined by path are a pod's shared ones (a Kubernetes container joins
        # its sandbox's): in the VM, which is the pod's, the guest's own stand for them.
        linux["namespaces"] = [GUEST_NETNS if ns.get("type") == "network" else {"type": ns["type"]}
                               for ns in linux["namespaces"]
                               if not (ns.get("type") in _POD_SHARED_NAMESPACES
                                       and (ns.get("path") or is_pod_sandbox))]
        # The guest is cgroup v2, where runtimes give each container its own cgroup namespace (a
        # v1 host's spec, e.g. Docker's, asks for none): /sys/fs/cgroup then shows the container's
        # own cgroup and its limits, not the guest's root.
        if not any(ns["type"] == "cgroup" for ns in linux["namespaces"]):
            linux["namespaces"].append({"type": "cgroup"})
    # linux.devices stay: crun makes the nodes in the container, as runc does on the host. Their
    # numbers name the VM's devices, not the host's (no host device is passed into the VM): the
    # memory, tty, fuse and tun devices are the same everywhere; a host disk's numbers are not.
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
