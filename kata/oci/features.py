"""What this runtime supports, as the runtime-spec's features document (`runc features`, and the
shim's `-info`).

The answers are about the guest, where the containers run: crun on a cgroup v2 kernel with seccomp
and user namespaces but no time namespace, no AppArmor, SELinux or Intel RDT. Pure data: no probing.
"""

from __future__ import annotations

import os
from typing import Any

from kata import __version__

# The runtime-spec version of the state documents, which `--version` names.
OCI_SPEC_VERSION = "1.0.2"

# runc 1.1's known mount options (mount flags, propagation, recursive attributes, tmpcopyup), which
# crun in the guest understands too; runc's "acl"/"noacl" are left out (they never worked: runc#3738).
MOUNT_OPTIONS = sorted([
    "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "iversion", "lazytime",
    "loud", "mand", "noatime", "nodev", "nodiratime", "noexec", "noiversion", "nolazytime", "nomand",
    "norelatime", "nostrictatime", "nosuid", "nosymfollow", "rbind", "relatime", "remount", "ro", "rw",
    "silent", "strictatime", "suid", "symfollow", "sync",
    "private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable",
    "rro", "rrw", "rnosuid", "rsuid", "rnodev", "rdev", "rnoexec", "rexec", "rnodiratime", "rdiratime",
    "rrelatime", "rnorelatime", "rnoatime", "ratime", "rstrictatime", "rnostrictatime", "rnosymfollow",
    "rsymfollow",
    "tmpcopyup",
])

# SCMP_ACT_NOTIFY is left out: its listener socket would be on the host, the filter in the guest.
SECCOMP_ACTIONS = [
    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP",
]
SECCOMP_OPERATORS = [
    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_NE",
]
# The guest has the host's architecture; these are the ABIs its kernel can run.
_SECCOMP_ARCHS = {
    "x86_64": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


def features(machine: str | None = None) -> dict[str, Any]:
    """The features document, in the runtime-spec's field order."""
    # Imported here: main imports every verb module on each invocation, and kata.config is not cheap.
    # The namespaces and capabilities are the guest kernel's (no time namespace), as the spec's
    # validation holds specs to them.
    from kata.config.annotations import AGENT_PREFIX, HYPERVISOR_PREFIX, RUNTIME_PREFIX
    from kata.oci.spec import CAPABILITIES, GUEST_NAMESPACES, HOOK_KINDS
    from kata.oci.versions import VERSION_MAX, VERSION_MIN

    arch = machine or os.uname().machine
    return {
        # The versions a bundle may have (kata.oci.versions), whatever the guest's crun is told.
        "ociVersionMin": VERSION_MIN,
        "ociVersionMax": VERSION_MAX,
        "hooks": list(HOOK_KINDS),
        "mountOptions": list(MOUNT_OPTIONS),
        "linux": {
            "namespaces": sorted(GUEST_NAMESPACES),  # as runc lists them
            "capabilities": list(CAPABILITIES),
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": {
                "enabled": True,
                "actions": list(SECCOMP_ACTIONS),
                "operators": list(SECCOMP_OPERATORS),
                "archs": list(_SECCOMP_ARCHS.get(arch, [])),
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
        },
        # Go marshals a map with sorted keys.
        "annotations": {
            "io.katacontainers.runtime.guest-runtime": "crun",
            "io.katacontainers.runtime.hypervisor": "qemu",
            "io.katacontainers.runtime.isolation": "vm",
            "io.katacontainers.runtime.version": __version__,
        },
        # Annotations that change the VM or the agent (when enable_annotations allows them): a
        # higher-level runtime must not pass them through from untrusted users.
        "potentiallyUnsafeConfigAnnotations": [HYPERVISOR_PREFIX, RUNTIME_PREFIX, AGENT_PREFIX],
    }
