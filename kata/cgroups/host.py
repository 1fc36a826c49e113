"""The host's cgroups, behind one narrow interface with a cgroup v1 and a cgroup v2 implementation:
make a cgroup below every hierarchy's root, move processes (or, on v1, single threads) into it, write
its CPU and memory limits, and remove what was made, moving out what is slow to leave.

Paths are relative ("kubepods/pod1/ID", see kata.cgroups.path). Every walk starts from an fd of a
hierarchy's root, which is checked to be that cgroup mount's root (its mount id, from mountinfo), and
goes component by component with openat2 refusing symlinks, ".." and other mounts: nothing a caller
names can reach a file outside the cgroup mount.
"""

from __future__ import annotations

import abc
import errno
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from kata.errors import KataError
from kata.utils.mount import fs_type, unescape_mountinfo
from kata.utils.mountapi import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    RESOLVE_NO_XDEV,
    openat2,
)
from kata.utils.safepath import mount_id

CGROUP_ROOT = "/sys/fs/cgroup"
Layout = Literal["v2", "hybrid", "v1", "none"]
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
# v1 hierarchies a pod's processes join: accounting and limits. Not devices (a rule there could cut
# QEMU off /dev/kvm or /dev/net/tun), not freezer (the VM pauses through its agent), not name=systemd.
V1_CONTROLLERS = frozenset({"cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "hugetlb"})
# v2 controllers enabled down to the pod's cgroup, where the host offers them.
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io")
_MAX_SHARES = 262144


class CgroupError(KataError):
    """A cgroup could not be made, joined, limited or removed; one line."""


@dataclass(frozen=True)
class Limits:
    """What a cgroup is held to; None: no limit (memory, quota) or left as it is (the rest)."""

    memory: int | None = None  # bytes
    cpu_shares: int | None = None
    cpu_quota: int | None = None  # microseconds per period
    cpu_period: int | None = None  # microseconds
    cpus: str | None = None
    mems: str | None = None


def layout(mountinfo: bytes | None = None) -> Layout:
    """v2: cgroup2 on /sys/fs/cgroup; hybrid: v1 controllers there plus cgroup2 at unified/."""
    top = fs_type(CGROUP_ROOT, mountinfo)
    if top == "cgroup2":
        return "v2"
    if top == "tmpfs":
        return "hybrid" if fs_type(f"{CGROUP_ROOT}/unified", mountinfo) == "cgroup2" else "v1"
    return "none"


@dataclass(frozen=True)
class Hierarchy:
    """One mounted hierarchy: its name (v1: its controllers, "cpu,cpuacct"; v2: "unified"), its root,
    and the mount id that root must have (0: not checked, a test's directory)."""

    name: str
    root: str
    mount_id: int = 0


def _v1_hierarchies(mountinfo: bytes) -> list[Hierarchy]:
    found = []
    for line in mountinfo.split(b"\n"):
        fields = line.split(b" ")
        if b"-" not in fields or len(fields) < 7:
            continue
        sep = fields.index(b"-")
        if fields[sep + 1] != b"cgroup" or len(fields) < sep + 4:
            continue
        point = os.fsdecode(unescape_mountinfo(fields[4]))
        controllers = sorted(o for o in os.fsdecode(fields[sep + 3]).split(",") if o in V1_CONTROLLERS)
        if controllers and os.path.dirname(point) == CGROUP_ROOT:
            found.append(Hierarchy(",".join(controllers), point, int(fields[0])))
    return found


def _mount_id_of(point: str, mountinfo: bytes) -> int:
    found = 0
    for line in mountinfo.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 4 and os.fsdecode(unescape_mountinfo(fields[4])) == point:
            found = int(fields[0])  # the last mount on the point is the one seen
    return found


def host_cgroups(mountinfo: bytes | None = None) -> HostCgroups:
    """The implementation for this host's layout (hybrid hosts keep their controllers on v1)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo", "rb") as f:
            mountinfo = f.read()
    kind = layout(mountinfo)
    if kind == "v2":
        return CgroupsV2(Hierarchy("unified", CGROUP_ROOT, _mount_id_of(CGROUP_ROOT, mountinfo)))
    if kind == "none":
        raise CgroupError(f"no cgroup filesystem at {CGROUP_ROOT}")
    hierarchies = _v1_hierarchies(mountinfo)
    if not hierarchies:
        raise CgroupError(f"no cgroup v1 controller is mounted below {CGROUP_ROOT}")
    return CgroupsV1(hierarchies)


class HostCgroups(abc.ABC):
    """Cgroups below the roots of one layout's hierarchies."""

    version: int

    def __init__(self, hierarchies: Iterable[Hierarchy]) -> None:
        self.hierarchies = {h.name: h for h in hierarchies}

    # ---- the interface ----------------------------------------------------------------------------
    def make(self, rel: str) -> dict[str, list[str]]:
        """``rel`` in every hierarchy, with what is missing above it; returns, per hierarchy, the
        paths this call made (shallowest first): remove() takes back only those."""
        made: dict[str, list[str]] = {}
        try:
            for h in self.hierarchies.values():
                self._make_in(h, rel, made.setdefault(h.name, []))
        except BaseException:
            self.remove(made, timeout=0.0)
            raise
        return made

    def lacking(self, rel: str) -> list[str]:
        """The hierarchies where ``rel`` does not exist (yet)."""
        return [name for name in self.hierarchies if not os.path.isdir(self.path(name, rel))]

    def join(self, rel: str, pid: int) -> None:
        """Move the whole process ``pid`` (all its threads) into ``rel``."""
        for h in self.hierarchies.values():
            self._write(h, rel, "cgroup.procs", str(pid))

    @abc.abstractmethod
    def join_threads(self, rel: str, tids: Iterable[int]) -> None:
        """Move single threads of a process into ``rel``, leaving their process where it is."""

    @abc.abstractmethod
    def set_limits(self, rel: str, limits: Limits) -> None: ...

    def processes(self, rel: str) -> set[int]:
        """The processes with a thread in ``rel`` in any hierarchy (none when it does not exist)."""
        found: set[int] = set()
        for h in self.hierarchies.values():
            found |= set(self._ids(h, rel, "cgroup.procs"))
        return found

    def cgroups_of(self, pid: int) -> dict[str, str]:
        """Where ``pid`` is now, per hierarchy (relative paths, "" for the root), from /proc."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return {}
        found = {}
        for line in lines:
            _, controllers, path = line.split(":", 2)
            name = self._name_in_proc(controllers)
            if name in self.hierarchies:
                found[name] = path.strip("/")
        return found

    def move_back(self, pid: int, where: dict[str, str]) -> None:
        """Put ``pid`` back where cgroups_of() found it (best effort: a cgroup gone since stays gone)."""
        for name, rel in where.items():
            h = self.hierarchies.get(name)
            if h is None:
                continue
            try:
                self._write(h, rel, "cgroup.procs", str(pid))
            except CgroupError:
                self._write(h, "", "cgroup.procs", str(pid))

    def remove(self, made: dict[str, list[str]], timeout: float = 5.0) -> list[str]:
        """Remove what make() made, deepest first. Processes on their way out get half of
        ``timeout`` to leave; what is still there then (stragglers) moves to the nearest cgroup above
        that we did not make, and removal is retried until ``timeout``. Returns the failures (a
        cgroup that is gone is none)."""
        deadline = time.monotonic() + timeout
        targets = [(h, rel, _refuge(rel, paths)) for name, paths in made.items()
                   if (h := self.hierarchies.get(name)) is not None
                   for rel in sorted(paths, key=lambda p: p.count("/"), reverse=True)]
        pause = 0.005  # doubled up to 50 ms: what is left is mostly gone within milliseconds (a
        # virtiofsd's sandboxed child, ended by its parent's death), on every container's delete path
        while any(self._ids(h, rel, self._threads_file) for h, rel, _ in targets):
            if time.monotonic() >= deadline - timeout / 2:
                for h, rel, refuge in targets:
                    self._evacuate(h, rel, refuge)
                break
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        problems = []
        for h, rel, _ in targets:
            problem = self._remove_one(h, rel, deadline)
            if problem:
                problems.append(problem)
        return problems

    def remove_if_empty(self, rel: str) -> None:
        """Remove ``rel`` where nothing lives in it any more (a parent several pods share)."""
        for h in self.hierarchies.values():
            try:
                self._rmdir(h, rel)
            except OSError:
                pass

    def path(self, name: str, rel: str) -> str:
        """Where ``rel`` is in hierarchy ``name`` (for messages and tests)."""
        root = self.hierarchies[name].root
        return f"{root}/{rel}" if rel else root

    # ---- implementation ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _name_in_proc(self, controllers: str) -> str: ...

    def _ready_child(self, h: Hierarchy, parent_fd: int, name: str) -> None:  # noqa: B027
        """What a cgroup on the way down needs before a process may join it (or one below it): called
        for each, new or not, since one another pod just made may not be ready yet."""

    def _before_child(self, h: Hierarchy, dir_fd: int, rel: str) -> None:  # noqa: B027
        """What a cgroup needs before its children can be limited."""

    @contextmanager
    def _root(self, h: Hierarchy) -> Iterator[int]:
        try:
            fd = os.open(h.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"cgroup hierarchy {h.root}: {exc.strerror}") from None
        try:
            if h.mount_id and mount_id(fd) != h.mount_id:
                raise CgroupError(f"{h.root} is not the root of its cgroup mount")
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _dir(self, h: Hierarchy, rel: str) -> Iterator[int]:
        with self._root(h) as root:
            if not rel:
                yield root
                return
            try:
                fd = openat2(root, rel, os.O_RDONLY | os.O_DIRECTORY, _RESOLVE)
            except OSError as exc:
                raise CgroupError(f"cgroup {self.path(h.name, rel)}: {os.strerror(exc.errno or 0)}") from None
            try:
                yield fd
            finally:
                os.close(fd)

    def _make_in(self, h: Hierarchy, rel: str, made: list[str]) -> None:
        # A parent that pods share can vanish under us (its last pod removed it): walk again.
        for attempt in range(3):
            try:
                self._walk_making(h, rel, made)
                return
            except FileNotFoundError:
                if attempt == 2:
                    where = self.path(h.name, rel)
                    raise CgroupError(f"cgroup {where}: its parent keeps vanishing") from None

    def _walk_making(self, h: Hierarchy, rel: str, made: list[str]) -> None:
        parts = rel.split("/")
        with self._root(h) as root:
            fd = os.dup(root)
            try:
                for i, name in enumerate(parts):
                    sub = "/".join(parts[: i + 1])
                    self._before_child(h, fd, "/".join(parts[:i]))
                    try:
                        try:
                            os.mkdir(name, 0o755, dir_fd=fd)
                            made.append(sub)
                        except FileExistsError:
                            pass
                        self._ready_child(h, fd, name)
                    except FileNotFoundError:
                        raise
                    except OSError as exc:
                        raise CgroupError(f"cgroup {self.path(h.name, sub)}: {exc.strerror}") from None
                    try:
                        child = openat2(fd, name, os.O_RDONLY | os.O_DIRECTORY, _RESOLVE)
                    except OSError as exc:
                        if exc.errno == errno.ENOENT:
                            raise FileNotFoundError(sub) from None
                        raise CgroupError(f"cgroup {self.path(h.name, sub)}: "
                                          f"{os.strerror(exc.errno or 0)}") from None
                    os.close(fd)
                    fd = child
            finally:
                os.close(fd)

    def _write(self, h: Hierarchy, rel: str, file: str, value: str) -> None:
        with self._dir(h, rel) as d:
            _write_at(d, file, value, self.path(h.name, rel))

    def _read(self, h: Hierarchy, rel: str, file: str) -> str:
        with self._dir(h, rel) as d:
            return _read_at(d, file, self.path(h.name, rel))

    def _ids(self, h: Hierarchy, rel: str, file: str) -> list[int]:
        try:
            return [int(x) for x in self._read(h, rel, file).split()]
        except CgroupError:
            return []

    def _rmdir(self, h: Hierarchy, rel: str) -> None:
        parent, _, name = rel.rpartition("/")
        with self._dir(h, parent) as d:
            os.rmdir(name, dir_fd=d)

    def _remove_one(self, h: Hierarchy, rel: str, deadline: float) -> str | None:
        while True:
            try:
                self._rmdir(h, rel)
                return None
            except (FileNotFoundError, CgroupError):
                return None  # gone already (a CgroupError: its parent is)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return f"cgroup {self.path(h.name, rel)}: {exc.strerror}"
                if time.monotonic() >= deadline:
                    return f"cgroup {self.path(h.name, rel)}: still busy"
                time.sleep(0.05)

    def _evacuate(self, h: Hierarchy, rel: str, refuge: str) -> None:
        """What is still in ``rel`` (stragglers of a pod going away) moves to ``refuge``."""
        for tid in self._ids(h, rel, self._threads_file):
            for where in (refuge, ""):  # the root takes anyone, should the refuge refuse
                try:
                    self._write(h, where, self._threads_file, str(tid))
                    break
                except CgroupError:
                    continue

    _threads_file = "tasks"


def _refuge(rel: str, made: list[str]) -> str:
    """The nearest cgroup above ``rel`` that was there before us."""
    parent = rel.rpartition("/")[0]
    while parent and parent in made:
        parent = parent.rpartition("/")[0]
    return parent


def _write_at(dir_fd: int, file: str, value: str, where: str) -> None:
    try:
        fd = openat2(dir_fd, file, os.O_WRONLY | os.O_TRUNC, _RESOLVE)
    except OSError as exc:
        raise CgroupError(f"cgroup {where}: {file}: {os.strerror(exc.errno or 0)}") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"cgroup {where}: writing {value} to {file}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _read_at(dir_fd: int, file: str, where: str) -> str:
    try:
        fd = openat2(dir_fd, file, os.O_RDONLY, _RESOLVE)
    except OSError as exc:
        raise CgroupError(f"cgroup {where}: {file}: {os.strerror(exc.errno or 0)}") from None
    try:
        return os.read(fd, 1 << 20).decode(errors="replace")
    finally:
        os.close(fd)


def _exists_at(dir_fd: int, file: str) -> bool:
    try:
        os.close(openat2(dir_fd, file, os.O_PATH, _RESOLVE))
        return True
    except OSError:
        return False


class CgroupsV1(HostCgroups):
    """cgroup v1: one hierarchy per controller (or a few co-mounted), each its own tree."""

    version = 1

    def _name_in_proc(self, controllers: str) -> str:
        return ",".join(sorted(c for c in controllers.split(",") if c in V1_CONTROLLERS))

    def join_threads(self, rel: str, tids: Iterable[int]) -> None:
        for h in self.hierarchies.values():
            for tid in tids:
                self._write(h, rel, "tasks", str(tid))

    def _ready_child(self, h: Hierarchy, parent_fd: int, name: str) -> None:
        # A new cpuset starts with no CPUs and no memory nodes (unless clone_children is set), and
        # nothing may join it so: it gets its parent's. Also one that exists already: another pod's
        # create may have made it an instant ago (the shared kata_overhead) and not filled it yet,
        # and a child filled from it would stay empty (joining it fails with ENOSPC).
        if "cpuset" not in h.name.split(","):
            return
        child = openat2(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY, _RESOLVE)
        try:
            for file in ("cpuset.cpus", "cpuset.mems"):
                if not _read_at(child, file, name).strip():
                    _write_at(child, file, _read_at(parent_fd, file, "parent").strip() or "\n", name)
        finally:
            os.close(child)

    def set_limits(self, rel: str, limits: Limits) -> None:
        for h in self.hierarchies.values():
            controllers = h.name.split(",")
            if "memory" in controllers:
                self._write(h, rel, "memory.limit_in_bytes", str(limits.memory or -1))
            if "cpu" in controllers:
                if limits.cpu_shares is not None:
                    self._write(h, rel, "cpu.shares", str(limits.cpu_shares))
                if limits.cpu_period is not None:
                    self._write(h, rel, "cpu.cfs_period_us", str(limits.cpu_period))
                self._write(h, rel, "cpu.cfs_quota_us", str(limits.cpu_quota or -1))
            if "cpuset" in controllers:
                if limits.cpus:
                    self._write(h, rel, "cpuset.cpus", limits.cpus)
                if limits.mems:
                    self._write(h, rel, "cpuset.mems", limits.mems)


class CgroupsV2(HostCgroups):
    """cgroup v2: one tree; controllers are enabled from the root down to the pod's parent. A
    process's threads all live in one domain there: single threads cannot join another cgroup."""

    version = 2
    _threads_file = "cgroup.procs"

    def __init__(self, hierarchy: Hierarchy) -> None:
        super().__init__([hierarchy])

    def _name_in_proc(self, controllers: str) -> str:
        return "unified" if controllers == "" else ""

    def join_threads(self, rel: str, tids: Iterable[int]) -> None:
        raise CgroupError("cgroup v2 keeps all of a process's threads in one cgroup: single threads "
                          "cannot join the sandbox's")

    def _before_child(self, h: Hierarchy, dir_fd: int, rel: str) -> None:
        where = self.path(h.name, rel)
        available = _read_at(dir_fd, "cgroup.controllers", where).split()
        enabled = _read_at(dir_fd, "cgroup.subtree_control", where).split()
        wanted = [c for c in V2_CONTROLLERS if c in available and c not in enabled]
        if wanted:
            _write_at(dir_fd, "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted), where)

    def set_limits(self, rel: str, limits: Limits) -> None:
        h = self.hierarchies["unified"]
        with self._dir(h, rel) as d:
            where = self.path(h.name, rel)

            def put(file: str, value: str, wanted: bool = True) -> None:
                if not _exists_at(d, file):
                    if wanted:
                        raise CgroupError(f"cgroup {where}: no {file} (its controller is not enabled)")
                    return
                _write_at(d, file, value, where)

            put("memory.max", str(limits.memory) if limits.memory else "max", limits.memory is not None)
            if limits.cpu_shares is not None:
                put("cpu.weight", str(shares_to_weight(limits.cpu_shares)))
            period = limits.cpu_period or 100000
            put("cpu.max", f"{limits.cpu_quota or 'max'} {period}", limits.cpu_quota is not None)
            if limits.cpus:
                put("cpuset.cpus", limits.cpus)
            if limits.mems:
                put("cpuset.mems", limits.mems)


def shares_to_weight(shares: int) -> int:
    """cgroup v1's cpu.shares [2, 262144] as v2's cpu.weight [1, 10000], as runc and crun map them."""
    shares = min(max(shares, 2), _MAX_SHARES)
    return 1 + ((shares - 2) * 9999) // (_MAX_SHARES - 2)
