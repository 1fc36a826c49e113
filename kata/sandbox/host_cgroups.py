"""A pod's host cgroups, as Kata places them (``[runtime] sandbox_cgroup_only``).

The container manager names the pod's cgroup in the sandbox's ``linux.cgroupsPath`` (the kubelet's
pod cgroup holds it; Docker's is ``/docker/<id>``). There the VM's processes go, so that the pod's
limits and the kubelet's accounting cover them:

- ``sandbox_cgroup_only = true``: everything of the pod on the host (QEMU, virtiofsd, the shim or the
  monitors) lives in the sandbox cgroup, whose memory limit is the pod's plus the VM's overhead (the
  VM's base memory and its host processes' own), so that the host never kills QEMU for memory the
  guest was given;
- ``false`` (the default): only QEMU's vCPU threads run in the sandbox cgroup, held to the pod's
  figures exactly; the rest lives in ``kata_overhead/<sandbox id>``, unlimited. On cgroup v1 memory is
  charged to a process's own cgroup (its leader's), so the vCPUs' place costs no memory there. cgroup
  v2 cannot split a process's threads between two cgroups of different domains: there the whole pod
  goes into the sandbox cgroup, as with ``true`` (where Kata's own runtime ends up too).

The cgroups' figures follow the pod's total: the sum of its containers' limits (or the pod's own,
when the CRI passes them on the sandbox), kept current as containers come, go and are updated. What we
made is removed with the pod; a cgroup that was there before us (the kubelet's) stays.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kata.cgroups.host import CgroupError, HostCgroups, Limits, host_cgroups, layout
from kata.cgroups.path import OVERHEAD_PARENT, overhead_cgroup, sandbox_cgroup

if TYPE_CHECKING:
    from kata.config import RuntimeConfig
    from kata.oci.spec import Resources

log = logging.getLogger("kata.sandbox")

MiB = 1 << 20
# The host processes' own memory beside the guest's RAM, for sandbox_cgroup_only: QEMU's (TCG's
# translation cache included), virtiofsd's and the shim's (or the monitors'). About 60 MB measured
# on an idle pod (README: shim 21, virtiofsd 4, QEMU 30-40 beyond the guest's pages); doubled, as the
# shim's grows with its tasks and QEMU's with its devices.
HOST_PROCESSES_MIB = 128
_DEFAULT_PERIOD = 100_000
_MAX_CPU = 8191  # Linux's NR_CPUS at most


@dataclass
class CgroupRecord:
    """Where a pod's processes live on the host (kept in its pod.json)."""

    sandbox: str  # the spec's cgroupsPath, relative to every hierarchy's root
    overhead: str  # kata_overhead/<id> when only the vCPUs go to the sandbox cgroup, else ""
    made: dict[str, list[str]] = field(default_factory=dict)  # per hierarchy, what we made
    overhead_mib: int = 0  # what the memory limit adds to the pod's when everything lives there

    @property
    def home(self) -> str:
        """Where whole processes of the pod go."""
        return self.overhead or self.sandbox


def check(spec: Mapping[str, Any]) -> str:
    """The sandbox cgroup ``spec`` asks for ("" for none): a bad cgroupsPath fails here, in one
    line, before anything is made."""
    linux = spec.get("linux") or {}
    value = linux.get("cgroupsPath") or ""
    if not isinstance(value, str):
        from kata.cgroups.path import CgroupPathError

        raise CgroupPathError("linux.cgroupsPath must be a string")
    return sandbox_cgroup(value)


class PodCgroups:
    """A pod's cgroups on this host, and this process's place before it joined them."""

    def __init__(self, record: CgroupRecord, driver: HostCgroups) -> None:
        self.record = record
        self.driver = driver
        self._origin: dict[str, str] | None = None  # where this process was before join_self()

    @classmethod
    def plan(cls, sid: str, spec: Mapping[str, Any], cfg: RuntimeConfig) -> PodCgroups | None:
        """The pod's cgroups, not made yet; None when the spec names none (or the host has no
        cgroups). Their ``made`` names the pod's own cgroups (the leaves) that do not exist yet: a
        record written now lets a teardown remove them should this process die while make() runs."""
        sandbox = check(spec)
        if not sandbox or layout() == "none":
            return None
        driver = host_cgroups()
        split = not cfg.runtime.sandbox_cgroup_only
        if split and driver.version == 2:
            log.info(f"sandbox {sid}: cgroup v2 cannot hold the vCPU threads apart from QEMU: the pod "
                     f"lives whole in {sandbox}, as with sandbox_cgroup_only")
            split = False
        overhead_mib = 0 if split else cfg.hypervisor.default_memory + HOST_PROCESSES_MIB
        record = CgroupRecord(sandbox=sandbox, overhead=overhead_cgroup(sid) if split else "",
                              overhead_mib=overhead_mib)
        for rel in filter(None, (record.sandbox, record.overhead)):
            for name in driver.lacking(rel):
                record.made.setdefault(name, []).append(rel)
        return cls(record, driver)

    def make(self) -> None:
        """Make the planned cgroups (with what is missing above them); ``made`` then says exactly
        what was made. On failure, what was made is removed."""
        record = self.record
        record.made = {}
        try:
            for rel in filter(None, (record.sandbox, record.overhead)):
                for name, paths in self.driver.make(rel).items():
                    record.made.setdefault(name, []).extend(paths)
        except BaseException:
            self.remove()
            raise

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> PodCgroups | None:
        """The cgroups a pod record names, for another process (None: the pod has none)."""
        if not data:
            return None
        record = CgroupRecord(**data)
        try:
            return cls(record, host_cgroups())
        except CgroupError as exc:
            log.warning(f"cgroups of the pod: {exc}")
            return None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.record)

    def join_self(self, others: Iterable[int] = ()) -> None:
        """This process (whose children, the VMM and virtiofsd, are born there) and ``others`` go to
        the pod's home cgroup."""
        import os

        if self._origin is None:
            self._origin = self.driver.cgroups_of(os.getpid())
        for pid in (os.getpid(), *others):
            self.driver.join(self.record.home, pid)

    def join(self, pid: int) -> None:
        self.driver.join(self.record.home, pid)

    def place_vcpus(self, tids: Iterable[int]) -> None:
        """With the overhead apart, the vCPU threads alone go to the sandbox cgroup."""
        if self.record.overhead:
            self.driver.join_threads(self.record.sandbox, list(tids))

    def apply(self, limits: Limits) -> None:
        """The pod's figures on its sandbox cgroup (plus the overhead when everything lives there)."""
        if self.record.overhead_mib and limits.memory is not None:
            limits = dataclasses.replace(limits, memory=limits.memory + self.record.overhead_mib * MiB)
        self.driver.set_limits(self.record.sandbox, limits)

    def remove(self) -> list[str]:
        """This process back where it came from (it cannot stay in a cgroup it removes), then every
        cgroup we made; the runtime's shared parent goes when it is empty. Returns the failures."""
        import os

        if self._origin is not None:
            self.driver.move_back(os.getpid(), self._origin)
            self._origin = None
        problems = self.driver.remove(self.record.made)
        self.record.made = {}
        if self.record.overhead:
            self.driver.remove_if_empty(OVERHEAD_PARENT)
        return problems


