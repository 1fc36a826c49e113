"""The runc lifecycle on VMs: what `create`, `start`, `kill`, `delete`, `exec`, `pause`, `resume` and
`update` do, with runc's state rules and wording. A container gets a sandbox (VM) of its own, named
alike, unless its annotations make it a member of a pod (CRI's or CRI-O's, which podman sets on the
containers of a `podman pod`): it is then created in the VM of its pod's sandbox container.

`create` boots the VM, creates the container in it and hands the agent connection to the init
monitor, which stands for the container's process on the host from then on; every later command,
and every member's monitor, reaches the agent through that monitor's proxy socket.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata.errors import KataError, strerror
from kata.runc.state import ContainerRecord, ContainerStore, now_rfc3339
from kata.sandbox.paths import SandboxPaths, validate_sandbox_id
from kata.sandbox.status import LIVE, Status, transition
from kata.utils.process import ProcessId, signal_process, wait_exit
from kata.utils.text import one_line

if TYPE_CHECKING:
    import subprocess

    from kata import ttrpc
    from kata.agent_client.client import AgentClient
    from kata.agent_client.lite import LiteAgent
    from kata.oci.spec import Bundle
    from kata.runc.monitor_launch import PendingMonitor

# Heavier modules (the agent's protobuf API, the configuration, the sandbox) are imported where they
# are used: every runc verb is a new process, and most need none of them.
log = logging.getLogger("kata.runc")


class StateError(KataError):
    """The command does not apply in the container's current state (runc's wording)."""


def proxy_socket(cid: str) -> Path:
    return SandboxPaths(cid).agent_proxy_socket


def _proxy_client(rec: ContainerRecord) -> ttrpc.Client:
    """A ttrpc connection to the agent, through the monitor of the container's sandbox."""
    from kata import ttrpc
    from kata.agent_client.transport import TransportError, connect
    from kata.protocols.agent_api import AgentEndpoint

    if rec.current_status() is Status.STOPPED:
        raise StateError("container not running")
    try:
        return ttrpc.Client(connect(AgentEndpoint("serial", path=str(proxy_socket(rec.sandbox_id()))), 5.0))
    except TransportError as exc:
        raise StateError(f"container {rec.id}: its monitor does not answer: {exc}") from exc


@contextmanager
def agent_of(rec: ContainerRecord, timeout: float = 60.0) -> Iterator[AgentClient]:
    """The agent's typed API, through the container's monitor."""
    from kata.agent_client.client import AgentClient

    client = AgentClient(_proxy_client(rec), timeout=timeout)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def lite_agent_of(rec: ContainerRecord) -> Iterator[LiteAgent]:
    """The few calls of kata.agent_client.lite, for the verbs on Docker's hot path (start, kill): they skip
    loading the protobuf runtime, a good part of a short command's time."""
    from kata.agent_client.lite import LiteAgent

    client = _proxy_client(rec)
    try:
        yield LiteAgent(client)
    finally:
        client.close()


def _hooks(spec: dict[str, Any], kind: str, rec: ContainerRecord, status: str, fatal: bool) -> None:
    """Run the spec's ``kind`` hooks with the state runc gives them (``status``, and the pid of the
    process standing for the container while there is one: its monitor)."""
    hooks = spec.get("hooks")
    if not isinstance(hooks, dict) or not hooks.get(kind):
        return  # none of this kind (kata.sandbox.pod.run_hooks's rule): the sandbox service stays unloaded
    from kata.sandbox.pod import hook_state, run_hooks

    run_hooks(spec, kind, hook_state(rec.id, status, rec.pid, rec.bundle, rec.annotations), fatal)


