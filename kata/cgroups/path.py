"""A spec's ``linux.cgroupsPath`` as a path below a cgroup hierarchy's root, or a one-line refusal.

The caller (containerd, Docker, podman) names the cgroup in one of two notations:

- cgroupfs: ``/kubepods/burstable/pod<uid>/<id>``, ``/docker/<id>`` (a relative path is taken from the
  hierarchy's root too: no legitimate caller depends on our own cgroup's place);
- systemd: ``slice:prefix:name``, e.g. ``kubepods-burstable-pod<uid>.slice:cri-containerd:<id>``. This
  host has no systemd to ask for a scope, so the notation is mapped onto the directories systemd would
  make, as runc's systemd driver names them: the slice expanded at its dashes
  (``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice``), then the unit
  ``prefix-name.scope`` (a name that is itself a slice stays as it is).

An empty path asks for nothing: the pod's processes stay in their caller's cgroups (the runtime-spec
leaves the place to the runtime; a caller that cares, as containerd, Docker and podman do, names one).

Every component is checked before anything is made: no ``.``/``..``, no empty or overlong name, no
control characters, no name of a cgroup interface file, and not the root itself; the walk that uses
the result (kata.cgroups.host) then refuses symlinks and other filesystems on its own.
"""

from __future__ import annotations

from kata.errors import KataError
from kata.utils.ids import shown

# Where the processes of the pod that are not the vCPUs go with sandbox_cgroup_only = false (Kata's).
OVERHEAD_PARENT = "kata_overhead"
_NAME_MAX = 255  # bytes, a directory name on cgroupfs as anywhere
_PATH_MAX = 4096
# Names the kernel gives interface files (cgroup.procs, tasks, ...): never a directory of ours.
_RESERVED_PREFIXES = ("cgroup.",)
_RESERVED = frozenset({"tasks", "notify_on_release", "release_agent"})


class CgroupPathError(KataError):
    """cgroupsPath names no cgroup we may make or join."""


def sandbox_cgroup(cgroups_path: str) -> str:
    """The sandbox's cgroup below every hierarchy's root ("a/b/c", no leading slash); "" for none."""
    if not cgroups_path:
        return ""
    if _is_systemd(cgroups_path):
        parts = _systemd_parts(cgroups_path)
    else:
        parts = [p for p in cgroups_path.split("/") if p]
    _check(cgroups_path, parts)
    if parts[0] == OVERHEAD_PARENT:
        raise CgroupPathError(f"cgroupsPath {shown(cgroups_path)}: {OVERHEAD_PARENT} is the runtime's own")
    return "/".join(parts)


def overhead_cgroup(sandbox_id: str) -> str:
    return f"{OVERHEAD_PARENT}/{sandbox_id}"


def _is_systemd(value: str) -> bool:
    """runc tells the notations apart by a flag; a caller that gives three colon-separated fields
    and no slash means systemd's (containerd with SystemdCgroup, Kata's test)."""
    return "/" not in value and value.count(":") == 2


def _systemd_parts(value: str) -> list[str]:
    slice_name, prefix, name = value.split(":")
    # runc's default slice when none is given.
    parts = _expand_slice(slice_name or "system.slice", value)
    if not name:
        raise CgroupPathError(f"cgroupsPath {shown(value)}: the systemd notation needs a unit name")
    parts.append(name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
    return parts


def _expand_slice(slice_name: str, whole: str) -> list[str]:
    """``a-b-c.slice`` -> [a.slice, a-b.slice, a-b-c.slice]; ``-.slice`` is the root slice."""
    if not slice_name.endswith(".slice"):
        raise CgroupPathError(f"cgroupsPath {shown(whole)}: {shown(slice_name)} is not a slice (.slice)")
    stem = slice_name.removesuffix(".slice")
    if stem == "-":
        return []
    words = stem.split("-")
    if not stem or any(not w for w in words):
        raise CgroupPathError(f"cgroupsPath {shown(whole)}: {shown(slice_name)} is not a valid slice name")
    return ["-".join(words[:i]) + ".slice" for i in range(1, len(words) + 1)]


def _check(whole: str, parts: list[str]) -> None:
    what = f"cgroupsPath {shown(whole)}"
    if not parts:
        raise CgroupPathError(f"{what}: names the root cgroup, which a container may not take over")
    if len(whole.encode()) > _PATH_MAX:
        raise CgroupPathError(f"{what}: longer than {_PATH_MAX} bytes")
    for part in parts:
        if part in (".", ".."):
            raise CgroupPathError(f"{what}: {part!r} would leave the path it names")
        if len(part.encode()) > _NAME_MAX:
            raise CgroupPathError(f"{what}: a component is longer than {_NAME_MAX} bytes")
        if any(c < " " or c == "\x7f" for c in part):
            raise CgroupPathError(f"{what}: control characters in a component")
        if part in _RESERVED or part.startswith(_RESERVED_PREFIXES):
            raise CgroupPathError(f"{what}: {shown(part)} names a cgroup interface file")