# ---- the pod's figures ------------------------------------------------------------------------
def figures(res: Resources) -> dict[str, Any]:
    """A container's limits as the pod record keeps them (what the host cgroup sums)."""
    return {"memory": res.memory_limit, "shares": res.cpu_shares, "quota": res.cpu_quota,
            "period": res.cpu_period, "cpus": res.cpuset_cpus, "mems": res.cpuset_mems}


def updated(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """An update's figures over the recorded ones: what it leaves out stays (runc's update)."""
    return {k: new[k] if new.get(k) is not None else old.get(k) for k in figures_keys()}


def figures_keys() -> tuple[str, ...]:
    return ("memory", "shares", "quota", "period", "cpus", "mems")


def pod_limits(containers: Iterable[Mapping[str, Any]], pod: Resources | None) -> Limits:
    """The pod's total: memory and CPU summed over its containers (those without a limit add
    nothing, as Kata sums them), CPU sets joined; the pod's own figures (the CRI's, on its sandbox)
    where it has them."""
    items = list(containers)
    memory = sum(c["memory"] for c in items if c.get("memory")) or None
    shares = sum(c["shares"] for c in items if c.get("shares")) or None
    with_quota = [c for c in items if c.get("quota")]
    quota = period = None
    if with_quota:
        period = with_quota[0].get("period") or _DEFAULT_PERIOD
        cpus = sum(c["quota"] / (c.get("period") or _DEFAULT_PERIOD) for c in with_quota)
        quota = math.ceil(cpus * period)
    if pod is not None:
        memory = pod.memory_limit or memory
        if pod.cpu_quota:
            quota, period = pod.cpu_quota, pod.cpu_period or _DEFAULT_PERIOD
    return Limits(memory=memory, cpu_shares=shares, cpu_quota=quota, cpu_period=period,
                  cpus=_join_sets(c.get("cpus") for c in items),
                  mems=_join_sets(c.get("mems") for c in items))


def _join_sets(values: Iterable[str | None]) -> str | None:
    """The union of CPU (or node) lists such as "0-2,5", in the kernel's form."""
    found: set[int] = set()
    for value in values:
        for part in (value or "").split(","):
            if not part:
                continue
            low, _, high = part.partition("-")
            try:
                first, last = int(low), int(high or low)
            except ValueError:
                raise CgroupError(f"cpuset {value!r} is not a list of numbers and ranges") from None
            if last > _MAX_CPU:
                raise CgroupError(f"cpuset {value}: no host has CPU or memory node {last}")
            found.update(range(first, last + 1))
    if not found:
        return None
    ordered = sorted(found)
    ranges = []
    start = prev = ordered[0]
    for n in ordered[1:] + [-1]:
        if n != prev + 1:
            ranges.append(f"{start}-{prev}" if prev != start else str(start))
            start = n
        prev = n
    return ",".join(ranges)


def join_pod(sid: str, pid: int) -> None:
    """``pid`` (a process a front end starts for the pod later: an exec's monitor) joins the pod's
    home cgroup, as its record names it; nothing else of the pod is loaded."""
    from kata.errors import KataError
    from kata.sandbox.paths import SandboxPaths
    from kata.utils.files import read_json

    try:
        data = read_json(SandboxPaths(sid).pod_record)
    except (OSError, ValueError) as exc:
        raise KataError(f"sandbox {sid}: unreadable record: {exc}") from None
    pod = PodCgroups.of(data.get("cgroups") or {})
    if pod is not None:
        pod.join(pid)
