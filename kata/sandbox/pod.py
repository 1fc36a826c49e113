"""The sandbox service: one pod's VM as both front ends drive it, the runc CLI (one container per
pod, each verb a process of its own) and containerd's shim (one process per pod).

A Pod is made from a bundle and a configuration: the configuration is read (with the bundle's
annotations, where allowed), host networking is refused, the network namespace is joined (or made,
and pinned where the front end asks), the request is checked before anything is booted, and the VM
comes up sized for it. Containers are added to it and removed from it, its VM grows for them from
their recorded limits (so a repeated resize changes nothing), its network is mirrored in, the OCI
hooks run, and the VM is watched and torn down. What a later process needs to find all of that again
(the configuration it was made with, the namespace, the mirrored interfaces, the limits) is recorded
with the sandbox's state, so every later command, `delete --force` and containerd's `shim delete`
included, acts with the same configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata.errors import KataError
from kata.sandbox.paths import SandboxPaths, has_state
from kata.sandbox.sandbox import Sandbox, claim_id
from kata.sandbox.timings import Timings
from kata.utils.files import read_json, write_json
from kata.utils.safepath import remove_tree

if TYPE_CHECKING:
    from kata.agent_client.client import AgentClient
    from kata.cgroups.host import Limits as CgroupLimits
    from kata.config import RuntimeConfig
    from kata.oci.spec import Bundle
    from kata.protocols.agent_api import AgentEndpoint
    from kata.sandbox.container import Container
    from kata.sandbox.host_cgroups import PodCgroups
    from kata.utils.process import ProcessId

log = logging.getLogger("kata.sandbox")

# Hooks a container's creation runs, in order, with its status "creating" (the runtime-spec's).
CREATE_HOOKS = ("prestart", "createRuntime", "createContainer")


class HostNetworkError(KataError):
    """Kata's documented limitation: a VM cannot share the host's network namespace."""

    def __init__(self) -> None:
        super().__init__("host networking is not supported: the container runs in a VM, which cannot "
                         "share the host's network namespace")


@dataclass
class Limits:
    """What a container's limits added to its VM (and what the next resize starts from)."""

    vcpus: int = 0
    memory_mib: int = 0


@dataclass
class PodRecord:
    """What a later process needs to act on the pod as the one that made it (kept with the sandbox)."""

    config: str  # the configuration.toml it was made with
    annotations: dict[str, str]  # those of its first container, which the configuration took
    netns: str = ""  # the network namespace the VMM lives in ("" for a new one nobody pinned)
    netns_pinned: bool = False  # made and pinned by us: teardown unpins it
    network: list[list[str]] = field(default_factory=list)  # [interface, tap] mirrored into the VM
    pooled_nic: dict[str, str] = field(default_factory=dict)  # a pooled VM's NIC 0 ({}: none), see mirror()
    sized_as_pod: bool = False  # the CRI sized the VM for the whole pod: containers add nothing
    limits: dict[str, Limits] = field(default_factory=dict)
    # The host cgroups (kata.sandbox.host_cgroups.CgroupRecord; {} for none), and the figures they sum:
    # each container's, and the pod's own when the CRI passed them on the sandbox.
    cgroups: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    pod_figures: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> PodRecord:
        data = read_json(path)
        limits = {cid: Limits(**v) for cid, v in (data.pop("limits", None) or {}).items()}
        return cls(**data, limits=limits)


def record_path(sid: str) -> Path:
    """Where a pod's record is kept (the runc path's init monitor reads which containers it has)."""
    return SandboxPaths(sid).pod_record


def load_pod_config(config_path: Path | None, annotations: Mapping[str, str]) -> RuntimeConfig:
    """The configuration a pod is made with: the file, then the annotations it allows."""
    from kata.config import apply_annotations, load_config

    return apply_annotations(load_config(config_path), annotations)