# ---- create ---------------------------------------------------------------------------------
def check_console(terminal: bool, console_socket: str | None, foreground: bool) -> None:
    """runc's rules for a terminal (its checkTerminal), before anything is started. The socket must
    be there (runc dials it first), but we do not connect: its listener takes one connection, the
    one that hands it the pty."""
    if terminal and not console_socket and not foreground:
        raise KataError("cannot allocate tty if runc will detach without setting console socket")
    if console_socket and (foreground or not terminal):
        raise KataError("cannot use console socket if runc will not detach or allocate tty")
    if console_socket:
        try:
            mode = os.stat(console_socket).st_mode
        except OSError as exc:
            raise KataError(f"dial unix {console_socket}: connect: {strerror(exc)}") from None
        if not stat.S_ISSOCK(mode):
            raise KataError(f"dial unix {console_socket}: connect: connection refused")


def create(store: ContainerStore, cid: str, bundle_dir: Path, *, config_path: Path | None,
           console_socket: str | None, debug: bool, foreground: bool = False) -> tuple[ContainerRecord,
                                                                                       subprocess.Popen[bytes]]:
    """Bring up the VM and the container in it, in runc's "created" state, with its monitor."""
    from kata.oci.spec import load_bundle
    from kata.runc import monitor_launch
    from kata.sandbox import pod as pods
    from kata.sandbox.timings import Timings
    from kata.specconv import pod_role

    timings = Timings()
    validate_sandbox_id(cid)  # the container is a sandbox of its own, named alike
    bundle = load_bundle(bundle_dir.resolve())
    terminal = bool(bundle.spec.get("process", {}).get("terminal", False))
    role = pod_role(bundle.annotations, cid)
    if not role.is_sandbox:
        return _create_member(store, cid, bundle, role.sandbox_id, terminal=terminal,
                              console_socket=console_socket, foreground=foreground)
    cfg = pods.load_pod_config(config_path, bundle.annotations)
    pods.check(cid, bundle, cfg)
    check_console(terminal, console_socket, foreground)
    store.reserve(cid)
    rec = ContainerRecord(id=cid, bundle=str(bundle.path), rootfs=str(bundle.root_path),
                          created=now_rfc3339(), config=str(cfg.source), annotations=dict(bundle.annotations),
                          status=Status.CREATING, owner="root" if os.geteuid() == 0 else str(os.geteuid()))
    pod: pods.Pod | None = None
    monitors: list[monitor_launch.PendingMonitor] = []
    try:
        store.save(rec)
        # The monitor starts in the container's network namespace (Docker's prestart hook finds the
        # namespace through its pid), before the VM boots, so that its Python start-up overlaps it.
        pod = pods.Pod.create(cid, bundle, config_path, pin_netns_at=store.dir(cid) / "netns", debug=debug,
                              timings=timings,
                              entered=lambda: monitors.append(monitor_launch.PendingMonitor([cid])),
                              members=lambda: [m.proc.pid for m in monitors])
        pod.add_container(cid, bundle)
        agent_ep = pod.sandbox.require_hypervisor().agent_endpoint()
        vm = [[p.pid, p.start_time] for p in pod.vm_processes()]
        metrics = {kind: [[p.pid, p.start_time] for p in procs]
                   for kind, procs in pod.sandbox.vm_processes_by_kind().items()}
        pod.release()
        conf = {"role": "init", "cid": cid, "agent": agent_ep._asdict(), "proxy": str(proxy_socket(cid)),
                "terminal": terminal, "console_socket": console_socket, "foreground": foreground, "vm": vm,
                "pod_record": str(pods.record_path(cid)), "record": str(store.record_path(cid)),
                "metrics": {"processes": metrics, "library": monitor_launch.metrics_library()}}
        ident = monitors[0].configure(conf)
        timings.mark("monitor_ready")
        rec.pid, rec.pid_start, rec.status = ident.pid, ident.start_time, Status.CREATED
        rec.pooled_tap = pod.record.pooled_nic.get("tap", "")
        store.save(rec)
        for kind in pods.CREATE_HOOKS:
            _hooks(bundle.spec, kind, rec, Status.CREATING, fatal=True)
        timings.mark("hooks_done")
        log.debug(f"timings {timings.as_json()}")  # bench/run_vs_runc.py reads this line
        return rec, monitors[0].proc
    except BaseException:
        for monitor in monitors:
            monitor.cancel()
        if pod is not None:
            pod.destroy()
        try:
            store.remove(cid)
        except KataError as exc:  # the create's own failure is the one to report
            log.warning(f"create {cid}: {exc}")
        raise


