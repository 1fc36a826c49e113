"""Per-pod overrides of configuration.toml through io.katacontainers.config.* annotations.

Kata's rules: a hypervisor annotation is refused (an error, not silently ignored) unless its short
name matches one of the enable_annotations regular expressions, searched anywhere in the name as Go's
regexp.MatchString does; the hypervisor binary and virtiofsd paths must also match their
valid_*_paths globs. Beyond Kata, a guest asset a pod names (kernel, image, initrd, firmware) must be
a regular file in a directory that holds a configured one: QEMU hands it to the guest, which could
otherwise read any host file or device (/dev/mem, a disk) the runtime can. Runtime and agent
annotations are not gated by enable_annotations in Kata.
Annotations this runtime does not implement are ignored, as Kata ignores ones it does not know.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from typing import Any

from kata.config.model import (
    AgentConfig,
    ConfigError,
    HypervisorConfig,
    RuntimeConfig,
    RuntimeSection,
    agent_problems,
    hypervisor_problems,
    path_allowed,
    runtime_problems,
)

HYPERVISOR_PREFIX = "io.katacontainers.config.hypervisor."
RUNTIME_PREFIX = "io.katacontainers.config.runtime."
AGENT_PREFIX = "io.katacontainers.config.agent."


def _parse_bool(value: str) -> bool:
    # The spellings Go's strconv.ParseBool accepts, which Kata uses.
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"invalid boolean {value!r}")


def _parse_uint(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"invalid unsigned integer {value!r}")
    return int(value)


def _parse_abs_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


def _parse_json_strings(value: str) -> tuple[str, ...]:
    # Kata takes virtio_fs_extra_args as a JSON array of strings.
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise ValueError(f"must be a JSON array of strings, got {value!r}")
    return tuple(parsed)


def _parse_modules(value: str) -> tuple[str, ...]:
    # Kata separates modules (each with its parameters) by ';'.
    return tuple(m.strip() for m in value.split(";") if m.strip())


@dataclasses.dataclass(frozen=True)
class _Spec:
    field: str  # the config field it sets
    parse: Callable[[str], Any]
    allow_list: str | None = None  # HypervisorConfig field with globs the value must match
    append: bool = False  # kernel_params: added to the configured ones, as Kata does
    asset: bool = False  # a file QEMU gives the guest: see _guest_asset


# Annotation short name -> how it maps onto HypervisorConfig. Names are Kata's (note default_max_vcpus,
# where the TOML key is default_maxvcpus).
HYPERVISOR_ANNOTATIONS: dict[str, _Spec] = {
    "path": _Spec("path", _parse_abs_path, allow_list="valid_hypervisor_paths"),
    "kernel": _Spec("kernel", _parse_abs_path, asset=True),
    "image": _Spec("image", _parse_abs_path, asset=True),
    "initrd": _Spec("initrd", _parse_abs_path, asset=True),
    "firmware": _Spec("firmware", _parse_abs_path, asset=True),
    "machine_type": _Spec("machine_type", str),
    "kernel_params": _Spec("kernel_params", str, append=True),
    "default_vcpus": _Spec("default_vcpus", _parse_uint),
    "default_max_vcpus": _Spec("default_maxvcpus", _parse_uint),
    "default_memory": _Spec("default_memory", _parse_uint),
    "memory_slots": _Spec("memory_slots", _parse_uint),
    "memory_offset": _Spec("memory_offset", _parse_uint),
    "shared_fs": _Spec("shared_fs", str),
    "virtio_fs_daemon": _Spec("virtio_fs_daemon", _parse_abs_path, allow_list="valid_virtio_fs_daemon_paths"),
    "virtio_fs_cache": _Spec("virtio_fs_cache", str),
    "virtio_fs_cache_size": _Spec("virtio_fs_cache_size", _parse_uint),
    "virtio_fs_extra_args": _Spec("virtio_fs_extra_args", _parse_json_strings),
    "msize_9p": _Spec("msize_9p", _parse_uint),
    "block_device_driver": _Spec("block_device_driver", str),
    "disable_block_device_use": _Spec("disable_block_device_use", _parse_bool),
    "enable_debug": _Spec("enable_debug", _parse_bool),
}

RUNTIME_ANNOTATIONS: dict[str, _Spec] = {
    "disable_new_netns": _Spec("disable_new_netns", _parse_bool),
    "sandbox_cgroup_only": _Spec("sandbox_cgroup_only", _parse_bool),
    "internetworking_model": _Spec("internetworking_model", str),
}

AGENT_ANNOTATIONS: dict[str, _Spec] = {
    "kernel_modules": _Spec("kernel_modules", _parse_modules),
}


def annotation_enabled(short_name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, short_name) for p in patterns)


def apply_annotations(cfg: RuntimeConfig, annotations: Mapping[str, str]) -> RuntimeConfig:
    """A new config with the pod's annotations applied; raises ConfigError (one line) on the first
    disabled, disallowed or invalid one. ``cfg`` is not changed."""
    hv_changes: dict[str, Any] = {}
    rt_changes: dict[str, Any] = {}
    agent_changes: dict[str, Any] = {}
    hv = cfg.hypervisor
    # Sorted so the error for several bad annotations does not depend on dict order.
    for key in sorted(annotations):
        value = annotations[key]
        if key.startswith(HYPERVISOR_PREFIX):
            short = key[len(HYPERVISOR_PREFIX) :]
            if not annotation_enabled(short, hv.enable_annotations):
                raise ConfigError(f"annotation {key} is not enabled")
            spec = HYPERVISOR_ANNOTATIONS.get(short)
            if spec is None:
                continue
            parsed = _parse(key, spec, value)
            if spec.allow_list is not None and not path_allowed(parsed, getattr(hv, spec.allow_list)):
                raise ConfigError(f"annotation {key}: {parsed} is not in {spec.allow_list}")
            if spec.asset:
                parsed = _guest_asset(key, spec.field, parsed, hv)
            if spec.append:
                parsed = " ".join(p for p in (hv.kernel_params, parsed) if p)
            hv_changes[spec.field] = parsed
        elif key.startswith(RUNTIME_PREFIX):
            _collect(key, key[len(RUNTIME_PREFIX) :], value, RUNTIME_ANNOTATIONS, rt_changes)
        elif key.startswith(AGENT_PREFIX):
            _collect(key, key[len(AGENT_PREFIX) :], value, AGENT_ANNOTATIONS, agent_changes)

    # The guest boots from an image or an initrd, never both: naming one per pod replaces the other.
    for chosen, other in (("initrd", "image"), ("image", "initrd")):
        if chosen in hv_changes and other not in hv_changes:
            hv_changes[other] = ""
    new_hv: HypervisorConfig = dataclasses.replace(hv, **hv_changes)
    new_rt: RuntimeSection = dataclasses.replace(cfg.runtime, **rt_changes)
    new_agent: AgentConfig = dataclasses.replace(cfg.agent, **agent_changes)
    _check(hypervisor_problems(new_hv), HYPERVISOR_PREFIX, HYPERVISOR_ANNOTATIONS, hv_changes)
    _check(runtime_problems(new_rt), RUNTIME_PREFIX, RUNTIME_ANNOTATIONS, rt_changes)
    _check(agent_problems(new_agent), AGENT_PREFIX, AGENT_ANNOTATIONS, agent_changes)
    return dataclasses.replace(cfg, hypervisor=new_hv, runtime=new_rt, agent=new_agent)


def _guest_asset(key: str, field: str, path: str, hv: HypervisorConfig) -> str:
    """``path``, when it is (symlinks followed) a regular file directly in a directory that holds one
    of the configured guest assets, or that one of them links into (kata.osbuilder's
    /usr/share/kata-containers by default). A path to the file the configuration names for ``field``
    gives the configured path (the pod keeps the VM shape, template and pool of the others); any
    other is given resolved, so that QEMU opens what was checked."""
    configured = [v for v in (hv.kernel, hv.image, hv.initrd, hv.firmware) if v]
    real = os.path.realpath(path)
    homes = {os.path.realpath(os.path.dirname(v)) for v in configured}
    homes |= {os.path.dirname(os.path.realpath(v)) for v in configured}
    homes.discard("/")
    try:
        regular = stat.S_ISREG(os.stat(real).st_mode)
    except OSError:
        regular = False
    if not regular or os.path.dirname(real) not in homes:
        where = ", ".join(sorted(homes)) or "no directory (no asset is configured)"
        raise ConfigError(f"annotation {key}: {path} is not a guest asset (a regular file in {where})")
    ours = getattr(hv, field)
    return ours if ours and os.path.realpath(ours) == real else real


def _parse(key: str, spec: _Spec, value: str) -> Any:
    try:
        return spec.parse(value)
    except ValueError as e:
        raise ConfigError(f"annotation {key}: {e}") from None


def _collect(key: str, short: str, value: str, table: dict[str, _Spec], changes: dict[str, Any]) -> None:
    spec = table.get(short)
    if spec is not None:
        changes[spec.field] = _parse(key, spec, value)


def _check(
    problems: list[tuple[str, str]], prefix: str, table: dict[str, _Spec], changes: dict[str, Any]
) -> None:
    """Report only problems caused by an annotation: the file itself was validated when loaded."""
    by_field = {spec.field: short for short, spec in table.items()}
    for field, reason in problems:
        if field in changes and field in by_field:
            raise ConfigError(f"annotation {prefix}{by_field[field]}: {reason}")
    if problems and changes:
        # A combination of annotated and configured values is invalid; name the key it shows on.
        field, reason = problems[0]
        raise ConfigError(f"annotations: {field}: {reason}")