def check(cid: str, bundle: Bundle, cfg: RuntimeConfig | None) -> None:
    """What would fail container ``cid`` of ``bundle``, found before anything is made for it: what the
    guest cannot be given, a namespace path that names no namespace of its type, host networking, and
    (``cfg``: it is a pod's first) the VM's sizing."""
    from kata.sandbox import host_cgroups
    from kata.sandbox.container import check_container
    from kata.sandbox.sandbox import size_vm

    check_container(bundle, cid)
    _check_namespace_paths(bundle)
    if cfg is not None:
        if _host_network(bundle):
            raise HostNetworkError()
        size_vm(cfg, bundle.spec)
        host_cgroups.check(bundle.spec)


def _check_namespace_paths(bundle: Bundle) -> None:
    """Each path names a namespace of its entry's type, as setns(2) would insist for runc. Only the
    network one is joined (by the VMM); the guest makes its own of the others, ipc and uts joined
    by path standing for the pod's (kata.specconv), but a mistyped path is a broken spec all the same."""
    from kata.utils import nsfiles

    for ns in bundle.namespaces:
        if ns.path:
            nsfiles.identify(ns.type, ns.path)


def _host_network(bundle: Bundle) -> bool:
    """No network namespace, or the one we run in (Docker's --net=host names its own by path)."""
    from kata.utils import netns

    ns = next((n for n in bundle.namespaces if n.type == "network"), None)
    return ns is None or (ns.path is not None and netns.is_ours(ns.path))


def enter_network_namespace(bundle: Bundle, pin_at: Path | None) -> tuple[str, bool]:
    """Move into the pod's network namespace, where the VMM (and the runc path's monitor) live: the
    bundle's, or a new one, pinned at ``pin_at`` when given so that later commands find it after the
    processes in it are gone. Returns (its path, whether we pinned it); HostNetworkError for none."""
    from kata.utils import netns

    if _host_network(bundle):
        raise HostNetworkError()
    ns = next(n for n in bundle.namespaces if n.type == "network")
    if ns.path:
        netns.enter(ns.path)
        return ns.path, False
    netns.unshare()
    if pin_at is None:
        return "", False
    netns.pin(str(pin_at))
    return str(pin_at), True


def run_hooks(spec: dict[str, Any], kind: str, state: dict[str, Any], fatal: bool) -> None:
    """The spec's ``kind`` hooks, in its order, with ``state`` (the OCI state) on their stdin."""
    hooks = spec.get("hooks")
    if not isinstance(hooks, dict) or not hooks.get(kind):
        return
    from kata.oci.hooks import run_hooks as run

    run(spec, kind, state, fatal=fatal, log=log)


def hook_state(cid: str, status: str, pid: int, bundle: Path | str, annotations: dict[str, str]
               ) -> dict[str, Any]:
    """The OCI state a hook reads on stdin: ``pid`` is what stands for the container on the host."""
    from kata.oci.hooks import state_for_hooks

    return state_for_hooks(cid, status, str(bundle), pid=pid if status != "stopped" else 0,
                           annotations=annotations)