def _create_member(store: ContainerStore, cid: str, bundle: Bundle, sid: str, *, terminal: bool,
                   console_socket: str | None, foreground: bool) -> tuple[ContainerRecord,
                                                                     subprocess.Popen[bytes]]:
    """A pod's container, created in the VM of its sandbox container ``sid`` (podman's infra
    container, a CRI pause container) through that container's monitor, as Kata does: the pod's
    containers share the VM, its network and localhost. Its own monitor joins the pod's network
    namespace and reaches the agent through the same proxy."""
    from kata.runc import monitor_launch
    from kata.sandbox.pod import CREATE_HOOKS, Pod
    from kata.utils import netns

    check_console(terminal, console_socket, foreground)
    netns_path = _pod_network(store, cid, bundle, sid)
    store.reserve(cid)
    rec = ContainerRecord(id=cid, bundle=str(bundle.path), rootfs=str(bundle.root_path),
                          created=now_rfc3339(), config="", annotations=dict(bundle.annotations),
                          status=Status.CREATING, owner="root" if os.geteuid() == 0 else str(os.geteuid()),
                          sandbox=sid)
    monitor: monitor_launch.PendingMonitor | None = None
    joined = False
    try:
        store.save(rec)
        netns.enter(netns_path)
        monitor = monitor_launch.PendingMonitor([cid])
        # The sandbox's lock: a pod's record (its containers' limits) changes one container at a time.
        with store.locked(sid) as sandbox, agent_of(sandbox) as agent:
            pod = Pod.attach(sid, agent)
            rec.config = str(pod.cfg.source)
            pod.add_container(cid, bundle)
            joined = True
        conf = {"role": "member", "cid": cid, "proxy": str(proxy_socket(sid)), "terminal": terminal,
                "console_socket": console_socket, "foreground": foreground}
        ident = monitor.configure(conf)
        if pod.cgroups is not None:  # a member's monitor lives where the sandbox's does
            pod.cgroups.join(ident.pid)
        rec.pid, rec.pid_start, rec.status = ident.pid, ident.start_time, Status.CREATED
        store.save(rec)
        for kind in CREATE_HOOKS:
            _hooks(bundle.spec, kind, rec, Status.CREATING, fatal=True)
        return rec, monitor.proc
    except BaseException:
        if monitor is not None:
            monitor.cancel()
        if joined:
            _leave_pod(store, cid, sid)
        try:
            store.remove(cid)
        except KataError as exc:
            log.warning(f"create {cid}: {exc}")
        raise


def _pod_network(store: ContainerStore, cid: str, bundle: Bundle, sid: str) -> str:
    """The network namespace a member of ``sid``'s pod names, which must be its sandbox's: a VM has
    one network, so a member cannot have another (podman's `pod create --share` without net)."""
    from kata.runc.state import ContainerNotFound
    from kata.utils import nsfiles

    try:
        sandbox = store.load(sid)
    except ContainerNotFound:
        raise KataError(f"container {cid}: its pod's sandbox container {sid} is not a kata container "
                        f"under {store.root}") from None
    if sandbox.sandbox:
        raise KataError(f"container {cid}: {sid} is a member of pod {sandbox.sandbox}, not a sandbox")
    status = sandbox.current_status()
    if status not in (Status.CREATED, Status.RUNNING):
        raise StateError(f"container {cid}: its pod's sandbox container {sid} is {status}")
    ns = next((n for n in bundle.namespaces if n.type == "network"), None)
    if ns is None or not ns.path or (nsfiles.identify("network", ns.path)
                                     != nsfiles.identify("network", f"/proc/{sandbox.pid}/ns/net")):
        raise KataError(f"container {cid}: it joins the VM of {sid}, so it must share its network "
                        "namespace (a VM has one network)")
    return ns.path


