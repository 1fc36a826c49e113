"""The shim's pod: one VM (a core Sandbox) and the tasks in it, one per container.

The first task created is the pod's sandbox (the CRI plugin's pause container, or a lone container
run with `ctr run`): it brings the VM up in its network namespace and takes the namespace's
interfaces into it. Later tasks join that VM. The shim holds the only agent connection.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata import ttrpc
from kata.agent_client.lite import LiteAgent
from kata.errors import KataError
from kata.sandbox.paths import validate_sandbox_id
from kata.shim import events, rootfs
from kata.shim.oom import OomForwarder
from kata.shim.process import CREATED, PAUSED, RUNNING, STOPPED, VM_GONE_STATUS, Process
from kata.shim.stdio import StdioPaths
from kata.specconv import container_growth, pod_resources, pod_role
from kata.utils.text import one_line

if TYPE_CHECKING:
    from kata.agent_client.client import AgentClient
    from kata.config import RuntimeConfig
    from kata.protocols.cgroups.stats.v1.metrics_pb2 import Metrics
    from kata.sandbox.container import Container
    from kata.sandbox.sandbox import Sandbox
    from kata.sandbox.timings import Timings

log = logging.getLogger("kata.shim")

# How often the VM's processes are checked: a dead QEMU or virtiofsd ends every task of the pod.
_WATCH_INTERVAL = 0.5


class ShimError(KataError):
    """A task API failure with the ttrpc code containerd maps to its error kinds."""

    def __init__(self, code: ttrpc.Code, message: str) -> None:
        super().__init__(message)
        self.code = code


def not_found(what: str) -> ShimError:
    return ShimError(ttrpc.Code.NOT_FOUND, f"{what}: not found")


def precondition(message: str) -> ShimError:
    return ShimError(ttrpc.Code.FAILED_PRECONDITION, message)


@dataclass
class Task:
    id: str
    bundle: Path
    init: Process
    container: Container | None = None
    execs: dict[str, Process] = field(default_factory=dict)
    rootfs_mounted: bool = False

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise not_found(f"process {exec_id} of task {self.id}")
        return proc


@dataclass(frozen=True)
class CreateParams:
    id: str
    bundle: Path
    rootfs: Sequence[rootfs.MountSpec]
    stdio: StdioPaths
    config_path: Path | None


class Pod:
    def __init__(self, namespace: str, publisher: events.Publisher | None) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.sandbox: Sandbox | None = None
        self.sandbox_id = ""
        self.agent: AgentClient | None = None
        self.lite: LiteAgent | None = None
        self.tasks: dict[str, Task] = {}
        self.lock = threading.RLock()
        self.vm_gone = False
        self.sized_as_pod = False
        self._network: tuple[str, list[tuple[str, str]]] | None = None  # (netns path, mirrored pairs)
        self._watcher: threading.Thread | None = None

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """What containerd knows every task of the pod by: the VMM's pid, as Kata reports."""
        if self.sandbox is not None and self.sandbox.hypervisor is not None:
            try:
                pids = self.sandbox.hypervisor.pids()
                return pids[0] if pids else 0
            except Exception:  # noqa: BLE001 - a stopped VMM has no pid
                return 0
        return 0

    def task(self, cid: str) -> Task:
        task = self.tasks.get(cid)
        if task is None:
            raise not_found(f"task {cid}")
        return task

    def _publish(self, topic: str, event: Any) -> None:
        if self.publisher is not None:
            self.publisher.publish(topic, event)

    def _require_vm(self) -> tuple[AgentClient, LiteAgent]:
        if self.vm_gone or self.agent is None or self.lite is None:
            raise precondition(f"the VM of pod {self.sandbox_id} is gone")
        return self.agent, self.lite

    # ---- create --------------------------------------------------------------------------------
    def create(self, params: CreateParams) -> int:
        from kata.oci.spec import load_bundle
        from kata.sandbox.timings import Timings

        timings = Timings()
        with self.lock:
            if params.id in self.tasks:
                raise ShimError(ttrpc.Code.ALREADY_EXISTS, f"task {params.id}: already exists")
            if self.sandbox is None:
                # The pod's first task brings its VM up, named after it: an id too long for the
                # VM's socket paths fails here, before anything is mounted.
                validate_sandbox_id(params.id)
            mounted = rootfs.mount_rootfs(params.rootfs, params.bundle) is not None
            brought_up = False
            try:
                bundle = load_bundle(params.bundle)
                role = pod_role(bundle.annotations, params.id)
                task = Task(params.id, params.bundle,
                            Process(params.id, "", params.stdio, self.namespace), rootfs_mounted=mounted)
                if role.is_sandbox and self.sandbox is not None:
                    raise precondition(f"this shim already runs pod {self.sandbox_id}")
                if not role.is_sandbox and (role.sandbox_id != self.sandbox_id or self.sandbox is None):
                    raise precondition(f"container {params.id}: pod {role.sandbox_id} is not in this shim")
                cfg = self._check_before_boot(params, bundle, role.is_sandbox)
                if cfg is not None:
                    brought_up = True
                    self._bring_up(params, bundle, cfg, timings)
                else:
                    self._grow_for(bundle.spec)
                task.container = self._create_container(task, bundle)
                timings.mark("task_created")
            except BaseException:
                if brought_up:
                    self._teardown()
                elif self.sandbox is not None:
                    self.sandbox.shared.remove(params.id)  # what a failed join had shared
                if mounted:
                    rootfs.unmount_rootfs(params.bundle)
                raise
            self.tasks[params.id] = task
        log.debug(f"task {params.id} created: timings {timings.as_json()}")
        self._publish(events.TASK_CREATE, _task_create(params, self.pid))
        return self.pid

    @staticmethod
    def _check_before_boot(params: CreateParams, bundle: Any, is_sandbox: bool) -> RuntimeConfig | None:
        """Whatever in the task would fail it, found before a VM is booted or grown for it: what the
        guest cannot be given; for the pod's sandbox, its configuration (annotations included) and
        the VM's sizing, which is returned."""
        from kata.config import apply_annotations, load_config
        from kata.sandbox.container import check_container
        from kata.sandbox.sandbox import size_vm

        check_container(bundle, params.id)
        if not is_sandbox:
            return None
        cfg = apply_annotations(load_config(params.config_path), bundle.annotations)
        size_vm(cfg, bundle.spec)
        return cfg

    def _bring_up(self, params: CreateParams, bundle: Any, cfg: RuntimeConfig, timings: Timings) -> None:
        from kata.sandbox.sandbox import Sandbox

        netns_path = _enter_network_namespace(bundle)
        timings.mark("config_loaded")
        self.sandbox = Sandbox.create(params.id, cfg, bundle.spec, timings=timings)
        self.sandbox_id = params.id
        self.sized_as_pod = pod_resources(bundle.spec) is not None
        self.agent = self.sandbox.require_agent()
        self.lite = LiteAgent(self.agent.client)
        if netns_path:
            self._mirror(netns_path)
            timings.mark("network_mirrored")
        self._watcher = threading.Thread(target=self._watch_vm, name="vm-watch", daemon=True)
        self._watcher.start()
        agent = self.agent
        ooms = OomForwarder(lambda: agent.get_oom_event().container_id, self.tasks.__contains__,
                            self._report_oom)
        threading.Thread(target=ooms.run, name="oom", daemon=True).start()

    def _mirror(self, netns_path: str) -> None:
        from kata.sandbox import network as networking

        assert self.sandbox is not None and self.agent is not None
        if self.sandbox.hypervisor is not None:
            self.sandbox.hypervisor.release()  # the mirroring talks to QMP itself
        made = networking.mirror(netns_path, self.sandbox.paths.vm_dir, self.agent)
        self._network = (netns_path, made)

    def _grow_for(self, spec: dict[str, Any]) -> None:
        """A joining container's limits are added to the VM (by hotplug, where the machine has it)."""
        if self.sized_as_pod or self.sandbox is None or self.sandbox.hypervisor is None:
            return
        agent, _ = self._require_vm()
        vcpus, memory = container_growth(spec)
        hyp = self.sandbox.hypervisor
        if memory:
            self.sandbox.grow_memory(agent, hyp.memory_mib() + memory)
        if vcpus:
            try:
                added = hyp.hotplug_vcpus(vcpus)
                if added:
                    agent.online_cpu_mem(wait=True, nb_cpus=added, cpu_only=True)
            except Exception as exc:  # noqa: BLE001 - the limit still applies in the guest
                log.warning(f"pod {self.sandbox_id}: cannot add {vcpus} vCPUs: {exc}")
        hyp.release()

    def _create_container(self, task: Task, bundle: Any) -> Container:
        from kata.sandbox.container import Container

        assert self.sandbox is not None
        self._require_vm()
        container = Container(self.sandbox, task.id, bundle)
        container.create()
        assert self.lite is not None
        task.init.open_io(self.lite)
        return container

    # ---- start, exec -----------------------------------------------------------------------------
    def start(self, cid: str, exec_id: str) -> int:
        with self.lock:
            task = self.task(cid)
            proc = task.process(exec_id)
            if proc.status != CREATED:
                raise precondition(f"process {exec_id or cid} cannot start: it is {proc.status}")
            _, lite = self._require_vm()
        if exec_id:
            lite.exec_process(cid, exec_id, proc.spec_json)
            proc.open_io(lite)
        else:
            lite.start_container(cid)
        proc.status = RUNNING
        proc.watch(lite, self._on_exit)
        if exec_id:
            self._publish(events.TASK_EXEC_STARTED, _pb().TaskExecStarted(container_id=cid, exec_id=exec_id,
                                                                          pid=self.pid))
        else:
            self._publish(events.TASK_START, _pb().TaskStart(container_id=cid, pid=self.pid))
        return self.pid

    def exec(self, cid: str, exec_id: str, stdio: StdioPaths, spec_json: bytes) -> None:
        with self.lock:
            task = self.task(cid)
            if exec_id in task.execs:
                raise ShimError(ttrpc.Code.ALREADY_EXISTS, f"exec {exec_id}: already exists")
            if task.init.status not in (RUNNING, PAUSED):
                raise precondition(f"cannot exec in task {cid}: it is {task.init.status}")
            task.execs[exec_id] = Process(cid, exec_id, stdio, self.namespace, spec_json)
        self._publish(events.TASK_EXEC_ADDED, _pb().TaskExecAdded(container_id=cid, exec_id=exec_id))

    def _on_exit(self, proc: Process) -> None:
        assert proc.exited_at is not None
        if proc.oom_killed:  # containerd reads an exit after an OOM event as the OOM's victim
            self._publish(events.TASK_OOM, _pb().TaskOOM(container_id=proc.container_id))
        event = _pb().TaskExit(container_id=proc.container_id, id=proc.exec_id or proc.container_id,
                               pid=self.pid, exit_status=proc.exit_status)
        event.exited_at.FromNanoseconds(int(proc.exited_at * 1e9))
        self._publish(events.TASK_EXIT, event)

    # ---- signals, pause ------------------------------------------------------------------------
    def kill(self, cid: str, exec_id: str, signum: int, all_processes: bool) -> None:
        with self.lock:
            task = self.task(cid)
            proc = task.process(exec_id)
            targets = [proc]
            if all_processes and not exec_id:
                targets += [p for p in task.execs.values() if p.status in (RUNNING, PAUSED)]
        if proc.status == STOPPED:
            raise not_found(f"process {exec_id or cid} already finished")
        _, lite = self._require_vm()
        for p in targets:
            if p.status == CREATED and p.exec_id:
                continue  # an exec that never started has nothing to signal
            try:
                lite.signal(cid, p.exec_id, signum)
            except ttrpc.TTRPCError as exc:
                if p is proc and not p.exited:
                    raise ShimError(exc.code, str(exc)) from None

    def pause(self, cid: str) -> None:
        task = self.task(cid)
        if task.init.status != RUNNING:
            raise precondition(f"cannot pause task {cid}: it is {task.init.status}")
        agent, _ = self._require_vm()
        agent.pause_container(container_id=cid)
        task.init.status = PAUSED
        self._publish(events.TASK_PAUSED, _pb().TaskPaused(container_id=cid))

    def resume(self, cid: str) -> None:
        task = self.task(cid)
        if task.init.status != PAUSED:
            raise precondition(f"cannot resume task {cid}: it is {task.init.status}")
        agent, _ = self._require_vm()
        agent.resume_container(container_id=cid)
        task.init.status = RUNNING
        self._publish(events.TASK_RESUMED, _pb().TaskResumed(container_id=cid))

    def resize(self, cid: str, exec_id: str, width: int, height: int) -> None:
        proc = self.task(cid).process(exec_id)
        if proc.status in (RUNNING, PAUSED):
            _, lite = self._require_vm()
            lite.resize(cid, exec_id, height, width)

    def close_io(self, cid: str, exec_id: str) -> None:
        self.task(cid).process(exec_id).close_stdin()

    # ---- resources -----------------------------------------------------------------------------
    def update(self, cid: str, resources: dict[str, Any]) -> None:
        task = self.task(cid)
        if task.init.status == STOPPED:
            raise precondition(f"task {cid} is stopped")
        agent, _ = self._require_vm()
        limit = (resources.get("memory") or {}).get("limit")
        if self.sandbox is not None and isinstance(limit, int) and limit > 0 and not self.sized_as_pod:
            assert task.container is not None and self.sandbox.hypervisor is not None
            old = task.container.bundle.spec.get("linux", {}).get("resources", {}).get("memory", {})
            grown = math.ceil(limit / 2**20) - math.ceil(max(0, int(old.get("limit") or 0)) / 2**20)
            if grown > 0:
                self.sandbox.grow_memory(agent, self.sandbox.hypervisor.memory_mib() + grown)
                self.sandbox.hypervisor.release()
        agent.update_container(container_id=cid, resources_json=json.dumps(resources).encode())

    def stats(self, cid: str) -> Metrics:
        from kata.shim.metrics import to_metrics

        self.task(cid)
        agent, _ = self._require_vm()
        return to_metrics(agent.stats_container(container_id=cid))

    # ---- delete, shutdown ----------------------------------------------------------------------
    def delete(self, cid: str, exec_id: str) -> Process:
        with self.lock:
            task = self.task(cid)
            proc = task.process(exec_id)
            if proc.status in (RUNNING, PAUSED):
                raise precondition(f"cannot delete process {exec_id or cid}: it is {proc.status}")
            if exec_id:
                del task.execs[exec_id]
                return proc
            if proc.status == CREATED:
                proc.finish(0 if not self.vm_gone else VM_GONE_STATUS)
            if cid == self.sandbox_id:
                # Every process of the pod ends with its VM: nothing needs removing in the guest
                # first, and without the agent the VM is stopped at once (files are on the host,
                # written through the shared filesystem without a guest-side write-back cache).
                self._drop_agent()
                for other in list(self.tasks.values()):
                    other.init.finish(VM_GONE_STATUS)
                    self._remove_task(other)
                self._teardown()
            else:
                self._remove_task(task)
        event = _pb().TaskDelete(container_id=cid, id=cid, pid=self.pid, exit_status=proc.exit_status)
        event.exited_at.FromNanoseconds(int((proc.exited_at or time.time()) * 1e9))
        self._publish(events.TASK_DELETE, event)
        return proc

    def _remove_task(self, task: Task) -> None:
        if task.container is not None and not self.vm_gone and self.agent is not None:
            try:
                task.container.remove()
            except Exception as exc:  # noqa: BLE001 - the VM may be on its way out
                log.warning(f"task {task.id}: removing it in the guest: {exc}")
        if self.sandbox is not None:
            self.sandbox.shared.remove(task.id)
        if task.rootfs_mounted:
            rootfs.unmount_rootfs(task.bundle)
        self.tasks.pop(task.id, None)

    def _drop_agent(self) -> None:
        self.vm_gone = True
        if self.agent is not None:
            self.agent.close()
        if self.sandbox is not None:
            self.sandbox.agent = None
        self.agent = self.lite = None

    def _teardown(self) -> None:
        """The VM and everything it had on the host: taps, virtiofsd, shares, state."""
        sandbox, self.sandbox = self.sandbox, None
        self.vm_gone = True
        if self._network is not None:
            from kata.sandbox import network as networking

            netns_path, made = self._network
            networking.unmirror(netns_path, made)
            self._network = None
        if sandbox is not None:
            sandbox.destroy()
        self.agent = self.lite = None

    def shutdown(self, now: bool = False) -> bool:
        """containerd's Shutdown: True when the shim should exit: no task left, or ``now`` (the
        tasks go with the VM)."""
        with self.lock:
            if self.tasks and not now:
                return False
            self._drop_agent()
            for task in list(self.tasks.values()):
                task.init.finish(VM_GONE_STATUS)
                self._remove_task(task)
            self._teardown()
            return True

    def _report_oom(self, cid: str) -> None:
        """A task's OOM kill, as the guest reports it (kata.shim.oom filters and paces them)."""
        log.info(f"task {cid}: out of memory")
        if self.publisher is not None:
            self.publisher.publish(events.TASK_OOM, _pb().TaskOOM(container_id=cid), from_guest=True)

    # ---- faults --------------------------------------------------------------------------------
    def _watch_vm(self) -> None:
        """QEMU or virtiofsd gone means the pod is gone: every task exits with VM_GONE_STATUS."""
        while True:
            time.sleep(_WATCH_INTERVAL)
            sandbox = self.sandbox
            if sandbox is None:
                return
            try:
                problem = _vm_problem(sandbox)
            except Exception as exc:  # noqa: BLE001 - a failed look is no verdict: look again
                log.warning(f"pod {self.sandbox_id}: cannot check its VM: {one_line(exc)}")
                continue
            if problem:
                break
        log.error(f"pod {self.sandbox_id}: {problem}; its tasks are reported exited")
        with self.lock:
            self.vm_gone = True
            if self.agent is not None:
                self.agent.close()  # every WaitProcess in flight fails: each process exits with 255
            if sandbox.hypervisor is not None:
                try:
                    sandbox.hypervisor.stop(timeout=0.0)
                except Exception:  # noqa: BLE001 - it may be dead already
                    pass
            created = [t.init for t in self.tasks.values() if t.init.status == CREATED]
        for proc in created:
            proc.finish(VM_GONE_STATUS)