class Pod:
    """One pod's VM. Every mutating call holds the pod's lock."""

    def __init__(self, sandbox: Sandbox, record: PodRecord, cgroups: PodCgroups | None = None) -> None:
        self.sandbox = sandbox
        self.record = record
        self.cgroups = cgroups
        self.lock = threading.RLock()
        self._watch_stop = threading.Event()

    # ---- bring-up and finding again ----------------------------------------------------------
    @classmethod
    def create(cls, sid: str, bundle: Bundle, config_path: Path | None, *, pin_netns_at: Path | None = None,
               debug: bool = False, timings: Timings | None = None,
               entered: Callable[[], object] | None = None,
               members: Callable[[], list[int]] | None = None) -> Pod:
        """The pod's VM up, in its network namespace and its host cgroups, sized for ``bundle`` (the
        pod's first container, which add_container() then creates). ``entered`` runs once the
        namespace is joined, before the VM boots (what the front end starts there lives in it);
        ``members`` are the front end's processes that join the pod's cgroup with this one."""
        from kata.sandbox import host_cgroups
        from kata.specconv import pod_resources

        cfg = load_pod_config(config_path, bundle.annotations)
        check(sid, bundle, cfg)
        netns, pinned = enter_network_namespace(bundle, pin_netns_at)
        if entered is not None:
            entered()
        whole = pod_resources(bundle.spec)
        record = PodRecord(config=str(cfg.source), annotations=dict(bundle.annotations), netns=netns,
                           netns_pinned=pinned, sized_as_pod=whole is not None,
                           pod_figures=host_cgroups.figures(whole) if whole is not None else {})
        cgroups: host_cgroups.PodCgroups | None = None
        try:
            # The record goes first, so that whoever tears down a half-made pod (a shim killed
            # during create, then containerd's `shim delete`) does so with this configuration.
            paths = claim_id(sid)
            try:
                write_json(paths.pod_record, dataclasses.asdict(record))
            except BaseException:
                remove_tree(str(paths.state_dir))  # an id claimed with no record would be taken for good
                raise
            cgroups = host_cgroups.PodCgroups.plan(sid, bundle.spec, cfg)
            if cgroups is not None:
                # Recorded before they are made, then as made: a shim killed in between leaves a
                # record that names them, for containerd's `shim delete`.
                record.cgroups = cgroups.as_dict()
                write_json(paths.pod_record, dataclasses.asdict(record))
                cgroups.make()
                record.cgroups = cgroups.as_dict()
                write_json(paths.pod_record, dataclasses.asdict(record))
                # Held to the pod's figures before anything of it runs there.
                cgroups.apply(_pod_limits(record, {sid: _figures_of(bundle.spec)}))
            joined = cgroups
            before_launch = None if joined is None else (
                lambda: joined.join_self(members() if members is not None else ()))
            sandbox = Sandbox.create(sid, cfg, bundle.spec, debug=debug, timings=timings, claimed=True,
                                     before_launch=before_launch, netns=netns)
            pod = cls(sandbox, record, cgroups)
            pod._adopt_nic()
            pod._adopt_vmm()
            pod._place_vcpus()
        except BaseException:
            if cgroups is not None:
                for problem in cgroups.remove():
                    log.warning(f"sandbox {sid}: {problem}")
            if pinned:
                _unpin(netns)
            raise
        return pod

    @classmethod
    def attach(cls, sid: str, agent: AgentClient | None = None) -> Pod:
        """The pod another process made, with the configuration it was made with; ``agent`` is a
        connection to its agent when the caller has one (the runc path's, through the monitor)."""
        paths = SandboxPaths(sid)
        try:
            record = PodRecord.load(paths.pod_record)
        except FileNotFoundError:
            if paths.state_dir.exists():  # claimed, but the record never written (or from before records)
                raise KataError(f"sandbox {sid} has no record of how it was made") from None
            raise KataError(f"sandbox {sid} does not exist") from None
        except (OSError, ValueError, TypeError) as exc:
            raise KataError(f"sandbox {sid}: unreadable record: {exc}") from None
        cfg = load_pod_config(Path(record.config) if record.config else None, record.annotations)
        sandbox = Sandbox.attach(sid, cfg)
        sandbox.agent = agent
        from kata.sandbox.host_cgroups import PodCgroups

        return cls(sandbox, record, PodCgroups.of(record.cgroups))

    @staticmethod
    def exists(sid: str) -> bool:
        return has_state(sid)

    def _save(self) -> None:
        write_json(self.sandbox.paths.pod_record, dataclasses.asdict(self.record))

    @property
    def id(self) -> str:
        return self.sandbox.id

    @property
    def cfg(self) -> RuntimeConfig:
        return self.sandbox.cfg

    @property
    def pid(self) -> int:
        """What a container manager knows the pod's processes by: the VMM's pid (0 once gone)."""
        hyp = self.sandbox.hypervisor
        if hyp is None:
            return 0
        try:
            pids = hyp.pids()
        except KataError:
            return 0
        return pids[0] if pids else 0

    def agent(self) -> AgentClient:
        return self.sandbox.require_agent()

    # ---- containers ---------------------------------------------------------------------------
    def add_container(self, cid: str, bundle: Bundle) -> Container:
        """Create container ``cid`` in the VM. The pod's first container sized the VM; a later one
        adds its limits to it (by hotplug, where the machine has it) unless the pod was sized whole."""
        from kata.sandbox.container import Container
        from kata.specconv import container_growth

        with self.lock:
            first = not self.record.limits
            if not first:
                check(cid, bundle, None)
            vcpus, memory = container_growth(bundle.spec)
            if not first and not self.record.sized_as_pod:
                self._grow(vcpus, memory)
            try:
                container = Container(self.sandbox, cid, bundle)
                container.create()
            except BaseException:
                self._forget_shares(cid)
                raise
            self.record.limits[cid] = Limits(vcpus, memory)
            self.record.figures[cid] = _figures_of(bundle.spec)
            self._save()
            self._apply_limits()  # a failure here is the create's: the front end removes the container
            return container

    def remove_container(self, cid: str, container: Container | None = None) -> None:
        """Remove ``cid`` from the guest (when it still runs) and its shares from the host."""
        with self.lock:
            if container is not None and self.sandbox.agent is not None:
                try:
                    container.remove()
                except KataError as exc:  # the VM may be on its way out
                    log.warning(f"container {cid}: removing it in the guest: {exc}")
            self._forget_shares(cid)
            self.record.figures.pop(cid, None)
            if self.record.limits.pop(cid, None) is not None and self.exists(self.id):
                self._save()
                try:
                    self._apply_limits()
                except KataError as exc:  # memory the pod holds now may exceed its new total
                    log.warning(f"pod {self.id}: host cgroup after removing {cid}: {exc}")

    def _forget_shares(self, cid: str) -> None:
        try:
            self.sandbox.shared.remove(cid)
        except KataError as exc:
            log.warning(f"container {cid}: removing its shares: {exc}")

    def update(self, cid: str, resources: dict[str, Any]) -> None:
        """New limits for ``cid``: the VM grows by what they add over the recorded ones, then the
        guest applies them. The record keeps the most the VM grew to for ``cid`` (a VM does not
        shrink), so the same update twice, or a lower limit and then the old one, grows it once."""
        with self.lock:
            recorded = self.record.limits.get(cid, Limits())
            memory = _memory_mib(resources)
            if memory is not None and memory > recorded.memory_mib and not self.record.sized_as_pod:
                self._grow(0, memory - recorded.memory_mib)
                self.record.limits[cid] = dataclasses.replace(recorded, memory_mib=memory)
            self.agent().update_container(container_id=cid, resources_json=json.dumps(resources).encode())
            if cid in self.record.figures:
                from kata.sandbox.host_cgroups import updated

                self.record.figures[cid] = updated(self.record.figures[cid],
                                                   _figures_of({"linux": {"resources": resources}}))
            self._save()
            self._apply_limits()

    def _apply_limits(self) -> None:
        """The host cgroup follows the pod's total."""
        if self.cgroups is not None:
            self.cgroups.apply(_pod_limits(self.record, self.record.figures))

    def _adopt_nic(self) -> None:
        """Keep what the pod's network needs to know of a pooled VM's NIC; one that stayed in the
        pool's namespace (this pod has none of its own) is unplugged: no link of the guest's unused."""
        nic = self.sandbox.pooled_nic
        hyp = self.sandbox.hypervisor
        if nic is None or hyp is None:
            return
        self.record.pooled_nic = dict(nic)
        self._save()
        if not nic.get("tap"):
            try:
                hyp.unplug_nic(0)
            except KataError as exc:
                log.warning(f"pod {self.id}: unplugging the pooled VM's unused NIC: {exc}")
            finally:
                hyp.release()

    def _adopt_vmm(self) -> None:
        """A VMM from the warm pool was born in its daemon's cgroups, and so was the virtiofsd it came
        with (with the process its namespace sandbox forked): they join the pod's home cgroup, every
        thread of them, as ones the pod launched would have been born there."""
        from kata.utils.process import descendants

        hyp = self.sandbox.hypervisor
        if self.cgroups is None or not self.sandbox.adopted or hyp is None:
            return
        pids = list(hyp.pids())
        fsd = self.sandbox.virtiofsd
        if fsd is not None and fsd.pid is not None:
            pids += [fsd.pid, *descendants(fsd.pid)]
        for pid in pids:
            self.cgroups.join(pid)

    def _place_vcpus(self) -> None:
        """QEMU's vCPU threads (all of them, hot-added ones too) into the sandbox cgroup, when the
        rest of the pod lives apart from it."""
        hyp = self.sandbox.hypervisor
        if self.cgroups is None or not self.cgroups.record.overhead or hyp is None:
            return
        try:
            self.cgroups.place_vcpus(hyp.vcpu_threads())
        finally:
            hyp.release()

    def _grow(self, vcpus: int, memory_mib: int) -> None:
        """Hot-add ``memory_mib`` and ``vcpus`` where the machine allows it; a VM that cannot grow
        keeps the limit in the guest (its own size caps it sooner), with a warning."""
        hyp = self.sandbox.hypervisor
        if hyp is None:
            return
        agent = self.agent()
        try:
            if memory_mib > 0:
                self.sandbox.grow_memory(agent, hyp.memory_mib() + memory_mib)
            if vcpus > 0:
                added = hyp.hotplug_vcpus(vcpus)
                if added:
                    agent.online_cpu_mem(wait=True, nb_cpus=added, cpu_only=True)
                    self._place_vcpus()
        except KataError as exc:
            log.warning(f"pod {self.id}: cannot grow by {vcpus} vCPUs and {memory_mib} MiB: {exc}")
        finally:
            hyp.release()

    # ---- network ------------------------------------------------------------------------------
    def mirror_network(self) -> None:
        """The interfaces the pod's namespace has now (Docker's or CNI's) go into the VM."""
        from kata.sandbox import network

        with self.lock:
            hyp = self.sandbox.hypervisor
            if not self.record.netns or self.record.network or hyp is None:
                return
            try:
                made = network.mirror(self.record.netns, hyp, self.agent, self.record.pooled_nic or None)
            finally:
                hyp.release()
            self.record.network = [list(pair) for pair in made]
            self._save()

    def give_back_pooled_nic(self) -> None:
        """What mirror_network() does when the namespace has no interface, for a caller that found
        none (`kata-runtime start`, beside the container's start): the pooled NIC is unplugged and
        its tap deleted, without looking again."""
        from kata.sandbox import network

        with self.lock:
            hyp = self.sandbox.hypervisor
            if not self.record.netns or self.record.network or not self.record.pooled_nic or hyp is None:
                return
            network.give_back(self.record.netns, hyp, self.record.pooled_nic)

    # ---- the VM -------------------------------------------------------------------------------
    def vm_processes(self) -> list[ProcessId]:
        return self.sandbox.vm_processes()

    def watch(self, on_gone: Callable[[str], None]) -> None:
        """``on_gone(why)`` once, on a thread, when the VMM or virtiofsd dies; the VMM is stopped
        first, so every call to the agent ends. destroy() ends the watch without a call."""
        import signal

        from kata.utils import pidwatch

        procs = [(p.pid, p.start_time) for p in self.vm_processes()]

        def gone() -> None:
            hyp = self.sandbox.hypervisor
            why = "virtiofsd has exited" if hyp is not None and hyp.is_running() else "the VMM has exited"
            pidwatch.kill_all(procs, signal.SIGKILL)
            on_gone(why)

        pidwatch.watch(procs, gone, self._watch_stop)

    def debug_console(self) -> AgentEndpoint:
        """Where the guest's debug console answers; KataError, one line, when this pod offers none."""
        agent = self.cfg.agent
        if not agent.debug_console_enabled:
            raise KataError(f"the debug console is disabled for sandbox {self.id} (set [agent.{agent.name}] "
                            f"debug_console_enabled = true in {self.cfg.source})")
        hyp = self.sandbox.hypervisor
        if hyp is None or not hyp.is_running():
            raise KataError(f"sandbox {self.id} has no running VM")
        endpoint = hyp.debug_console_endpoint()
        if endpoint is None:
            raise KataError(f"the VM of sandbox {self.id} has no debug console channel (it was started "
                            "while debug_console_enabled was off)")
        return endpoint

    def release(self) -> None:
        """Leave the VM running for another process to reach (the runc path's monitor)."""
        self.sandbox.release()

    def _netns_ends_with_pod(self) -> bool:
        """Whether the pod's network namespace ends with it: one we pinned (unpinned at teardown; one
        that stays pinned has them removed after all), or
        a CRI pod's (containerd removes it once the pod has stopped; kata.sandbox.portforward assumes
        the same). Its taps and tc filters then go with it: removing them first cost every stop about
        25 ms (a deleted link waits out an RCU grace period). A namespace someone else keeps is left
        as it was found."""
        from kata.oci.cri_annotations import CONTAINER_TYPE

        return self.record.netns_pinned or self.record.annotations.get(CONTAINER_TYPE) == "sandbox"

    def destroy(self) -> list[str]:
        """The VM and everything it had on the host: taps (or the namespace that takes them along),
        virtiofsd, shares, state, the pinned namespace. Every step runs; returns the failures."""
        from kata.sandbox import network

        with self.lock:
            self._watch_stop.set()
            problems = []
            if self.record.network and not self._netns_ends_with_pod():
                network.unmirror(self.record.netns, self.record.network)
            # The cgroups and the pinned namespace go before the record that names them (a teardown
            # killed in between is finished by the next one, containerd's `shim delete`).
            def before_state_goes() -> list[str]:
                found = self.cgroups.remove() if self.cgroups is not None else []
                if self.record.netns_pinned and not _unpin(self.record.netns):
                    found.append(f"network namespace {self.record.netns}: not unpinned")
                    if self.record.network and os.path.ismount(self.record.netns):
                        # Still pinned, so not ending: its taps and filters go as from anyone else's.
                        network.unmirror(self.record.netns, self.record.network)
                return found

            problems += self.sandbox.destroy(before_state_goes)
            return problems