def _leave_pod(store: ContainerStore, cid: str, sid: str) -> None:
    """A member's part of its pod's VM goes: the container in the guest (crun kills what still runs
    there) and its shares on the host. The VM stays for the rest of the pod; a sandbox deleted first
    took everything with it."""
    from kata import ttrpc
    from kata.sandbox.pod import Pod

    if not Pod.exists(sid):
        return
    try:
        with store.locked(sid) as sandbox, agent_of(sandbox) as agent:
            try:
                agent.remove_container(container_id=cid)
            except (KataError, ttrpc.TTRPCError) as exc:
                log.warning(f"delete {cid}: removing it in the guest: {exc}")
            Pod.attach(sid, agent).remove_container(cid)
            return
    except KataError as exc:  # the sandbox stopped, or is being deleted: the host's part alone
        log.debug(f"delete {cid}: sandbox {sid}: {exc}")
    try:
        Pod.attach(sid).remove_container(cid)
    except KataError as exc:
        log.debug(f"delete {cid}: sandbox {sid}: {exc}")


# ---- start, kill, pause, resume -------------------------------------------------------------
def start(store: ContainerStore, cid: str) -> None:
    with store.locked(cid) as rec:
        status = rec.current_status()
        if status is Status.STOPPED:
            raise StateError("cannot start a container that has stopped")
        if status is Status.RUNNING:
            raise StateError("cannot start an already running container")
        if status is not Status.CREATED:
            raise StateError(f"cannot start a container in the {status} state")
        spec = _spec_or_empty(rec)
        _hooks(spec, "startContainer", rec, Status.CREATED, fatal=True)
        from kata import ttrpc

        with lite_agent_of(rec) as agent:
            try:
                agent.check(5.0)
            except ttrpc.TTRPCError as exc:
                if exc.code != ttrpc.Code.UNAVAILABLE:
                    raise
                # The VM went after create, and the container's process with it. As for a process
                # that exits at once, start succeeds and the monitor reports the end (255): it
                # releases itself on the StartContainer it forwards. A failed start instead would
                # leave containerd's runc shim and Docker a task they can neither start nor delete.
                log.warning(f"start {cid}: its VM is gone; the container exits with 255")
                giving_back = None
            else:
                giving_back = _mirror_network(rec)
            try:
                agent.start_container(cid)
            except ttrpc.TTRPCError as exc:
                if exc.code != ttrpc.Code.UNAVAILABLE:
                    raise
            finally:
                if giving_back is not None:
                    giving_back.join()
        rec.status = transition(status, Status.RUNNING)
        store.save(rec)
        # The spec: a poststart hook's failure is logged, and the lifecycle goes on.
        _hooks(spec, "poststart", rec, Status.RUNNING, fatal=False)


def _mirror_network(rec: ContainerRecord) -> threading.Thread | None:
    """The interfaces Docker's (or CNI's) setup left in the container's namespace go into the VM
    before the container starts (a pod's member shares the network its sandbox mirrored).

    A pooled VM's NIC that no interface takes is given back beside the start instead, on the thread
    returned (to join): nothing in the container waits for it (the guest lets go of it seconds later
    in any case), and it cost a pooled `docker run --network none` 50 ms of its start."""
    from kata.sandbox import network

    if rec.sandbox:
        return None
    if network.may_have_endpoints(rec.pid, ours=rec.pooled_tap):
        from kata.sandbox.pod import Pod

        with agent_of(rec) as agent:
            Pod.attach(rec.id, agent).mirror_network()
        return None
    if not rec.pooled_tap:
        return None  # the common case (--network none, or no CNI yet): the sandbox service is not loaded
    thread = threading.Thread(target=_give_back_pooled_nic, args=(rec.id,), name="nic-give-back")
    thread.start()
    return thread