def _vm_problem(sandbox: Sandbox) -> str:
    hyp = sandbox.hypervisor
    if hyp is not None and not hyp.is_running():
        return "the VMM has exited"
    vfs = sandbox.virtiofsd
    if vfs is not None and not vfs.is_running():
        return "virtiofsd has exited"
    return ""


def _enter_network_namespace(bundle: Any) -> str:
    """Join the task's network namespace: the VMM is started from here and lives in it. Returns its
    path when it has one to mirror (a new, empty one has nothing)."""
    from kata.utils import netns

    ns = next((n for n in bundle.namespaces if n.type == "network"), None)
    if ns is None:
        raise KataError("host networking is not supported: the pod runs in a VM, which cannot share "
                        "the host's network namespace")
    if ns.path:
        if netns.is_ours(ns.path):
            raise KataError("host networking is not supported: the pod runs in a VM")
        netns.enter(ns.path)
        return str(ns.path)
    netns.unshare()
    return ""


def _pb() -> Any:
    from kata.protocols.containerd.api.events import task_pb2

    return task_pb2


def _task_create(params: CreateParams, pid: int) -> Any:
    from kata.protocols.containerd.api.types import mount_pb2

    pb = _pb()
    return pb.TaskCreate(
        container_id=params.id, bundle=str(params.bundle), pid=pid,
        rootfs=[mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
                for m in params.rootfs],
        io=pb.TaskIO(stdin=params.stdio.stdin, stdout=params.stdio.stdout, stderr=params.stdio.stderr,
                     terminal=params.stdio.terminal))