def tear_down(sid: str) -> list[str]:
    """Whatever sandbox ``sid`` left on the host goes, with the configuration it was made with:
    for a front end whose own process is gone (`delete --force`, containerd's `shim delete`).
    Returns the failures; a sandbox that is not there is no failure."""
    if not Pod.exists(sid):
        return []
    try:
        pod = Pod.attach(sid)
    except KataError as exc:
        # No readable record: the state directory was claimed but never filled in, or was
        # damaged. The VM's own files still say what runs; the default configuration finds it.
        from kata.config import load_config

        log.warning(f"sandbox {sid}: {exc}; tearing it down with the default configuration")
        return Sandbox.attach(sid, load_config(None)).destroy()
    return pod.destroy()


def _unpin(path: str) -> bool:
    """Whether the pin went (the namespace then ends once nothing else holds it)."""
    from kata.utils import netns

    try:
        netns.unpin(path)
    except OSError as exc:
        log.warning(f"network namespace {path}: {exc.strerror or exc}")
        return False
    return True


def _figures_of(spec: dict[str, Any]) -> dict[str, Any]:
    from kata.oci.spec import linux_resources
    from kata.sandbox.host_cgroups import figures

    return figures(linux_resources(spec))


def _pod_limits(record: PodRecord, containers: dict[str, dict[str, Any]]) -> CgroupLimits:
    from kata.oci.spec import Resources
    from kata.sandbox.host_cgroups import pod_limits

    whole = record.pod_figures
    pod = Resources(memory_limit=whole.get("memory"), cpu_quota=whole.get("quota"),
                    cpu_period=whole.get("period")) if whole else None
    return pod_limits(containers.values(), pod)


def _memory_mib(resources: dict[str, Any]) -> int | None:
    limit = (resources.get("memory") or {}).get("limit")
    return math.ceil(limit / 2**20) if isinstance(limit, int) and limit > 0 else None