def _give_back_pooled_nic(cid: str) -> None:
    from kata.sandbox.pod import Pod

    try:
        Pod.attach(cid).give_back_pooled_nic()
    except Exception as exc:  # noqa: BLE001 - the container runs without; say why the NIC stayed
        log.warning(f"start {cid}: giving back the pooled VM's unused NIC: {one_line(exc)}")


def kill(store: ContainerStore, cid: str, signum: int, all_processes: bool = False) -> None:
    rec = store.load(cid)
    if rec.current_status() is Status.STOPPED:
        raise StateError("container not running")
    from kata import ttrpc

    with lite_agent_of(rec) as agent:
        try:
            agent.signal(cid, "", signum)
        except ttrpc.TTRPCError as exc:
            monitor = rec.monitor()
            if exc.code != ttrpc.Code.UNAVAILABLE or monitor is None:
                raise
            # The VM is gone. A container never started: the monitor still stands for its process,
            # and takes the signal, as runc's init process would. A started one's monitor exits 255
            # by itself, once the container's exec monitors have (a signal must not end it before
            # them: Docker would lose their exits).
            never_started = rec.status == Status.CREATED or (rec.status == Status.PAUSED
                                                               and rec.paused_from == Status.CREATED)
            if never_started:
                signal_process(monitor, signum)
            return
        if all_processes:
            for exec_id in rec.live_execs():
                try:
                    agent.signal(cid, exec_id, signum)
                except ttrpc.TTRPCError as exc:
                    log.debug(f"kill --all: exec {exec_id}: {exc}")


def pause(store: ContainerStore, cid: str) -> None:
    """runc pauses a created container as well as a running one; resume brings back either."""
    with store.locked(cid) as rec:
        status = rec.current_status()
        if status is Status.STOPPED:
            raise StateError("container not running")
        if status is Status.PAUSED:
            raise StateError("container already paused")
        with agent_of(rec) as agent:
            agent.pause_container(container_id=cid)
        rec.paused_from, rec.status = status, transition(status, Status.PAUSED)
        store.save(rec)


def resume(store: ContainerStore, cid: str) -> None:
    with store.locked(cid) as rec:
        status = rec.current_status()
        if status is not Status.PAUSED:
            raise StateError("container not paused")
        with agent_of(rec) as agent:
            agent.resume_container(container_id=cid)
        rec.status = transition(status, Status(rec.paused_from or Status.RUNNING))
        store.save(rec)


# ---- delete ---------------------------------------------------------------------------------
def delete(store: ContainerStore, cid: str, force: bool) -> None:
    """runc's rules: a running or paused container needs --force; --force of an unknown id is fine.
    An invalid id is an error before anything is looked at: --force tears down what an id names."""
    from kata.runc.state import ContainerNotFound

    validate_sandbox_id(cid)
    try:
        with store.locked(cid) as rec:
            status = rec.current_status()
            if status in LIVE and not force:
                raise StateError(f"cannot delete container {cid} that is not stopped: {status}")
            _destroy(store, rec)
            store.remove(cid)
    except ContainerNotFound:
        # As runc: a directory without a record (a create killed before its first save) goes, or
        # the id could never be used again.
        store.remove(cid)
        if not force:
            raise
        _destroy_sandbox(cid)  # a create killed half-way left no record, maybe a VM


def _destroy(store: ContainerStore, rec: ContainerRecord) -> None:
    """End the monitors and the VM with everything around it (a pod's member: its part of the
    pod's VM), then the poststop hooks."""
    monitor = rec.monitor()
    for proc in [*rec.live_execs().values(), *([monitor] if monitor else [])]:
        # As runc's --force: SIGKILL, so whoever waits on the monitor sees a death by signal 9.
        signal_process(proc, signal.SIGKILL)
        wait_exit(proc, 5.0)
    if rec.sandbox:
        _leave_pod(store, rec.id, rec.sandbox)
    else:
        _destroy_sandbox(rec.id)
    _hooks(_spec_or_empty(rec), "poststop", rec, Status.STOPPED, fatal=False)


