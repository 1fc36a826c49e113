"""The runtime-spec versions this runtime reads, and what of them the guest's crun can be given.

Bundles come in runtime-spec 1.0.x to 1.2.x: containerd 2.x and current tools write "1.2.0" or
"1.2.1". The guest's crun (1.8.1) takes a spec only when its ociVersion starts with "1.0" or "1.1.0"
(anything else: "unknown version specified"), and it predates fields that runtime-spec 1.1.0 and
later added, which it would ignore without a word. So the host reads the newer versions, refuses by
name each field the guest cannot honour (here), and hands the guest a version crun knows
(kata.specconv). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kata.utils.ids import shown

# The oldest and newest runtime-spec releases this runtime knows (the features document's range).
VERSION_MIN = "1.0.0"
VERSION_MAX = "1.2.1"
_MAX_MINOR = 2
_READS = "1.0.x to 1.2.x"

# What the guest's crun is told. Its fields are a subset of 1.2's once the ones below are refused.
GUEST_VERSION = "1.1.0"

# A version: the runtime-spec's 1.x.y, with a pre-release or build suffix ("1.0.2-dev", "1.2.1+dev").
_VERSION = re.compile(r"1\.(?P<minor>0|[1-9][0-9]*)\.[0-9]+([-+][0-9A-Za-z.+-]+)?", re.ASCII)

# Fields the guest cannot honour, and why: crun 1.8.1 does not know them (it would ignore them), or
# the VM has nothing for them to configure. runtime-spec 1.1.0 added scheduler and ioPriority,
# 1.2.1 execCPUAffinity, 1.3.0 memoryPolicy, netDevices and intelRdt's schemata and monitoring.
_CRUN = "the guest's crun (1.8.1) cannot apply it"
PROCESS_FIELDS: Mapping[str, str] = {
    "scheduler": _CRUN,
    "ioPriority": _CRUN,
    "execCPUAffinity": "host CPUs mean nothing in the VM, and the guest's crun (1.8.1) cannot apply it",
}
LINUX_FIELDS: Mapping[str, str] = {
    "intelRdt": "the VM has no Intel RDT (resctrl)",
    "memoryPolicy": _CRUN,
    "netDevices": "a host network device cannot be moved into the VM",
}
# Mount options runtime-spec 1.2.0 added: the guest kernel (Linux 6.1) cannot idmap a virtio-fs
# mount (a bind mount's) or a tmpfs.
MOUNT_OPTIONS: Mapping[str, str] = {
    "idmap": "the guest kernel cannot idmap its mounts",
    "ridmap": "the guest kernel cannot idmap its mounts",
}


def version_problem(version: Any) -> str | None:
    """Why ``version`` (config.json's ociVersion) is not one this runtime reads, or None."""
    if not isinstance(version, str) or not version:
        return "ociVersion must be set"
    m = _VERSION.fullmatch(version)
    if m is None or int(m["minor"]) > _MAX_MINOR:
        return f"ociVersion {shown(version)} is not a version this runtime reads ({_READS})"
    return None


def minor(version: str) -> int:
    """The minor number of a version that version_problem accepted; ValueError for another."""
    m = _VERSION.fullmatch(version)
    if m is None:
        raise ValueError(f"not a runtime-spec version: {shown(version)}")
    return int(m["minor"])


def relative_destinations(version: str) -> bool:
    """Whether a spec of ``version`` may give a mount a relative destination (relative to the
    container's root): runtime-spec 1.2.0 allowed it on Linux; before, it had to be absolute."""
    return minor(version) >= 2


def guest_version(version: str) -> str:
    """The ociVersion the guest's crun is given for a spec of ``version``: a 1.0.x as it is (crun
    takes any), a 1.1.x or 1.2.x as GUEST_VERSION once the fields it lacks are refused."""
    return version if minor(version) == 0 else GUEST_VERSION


def unhonoured_in_process(proc: Mapping[str, Any], where: str) -> str | None:
    """The first field of a process object the guest cannot honour, as a one-line refusal."""
    return _first_present(proc, PROCESS_FIELDS, where)


def unhonoured_in_spec(spec: Mapping[str, Any]) -> str | None:
    """The first field of a spec (its process aside) the guest cannot honour, as a one-line refusal."""
    linux = spec.get("linux")
    problem = _first_present(linux, LINUX_FIELDS, "linux") if isinstance(linux, dict) else None
    if problem:
        return problem
    for i, mount in enumerate(spec.get("mounts") or ()):
        for option in (mount.get("options") or ()) if isinstance(mount, dict) else ():
            if option in MOUNT_OPTIONS:
                return f"mounts[{i}]: option {option!r} is not supported: {MOUNT_OPTIONS[option]}"
    return None


def _first_present(obj: Mapping[str, Any], fields: Mapping[str, str], where: str) -> str | None:
    # A JSON null is an absent field, as it is for Go (and for kata.oci.schema).
    for name, why in fields.items():
        if obj.get(name) is not None:
            return f"{where}.{name} is not supported: {why}"
    return None
