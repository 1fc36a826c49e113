"""Typed configuration.toml sections and the value rules shared by the loader and annotations.

Field names are Kata's configuration.toml key names so a value can be traced to its key. Defaults are
this project's defaults and equal what the packaged configuration-qemu.toml says (a test holds them
together), so a file that leaves a key out behaves like the shipped file.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kata.errors import KataError
from kata.sandbox import paths

SUPPORTED_HYPERVISORS = ("qemu",)
SUPPORTED_AGENTS = ("kata",)
# x86 machine types the QEMU driver knows how to build a command line for.
SUPPORTED_MACHINE_TYPES = ("microvm", "q35", "pc")
SHARED_FS_KINDS = ("virtio-fs", "virtio-9p", "none")
# Kata's names; fs_share maps "never" to the C virtiofsd's "none".
VIRTIO_FS_CACHE_MODES = ("auto", "always", "never")
BLOCK_DEVICE_DRIVERS = ("virtio-blk", "virtio-scsi", "nvdimm")
ACCELERATORS = ("auto", "kvm", "tcg")
AGENT_CHANNELS = ("auto", "vsock", "virtio-serial")
INTERNETWORKING_MODELS = ("tcfilter", "macvtap", "none")
# Below this the guest kernel plus agent do not come up reliably.
MIN_MEMORY_MIB = 64


class ConfigError(KataError):
    """configuration.toml or an annotation is invalid; one line, naming the file (or annotation) and key."""


@dataclass(frozen=True)
class HypervisorConfig:
    name: str = "qemu"  # the NAME of [hypervisor.NAME]
    path: str = "/usr/bin/qemu-system-x86_64"
    kernel: str = "/usr/share/kata-containers/vmlinux.container"
    image: str = "/usr/share/kata-containers/kata-containers.img"
    disable_image_nvdimm: bool = False
    reclaim_guest_freed_memory: bool = True
    initrd: str = ""
    firmware: str = ""
    machine_type: str = "microvm"
    kernel_params: str = ""
    default_vcpus: int = 1
    default_maxvcpus: int = 0
    default_memory: int = 512
    memory_slots: int = 10
    memory_offset: int = 0
    shared_fs: str = "virtio-fs"
    virtio_fs_daemon: str = "/usr/lib/qemu/virtiofsd"
    valid_virtio_fs_daemon_paths: tuple[str, ...] = ("/usr/lib/qemu/virtiofsd",)
    virtio_fs_cache: str = "auto"
    virtio_fs_cache_size: int = 0
    virtio_fs_extra_args: tuple[str, ...] = ()
    msize_9p: int = 131072
    block_device_driver: str = "virtio-blk"
    disable_block_device_use: bool = False
    disable_vhost_net: bool = False
    enable_annotations: tuple[str, ...] = ()
    valid_hypervisor_paths: tuple[str, ...] = ("/usr/bin/qemu-system-x86_64",)
    enable_debug: bool = False
    # QEMU's -sandbox (seccomp) options, Kata's key; "" turns the filter off.
    seccompsandbox: str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    # Ours (Kata has no equivalent keys).
    accel: str = "auto"
    boot_timeout: float = 20.0

    @property
    def kernel_params_list(self) -> tuple[str, ...]:
        return tuple(self.kernel_params.split())


@dataclass(frozen=True)
class AgentConfig:
    name: str = "kata"  # the NAME of [agent.NAME]
    enable_debug: bool = False
    dial_timeout: int = 45
    kernel_modules: tuple[str, ...] = ()
    # Kata's key: the guest offers a root shell to `kata-runtime debug-console` (off: none exists).
    debug_console_enabled: bool = False
    # Ours: how the host reaches the agent.
    agent_channel: str = "auto"


@dataclass(frozen=True)
class RuntimeSection:
    enable_debug: bool = False
    internetworking_model: str = "tcfilter"
    disable_new_netns: bool = False
    sandbox_cgroup_only: bool = False
    experimental: tuple[str, ...] = ()
    static_sandbox_resource_mgmt: bool = True
    # (ours) Pods' shims forked by one process that has the shim's code loaded (kata.shim.zygote).
    shim_zygote: bool = True


@dataclass(frozen=True)
class FactoryConfig:
    # Kata's [factory] keys. A template VM is booted once and snapshotted with its agent ready;
    # sandboxes then start by restoring that snapshot instead of booting.
    enable_template: bool = True
    # Not Kata's /run/vc/vm/template: under /run/vc/vm every name is a sandbox's (see factory_problems).
    template_path: str = "/run/vc/templates"
    # Kata's VMCache: how many clones of the default VM shape the pool daemon (`kata-runtime factory
    # init`) keeps restored and warmed, and the root-only socket sandboxes take them from. 0: no pool.
    vm_cache_number: int = 0
    vm_cache_endpoint: str = "/run/vc/pool/pool.sock"


# A pooled VM idles at ~1.5% of a core under TCG and holds its own RAM: more than this is no cache.
MAX_VM_CACHE_NUMBER = 16


@dataclass(frozen=True)
class RuntimeConfig:
    hypervisor: HypervisorConfig
    agent: AgentConfig
    runtime: RuntimeSection
    source: Path
    factory: FactoryConfig = FactoryConfig()


def path_allowed(path: str, globs: tuple[str, ...]) -> bool:
    """Whether ``path`` matches one of the valid_*_paths globs.

    Kata expands the globs against the filesystem; matching the pattern itself keeps this pure and
    differs only for paths that do not exist, which could not be used anyway.
    """
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def hypervisor_problems(hv: HypervisorConfig) -> list[tuple[str, str]]:
    """(key, reason) for each invalid value; empty when ``hv`` is usable."""
    problems: list[tuple[str, str]] = []

    def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            problems.append((key, _unsupported(value, allowed)))

    def absolute(key: str, value: str, required: bool) -> None:
        if (required or value) and not value.startswith("/"):
            problems.append((key, f"must be an absolute path, got {value!r}"))

    absolute("path", hv.path, True)
    absolute("kernel", hv.kernel, True)
    for key in ("image", "initrd", "firmware"):
        absolute(key, getattr(hv, key), False)
    if hv.valid_hypervisor_paths and not path_allowed(hv.path, hv.valid_hypervisor_paths):
        problems.append(("path", f"{hv.path} is not in valid_hypervisor_paths"))
    choice("machine_type", hv.machine_type, SUPPORTED_MACHINE_TYPES)
    if hv.image and hv.initrd:
        problems.append(("image", "image and initrd are mutually exclusive"))
    for key in ("default_maxvcpus", "memory_slots", "memory_offset", "virtio_fs_cache_size"):
        if getattr(hv, key) < 0:
            problems.append((key, f"must not be negative, got {getattr(hv, key)}"))
    # default_vcpus < 0 is Kata's way of saying "all host CPUs", so only memory is checked here.
    if hv.default_memory < 0:
        problems.append(("default_memory", f"must not be negative, got {hv.default_memory}"))
    elif 0 < hv.default_memory < MIN_MEMORY_MIB:
        problems.append(("default_memory", f"{hv.default_memory} MiB is below the minimum {MIN_MEMORY_MIB}"))
    choice("shared_fs", hv.shared_fs, SHARED_FS_KINDS)
    if hv.shared_fs == "virtio-fs":
        absolute("virtio_fs_daemon", hv.virtio_fs_daemon, True)
        if hv.valid_virtio_fs_daemon_paths and not path_allowed(
            hv.virtio_fs_daemon, hv.valid_virtio_fs_daemon_paths
        ):
            reason = f"{hv.virtio_fs_daemon} is not in valid_virtio_fs_daemon_paths"
            problems.append(("virtio_fs_daemon", reason))
    choice("virtio_fs_cache", hv.virtio_fs_cache, VIRTIO_FS_CACHE_MODES)
    if hv.msize_9p < 4096:
        problems.append(("msize_9p", f"must be at least 4096, got {hv.msize_9p}"))
    choice("block_device_driver", hv.block_device_driver, BLOCK_DEVICE_DRIVERS)
    choice("accel", hv.accel, ACCELERATORS)
    if hv.boot_timeout <= 0:
        problems.append(("boot_timeout", f"must be positive, got {hv.boot_timeout}"))
    for pattern in hv.enable_annotations:
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(("enable_annotations", f"invalid regular expression {pattern!r}: {e}"))
    return problems


def agent_problems(agent: AgentConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if agent.dial_timeout <= 0:
        problems.append(("dial_timeout", f"must be positive, got {agent.dial_timeout}"))
    if agent.agent_channel not in AGENT_CHANNELS:
        problems.append(("agent_channel", _unsupported(agent.agent_channel, AGENT_CHANNELS)))
    return problems


def factory_problems(factory: FactoryConfig) -> list[tuple[str, str]]:
    if not 0 <= factory.vm_cache_number <= MAX_VM_CACHE_NUMBER:
        return [("vm_cache_number",
                 f"must be between 0 and {MAX_VM_CACHE_NUMBER}, got {factory.vm_cache_number}")]
    if not factory.vm_cache_endpoint.startswith("/") or len(os.fsencode(factory.vm_cache_endpoint)) > 107:
        return [("vm_cache_endpoint", f"must be an absolute socket path of at most 107 bytes, "
                                      f"got {factory.vm_cache_endpoint!r}")]
    if not factory.template_path.startswith("/"):
        return [("template_path", f"must be an absolute path, got {factory.template_path!r}")]
    # Sandbox ids name the directories in these: a template store among them would be a sandbox's
    # (a container named "template" shared Kata's default), and one above them would take every
    # sandbox with it on `factory destroy`.
    store = PurePosixPath(posixpath.normpath(factory.template_path))
    for named in map(PurePosixPath, (paths.VM_ROOT, paths.STATE_ROOT / "sbs", paths.SHARED_ROOT)):
        if store == named or named in store.parents or store in named.parents:
            return [("template_path", f"{store} would share {named}, where sandboxes' ids name the "
                                      f"directories: choose a path outside it (the default is "
                                      f"{FactoryConfig.template_path})")]
    return []


def runtime_problems(rt: RuntimeSection) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if rt.internetworking_model not in INTERNETWORKING_MODELS:
        reason = _unsupported(rt.internetworking_model, INTERNETWORKING_MODELS)
        problems.append(("internetworking_model", reason))
    return problems


def _unsupported(value: str, allowed: tuple[str, ...]) -> str:
    return f"unsupported value {value!r} (supported: {', '.join(allowed)})"