def _destroy_sandbox(cid: str) -> None:
    """The pod's VM and what it had on the host, with the configuration it was made with."""
    from kata.sandbox.paths import has_state

    try:
        if not has_state(cid):
            return  # e.g. runc's shim's `delete --force` after a delete: the service is not loaded
        from kata.sandbox.pod import tear_down

        for problem in tear_down(cid):
            log.warning(f"delete {cid}: {problem}")
    except KataError as exc:
        log.debug(f"delete {cid}: {exc}")


def _spec_or_empty(rec: ContainerRecord) -> dict[str, Any]:
    """The config.json create validated, for its hooks; read again as is (it was checked then), but
    bounded: it may have been replaced by anything since. Not through kata.oci.spec, whose import
    `start` and `delete` (Docker's hot path) would pay for."""
    from kata.utils.files import read_regular_file

    try:
        spec = json.loads(read_regular_file(Path(rec.bundle) / "config.json"))
    except (OSError, ValueError, RecursionError):
        return {}  # the bundle may be gone by now (the caller removed it): no hooks to run then
    return spec if isinstance(spec, dict) else {}


def vm_running(store: ContainerStore, cid: str) -> bool:
    from kata.sandbox.pod import Pod

    try:
        hyp = Pod.attach(store.load(cid).sandbox_id()).sandbox.hypervisor
    except KataError:
        return False
    return hyp is not None and hyp.is_running()


# ---- exec -----------------------------------------------------------------------------------
def exec_process(store: ContainerStore, cid: str, process: dict[str, Any], *, console_socket: str | None,
                 foreground: bool, monitor: PendingMonitor) -> ProcessId:
    """Start ``process`` in the container, with ``monitor`` (started ahead, so that Python's start-up
    overlaps this work) standing for it."""
    import secrets

    try:
        rec = store.load(cid)
        status = rec.current_status()
        if status is Status.PAUSED:
            raise StateError("cannot exec in a paused container")
        if status is not Status.RUNNING:
            raise StateError("cannot exec in a stopped container" if status is Status.STOPPED
                             else f"cannot exec in a {status} container")
        terminal = bool(process.get("terminal"))
        check_console(terminal, console_socket, foreground)
    except BaseException:
        monitor.cancel()
        raise
    exec_id = secrets.token_hex(8)
    conf = {"role": "exec", "cid": cid, "exec_id": exec_id, "proxy": str(proxy_socket(rec.sandbox_id())),
            "terminal": terminal, "console_socket": console_socket, "foreground": foreground,
            "process": process}
    ident = monitor.configure(conf)
    from kata.sandbox.host_cgroups import join_pod

    try:
        join_pod(rec.sandbox_id(), ident.pid)  # where the init monitor is: the pod's host cgroup
    except KataError as exc:
        log.warning(f"exec in {cid}: the monitor stays out of the pod's cgroup: {exc}")
    with store.locked(cid) as rec:
        rec.execs = {k: [p.pid, p.start_time] for k, p in rec.live_execs().items()}
        rec.execs[exec_id] = [ident.pid, ident.start_time]
        store.save(rec)
    return ident


# ---- update ---------------------------------------------------------------------------------
def update(store: ContainerStore, cid: str, resources: dict[str, Any]) -> None:
    """New limits for the container; the VM grows by hotplug first when they would not fit."""
    from kata.sandbox.pod import Pod

    with store.locked(cid) as rec:
        if rec.current_status() is Status.STOPPED:
            raise StateError("container not running")
        with agent_of(rec) as agent:
            pod = Pod.attach(rec.sandbox_id(), agent)
            try:
                pod.update(cid, resources)
            finally:
                pod.release()
