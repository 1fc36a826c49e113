"""Which namespace a sysctl belongs to, and where in the VM a container's sysctls are set.

A container may only set sysctls of a namespace it has (runc's rule, which Kubernetes also keeps):
the IPC ones, the UTS domain name, and the network ones. In the VM, a namespace a container shares
with its pod is the guest's own (the VM is the pod's), so those sysctls are set there by the agent,
not by crun, which only sets sysctls of namespaces it creates for the container.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_IPC = frozenset({
    "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
    "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
})
# A name maps onto a path below /proc/sys: no empty part, no "..", nothing a path could abuse.
_NAME = re.compile(r"[A-Za-z0-9_-]+(?:[./][A-Za-z0-9_-]+)+")


class SysctlError(ValueError):
    """A sysctl no container can set; one line for the user. (Not a KataError: the guest agent
    uses this module too, and the guest image carries no kata.errors.)"""


def namespace_of(name: str) -> str:
    """The namespace type ("ipc", "uts", "network") a sysctl belongs to, or SysctlError."""
    if not _NAME.fullmatch(name):
        raise SysctlError(f"sysctl {name!r}: not a sysctl name")
    dotted = name.replace("/", ".")
    if dotted in _IPC or dotted.startswith("fs.mqueue."):
        return "ipc"
    if dotted == "kernel.domainname":
        return "uts"
    if dotted.startswith("net."):
        return "network"
    if dotted == "kernel.hostname":
        raise SysctlError("sysctl kernel.hostname: set the spec's hostname instead")
    raise SysctlError(f"sysctl {name}: not namespaced, so a container cannot set it "
                      "(it would change every container of the VM)")


def proc_path(name: str) -> str:
    """Its file below /proc/sys; the name must have passed namespace_of."""
    return name.replace(".", "/") if "/" not in name else name


def split(sysctls: Mapping[str, str], own_namespaces: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(those crun sets in the container's own new namespaces, those set in the pod's, the guest's).

    ``own_namespaces``: the namespace types crun creates for the container, or joins by a guest path.
    """
    own: dict[str, str] = {}
    pod: dict[str, str] = {}
    for name, value in sysctls.items():
        if not isinstance(value, str) or "\n" in value or len(value) > 4096:
            raise SysctlError(f"sysctl {name}: value must be one line of text")
        (own if namespace_of(name) in own_namespaces else pod)[name] = value
    return own, pod
