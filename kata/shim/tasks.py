"""The shim's pod: the tasks of one pod, one per container, in the pod's VM (kata.sandbox.pod).

The first task created is the pod's sandbox (the CRI plugin's pause container, or a lone container
run with `ctr run`): it brings the VM up in its network namespace and takes the namespace's
interfaces into it. Later tasks join that VM. The shim holds the only agent connection. Only
containerd's view lives here (tasks, processes, events); the VM, its containers, growth, network and
hooks are the sandbox service's, as for the runc front end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata import ttrpc
from kata.agent_client.lite import LiteAgent
from kata.errors import KataError
from kata.sandbox import pod as pods
from kata.sandbox.paths import validate_sandbox_id
from kata.sandbox.status import LIVE, VM_GONE_STATUS, Status, transition
from kata.shim import events, rootfs
from kata.shim.oom import OomForwarder
from kata.shim.process import Process
from kata.shim.stdio import StdioPaths
from kata.specconv import pod_role
from kata.utils.text import one_line

if TYPE_CHECKING:
    from kata.agent_client.client import AgentClient
    from kata.metrics.endpoint import Endpoint
    from kata.oci.spec import Bundle
    from kata.protocols.cgroups.stats.v1.metrics_pb2 import Metrics
    from kata.sandbox.container import Container
    from kata.sandbox.portforward import Forwarder
    from kata.sandbox.timings import Timings

log = logging.getLogger("kata.shim")
# How long teardown waits for the port forwarder's threads (their agent calls end with the VM).
_FORWARDER_JOIN = 5.0


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
    spec: dict[str, Any] = field(default_factory=dict)  # its config.json, for its hooks
    annotations: dict[str, str] = field(default_factory=dict)
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


class PodTasks:
    def __init__(self, namespace: str, publisher: events.Publisher | None) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.pod: pods.Pod | None = None
        self.sandbox_id = ""
        self.agent: AgentClient | None = None
        self.lite: LiteAgent | None = None
        self.tasks: dict[str, Task] = {}
        self.lock = threading.RLock()
        self.vm_gone = False
        self.forwarder: Forwarder | None = None
        self.metrics: Endpoint | None = None

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """What containerd knows every task of the pod by: the VMM's pid, as Kata reports."""
        return self.pod.pid if self.pod is not None else 0

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

    def _hooks(self, task: Task, kinds: Sequence[str], status: str, fatal: bool) -> None:
        """The task's OCI hooks of ``kinds``, in order; their state's pid is the VMM's."""
        state = pods.hook_state(task.id, status, self.pid, task.bundle, task.annotations)
        for kind in kinds:
            pods.run_hooks(task.spec, kind, state, fatal)

    # ---- create --------------------------------------------------------------------------------
    def create(self, params: CreateParams) -> int:
        from kata.oci.spec import load_bundle
        from kata.sandbox.timings import Timings

        timings = Timings()
        with self.lock:
            if params.id in self.tasks:
                raise ShimError(ttrpc.Code.ALREADY_EXISTS, f"task {params.id}: already exists")
            if self.pod is None:
                # The pod's first task brings its VM up, named after it: an id too long for the
                # VM's socket paths fails here, before anything is mounted.
                validate_sandbox_id(params.id)
            mounted = rootfs.mount_rootfs(params.rootfs, params.bundle) is not None
            brought_up = False
            task: Task | None = None
            try:
                bundle = load_bundle(params.bundle)
                role = pod_role(bundle.annotations, params.id)
                task = Task(params.id, params.bundle,
                            Process(params.id, "", params.stdio, self.namespace), rootfs_mounted=mounted,
                            spec=bundle.spec, annotations=dict(bundle.annotations))
                if role.is_sandbox and self.pod is not None:
                    raise precondition(f"this shim already runs pod {self.sandbox_id}")
                if not role.is_sandbox and (role.sandbox_id != self.sandbox_id or self.pod is None):
                    raise precondition(f"container {params.id}: pod {role.sandbox_id} is not in this shim")
                if role.is_sandbox:
                    # Before anything is booted: what the task would fail on.
                    cfg = pods.load_pod_config(params.config_path, bundle.annotations)
                    pods.check(params.id, bundle, cfg)
                    brought_up = True
                    self._bring_up(params, bundle, timings)
                assert self.pod is not None
                self._require_vm()
                task.container = self.pod.add_container(params.id, bundle)
                assert self.lite is not None
                task.init.open_io(self.lite)
                self._hooks(task, pods.CREATE_HOOKS, "creating", fatal=True)
                timings.mark("task_created")
            except BaseException:
                if task is not None:
                    task.init.finish(VM_GONE_STATUS)  # closes what open_io opened
                if brought_up:
                    self._teardown()
                elif self.pod is not None:
                    self.pod.remove_container(params.id, task.container if task is not None else None)
                if mounted:
                    rootfs.unmount_rootfs(params.bundle)
                raise
            self.tasks[params.id] = task
        log.debug(f"task {params.id} created: timings {timings.as_json()}")
        self._publish(events.TASK_CREATE, _task_create(params, self.pid))
        return self.pid

    def _bring_up(self, params: CreateParams, bundle: Bundle, timings: Timings) -> None:
        """The pod's VM, in the task's network namespace (joined: the VMM lives there), with the
        namespace's interfaces (CNI set them up before) mirrored in, and watched."""
        self.pod = pods.Pod.create(params.id, bundle, params.config_path, timings=timings)
        self.sandbox_id = params.id
        self.agent = self.pod.agent()
        self.lite = LiteAgent(self.agent.client)
        self.pod.mirror_network()
        timings.mark("network_mirrored")
        self._forward_ports(bundle)
        timings.mark("ports_forwarded")
        self.pod.watch(self._vm_gone)
        self._serve_metrics()
        agent = self.agent
        ooms = OomForwarder(lambda: agent.get_oom_event().container_id, self.tasks.__contains__,
                            self._report_oom)
        threading.Thread(target=ooms.run, name="oom", daemon=True).start()

    def _forward_ports(self, bundle: Bundle) -> None:
        """A CRI pod's loopback connections on the host go to its VM (the CRI's port-forward dials
        them; kata.sandbox.portforward). Only a CRI sandbox: the namespace is then the pod's alone,
        while a lone container may share one whose loopback is someone else's. The pod works
        without it, with a warning."""
        from kata.sandbox.portforward import Forwarder
        from kata.specconv import CRI_CONTAINER_TYPE

        assert self.pod is not None and self.agent is not None
        netns = self.pod.record.netns
        if bundle.annotations.get(CRI_CONTAINER_TYPE) != "sandbox" or not netns:
            return
        try:
            self.forwarder = Forwarder.start(self.agent, netns)
        except (KataError, OSError) as exc:
            log.warning(f"pod {self.sandbox_id}: no port forwarding: {one_line(exc)}")

    def _stop_forwarder(self) -> None:
        if self.forwarder is not None:
            self.forwarder.stop(namespace_ends=True)  # the shim stops it when the pod ends

    def _serve_metrics(self) -> None:
        """The pod's Prometheus text on its socket, for kata-monitor and `kata-runtime metrics`."""
        from kata.metrics.sandbox import serve

        assert self.pod is not None
        try:
            self.metrics = serve(self.sandbox_id, self.pod.sandbox.vm_processes_by_kind(), lambda: self.lite)
        except OSError as exc:  # the pod runs without: say so
            log.warning(f"pod {self.sandbox_id}: no metrics: {exc}")

    # ---- start, exec -----------------------------------------------------------------------------
    def start(self, cid: str, exec_id: str) -> int:
        with self.lock:
            task = self.task(cid)
            proc = task.process(exec_id)
            if proc.status is not Status.CREATED:
                raise precondition(f"process {exec_id or cid} cannot start: it is {proc.status}")
            _, lite = self._require_vm()
        if exec_id:
            lite.exec_process(cid, exec_id, proc.spec_json)
            proc.open_io(lite)
        else:
            self._hooks(task, ("startContainer",), "created", fatal=True)
            lite.start_container(cid)
        with self.lock:
            if proc.status is Status.CREATED:  # not stopped meanwhile (its VM gone)
                proc.status = transition(proc.status, Status.RUNNING)
        proc.watch(lite, self._on_exit)
        if exec_id:
            self._publish(events.TASK_EXEC_STARTED, _pb().TaskExecStarted(container_id=cid, exec_id=exec_id,
                                                                          pid=self.pid))
        else:
            self._publish(events.TASK_START, _pb().TaskStart(container_id=cid, pid=self.pid))
            # The spec: a poststart hook's failure is logged, and the lifecycle goes on.
            self._hooks(task, ("poststart",), "running", fatal=False)
        return self.pid

    def exec(self, cid: str, exec_id: str, stdio: StdioPaths, spec_json: bytes) -> None:
        with self.lock:
            task = self.task(cid)
            if exec_id in task.execs:
                raise ShimError(ttrpc.Code.ALREADY_EXISTS, f"exec {exec_id}: already exists")
            if task.init.status not in LIVE:
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
                targets += [p for p in task.execs.values() if p.status in LIVE]
        if proc.status is Status.STOPPED:
            raise not_found(f"process {exec_id or cid} already finished")
        _, lite = self._require_vm()
        for p in targets:
            if p.status is Status.CREATED and p.exec_id:
                continue  # an exec that never started has nothing to signal
            try:
                lite.signal(cid, p.exec_id, signum)
            except ttrpc.TTRPCError as exc:
                if p is proc and not p.exited:
                    raise ShimError(exc.code, str(exc)) from None

    def pause(self, cid: str) -> None:
        self._pause_or_resume(cid, Status.RUNNING, Status.PAUSED)
        self._publish(events.TASK_PAUSED, _pb().TaskPaused(container_id=cid))

    def resume(self, cid: str) -> None:
        self._pause_or_resume(cid, Status.PAUSED, Status.RUNNING)
        self._publish(events.TASK_RESUMED, _pb().TaskResumed(container_id=cid))

    def _pause_or_resume(self, cid: str, current: Status, wanted: Status) -> None:
        with self.lock:
            task = self.task(cid)
            if task.init.status is not current:
                verb = "pause" if wanted is Status.PAUSED else "resume"
                raise precondition(f"cannot {verb} task {cid}: it is {task.init.status}")
            agent, _ = self._require_vm()
            if wanted is Status.PAUSED:
                agent.pause_container(container_id=cid)
            else:
                agent.resume_container(container_id=cid)
            task.init.status = transition(task.init.status, wanted)

    def resize(self, cid: str, exec_id: str, width: int, height: int) -> None:
        proc = self.task(cid).process(exec_id)
        if proc.status in LIVE:
            _, lite = self._require_vm()
            lite.resize(cid, exec_id, height, width)

    def close_io(self, cid: str, exec_id: str) -> None:
        self.task(cid).process(exec_id).close_stdin()

    # ---- resources -----------------------------------------------------------------------------
    def update(self, cid: str, resources: dict[str, Any]) -> None:
        """New limits; the VM grows by what they add over the recorded ones (the same update twice
        grows it once)."""
        with self.lock:
            task = self.task(cid)
            if task.init.status is Status.STOPPED:
                raise precondition(f"task {cid} is stopped")
            self._require_vm()
            assert self.pod is not None
            self.pod.update(cid, resources)

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
            if proc.status in LIVE:
                raise precondition(f"cannot delete process {exec_id or cid}: it is {proc.status}")
            if exec_id:
                del task.execs[exec_id]
                return proc
            if proc.status is Status.CREATED:
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
        """The task's container out of the guest (while the VM runs) and off the host, then its
        poststop hooks."""
        if self.pod is not None:
            self.pod.remove_container(task.id, task.container if not self.vm_gone else None)
        if task.rootfs_mounted:
            rootfs.unmount_rootfs(task.bundle)
        self.tasks.pop(task.id, None)
        self._hooks(task, ("poststop",), "stopped", fatal=False)

    def _drop_agent(self) -> None:
        self._stop_forwarder()  # first: the guest sees its connections closed
        self.vm_gone = True
        if self.agent is not None:
            self.agent.close()
        if self.pod is not None:
            self.pod.sandbox.agent = None
        self.agent = self.lite = None

    def _teardown(self) -> None:
        """The VM and everything it had on the host (Pod.destroy): virtiofsd, shares, state, the taps
        where the namespace does not take them along."""
        pod, self.pod = self.pod, None
        self.vm_gone = True
        self._stop_forwarder()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if pod is not None:
            for problem in pod.destroy():
                log.warning(f"pod {pod.id}: {problem}")
        self.agent = self.lite = None
        forwarder, self.forwarder = self.forwarder, None
        if forwarder is not None and not forwarder.join(_FORWARDER_JOIN):
            # Only a guest that never answered a forwarded read: its calls ended with the VM.
            log.warning(f"pod {self.sandbox_id}: port forwarding threads still running")

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
    def _vm_gone(self, why: str) -> None:
        """QEMU or virtiofsd gone means the pod is gone: every task exits with VM_GONE_STATUS (the
        rest of the VM was stopped: every call to the agent in flight fails)."""
        log.error(f"pod {self.sandbox_id}: {why}; its tasks are reported exited")
        with self.lock:
            self.vm_gone = True
            if self.agent is not None:
                self.agent.close()  # every WaitProcess in flight fails: each process exits with 255
            created = [t.init for t in self.tasks.values() if t.init.status is Status.CREATED]
        for proc in created:
            proc.finish(VM_GONE_STATUS)


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
