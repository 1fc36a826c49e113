"""What `kata-runtime check` looks at, gathered in one pass so that check_rules can judge it purely.

Everything that touches the host (files, devices, mountinfo, QEMU's command line, the boot probe) is
here; nothing here decides whether a finding is good or bad.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from kata.cgroups.host import Layout as CgroupLayout
from kata.cgroups.host import layout
from kata.config import RuntimeConfig
from kata.hypervisor.accel import ProbeResult, choose_accel
from kata.hypervisor.host import (
    HostCapabilities,
    host_capabilities,
    kernel_seccomp,
    kvm_open_error,
    qemu_seccomp,
)
from kata.utils.mount import fs_type

AccelChoice = Literal["auto", "kvm", "tcg"]


@dataclass(frozen=True)
class TemplateDir:
    path: str
    fs_type: str | None  # of the mount that holds it, or would once it is made
    writable: bool  # it, or the nearest directory above it that exists (which mkdir -p extends)


@dataclass(frozen=True)
class HostFacts:
    caps: HostCapabilities
    kvm_open_error: str | None  # None: /dev/kvm opened read-write
    accel: ProbeResult | None  # None: not probed (--no-probe, or nothing to boot)
    kernel_seccomp: bool
    qemu_seccomp: bool | None  # None: QEMU does not run
    cgroups: CgroupLayout
    templates: TemplateDir
    present: frozenset[str]  # which of the configuration's asset files exist


cgroup_layout = layout  # v2, hybrid (v1 with cgroup2 at unified/), v1 or none


def template_dir(path: str, mountinfo: bytes | None = None) -> TemplateDir:
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return TemplateDir(path, fs_type(os.path.realpath(path), mountinfo), os.access(existing, os.W_OK))


def gather(cfg: RuntimeConfig, probe: bool) -> HostFacts:
    """The host's facts for ``cfg``; ``probe`` boots the guest kernel under KVM once (cached), as a
    sandbox's start would, when QEMU and the kernel are there."""
    hv = cfg.hypervisor
    caps = host_capabilities(Path(hv.path))
    assets = (hv.kernel, hv.image, hv.initrd, hv.virtio_fs_daemon)
    present = frozenset(p for p in assets if p and Path(p).exists())
    accel = None
    if probe and caps.qemu_version and hv.kernel in present:
        accel = choose_accel(Path(hv.path), Path(hv.kernel), force=cast(AccelChoice, hv.accel))
    with open("/proc/self/mountinfo", "rb") as f:
        mountinfo = f.read()
    return HostFacts(
        caps=caps,
        kvm_open_error=kvm_open_error(),
        accel=accel,
        kernel_seccomp=kernel_seccomp(),
        qemu_seccomp=qemu_seccomp(Path(hv.path)) if caps.qemu_version else None,
        cgroups=cgroup_layout(mountinfo),
        templates=template_dir(cfg.factory.template_path, mountinfo),
        present=present,
    )
