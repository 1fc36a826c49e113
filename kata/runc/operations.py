"""The runc lifecycle on VMs: what `create`, `start`, `kill`, `delete`, `exec`, `pause`, `resume` and
`update` do, with runc's state rules and wording. One container per sandbox (VM), named alike.

`create` boots the VM, creates the container in it and hands the agent connection to the init
monitor, which stands for the container's process on the host from then on; every later command
reaches the agent through that monitor's proxy socket.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata.errors import KataError, strerror
from kata.runc.state import ContainerRecord, ContainerStore, now_rfc3339
from kata.sandbox.paths import SandboxPaths, validate_sandbox_id
from kata.utils.process import ProcessId, signal_process, wait_exit

if TYPE_CHECKING:
    import subprocess

    from kata import ttrpc
    from kata.agent_client.client import AgentClient
    from kata.agent_client.lite import LiteAgent
    from kata.config import RuntimeConfig
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
    """A ttrpc connection to the agent, through the container's monitor."""
    from kata import ttrpc
    from kata.agent_client.transport import TransportError, connect
    from kata.protocols.agent_api import AgentEndpoint

    if rec.current_status() == "stopped":
        raise StateError("container not running")
    try:
        return ttrpc.Client(connect(AgentEndpoint("serial", path=str(proxy_socket(rec.id))), 5.0))
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


def _config_of(rec: ContainerRecord) -> RuntimeConfig:
    from kata.config import apply_annotations, load_config

    cfg = load_config(Path(rec.config) if rec.config else None)
    return apply_annotations(cfg, rec.annotations)


def _hooks(spec: dict[str, Any], kind: str, rec: ContainerRecord, status: str, fatal: bool) -> None:
    """Run the spec's ``kind`` hooks with the state runc gives them (``status``, and the pid of the
    process standing for the container while there is one)."""
    hooks = spec.get("hooks")
    if not isinstance(hooks, dict) or not hooks.get(kind):
        return
    from kata.oci.hooks import run_hooks, state_for_hooks

    pid = rec.pid if status != "stopped" else 0
    state = state_for_hooks(rec.id, status, rec.bundle, pid=pid, annotations=rec.annotations)
    run_hooks(spec, kind, state, fatal=fatal, log=log)


def _host_network(bundle: Bundle) -> bool:
    """No network namespace, or the one we run in (Docker's --net=host names its own by path)."""
    from kata.utils import netns

    ns = next((n for n in bundle.namespaces if n.type == "network"), None)
    if ns is None:
        return True
    return ns.path is not None and netns.is_ours(ns.path)


def _enter_network_namespace(bundle: Bundle, pin_at: Path) -> tuple[str, bool]:
    """Move into the container's network namespace, where the VMM and the monitor live (see
    kata.utils.netns). A new one is pinned at ``pin_at``, so that `start` and `delete` find it
    after the processes in it are gone. Returns (its path, whether we pinned it)."""
    from kata.utils import netns

    for ns in bundle.namespaces:
        if ns.type == "network":
            if ns.path:
                netns.enter(ns.path)
                return ns.path, False
            netns.unshare()
            netns.pin(str(pin_at))
            return str(pin_at), True
    return "", False


# ---- create ---------------------------------------------------------------------------------
def _check_before_boot(cid: str, bundle: Bundle, cfg: RuntimeConfig) -> None:
    """Whatever in the bundle would fail the container, found before anything is made for it:
    what the guest cannot be given, the VM's sizing, the network it would need."""
    from kata.sandbox.container import check_container
    from kata.sandbox.sandbox import size_vm

    check_container(bundle, cid)
    size_vm(cfg, bundle.spec)
    if _host_network(bundle):
        # Kata's documented limitation: the host's interfaces cannot be mirrored into a VM.
        raise KataError("host networking is not supported: the container runs in a VM, which cannot "
                        "share the host's network namespace")


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
    from kata.config import apply_annotations, load_config
    from kata.oci.spec import load_bundle
    from kata.runc import monitor_launch as monitor_proc
    from kata.sandbox.container import Container
    from kata.sandbox.sandbox import Sandbox
    from kata.sandbox.timings import Timings

    timings = Timings()
    validate_sandbox_id(cid)  # the container is a sandbox of its own, named alike
    bundle = load_bundle(bundle_dir.resolve())
    cfg = apply_annotations(load_config(config_path), bundle.annotations)
    terminal = bool(bundle.spec.get("process", {}).get("terminal", False))
    _check_before_boot(cid, bundle, cfg)
    check_console(terminal, console_socket, foreground)
    store.reserve(cid)
    rec = ContainerRecord(id=cid, bundle=str(bundle.path), rootfs=str(bundle.root_path),
                          created=now_rfc3339(),
                          config=str(cfg.source), annotations=dict(bundle.annotations), status="creating",
                          owner="root" if os.geteuid() == 0 else str(os.geteuid()))
    sandbox: Sandbox | None = None
    monitor: monitor_proc.PendingMonitor | None = None
    try:
        store.save(rec)
        rec.netns, rec.netns_pinned = _enter_network_namespace(bundle, store.dir(cid) / "netns")
        store.save(rec)
        monitor = monitor_proc.PendingMonitor([cid])
        sandbox = Sandbox.create(cid, cfg, bundle.spec, debug=debug, timings=timings)
        Container(sandbox, cid, bundle).create()
        assert sandbox.hypervisor is not None
        agent_ep = sandbox.hypervisor.agent_endpoint()
        vm = [[p.pid, p.start_time] for p in sandbox.vm_processes()]
        sandbox.release()
        conf = {"role": "init", "cid": cid, "agent": agent_ep._asdict(), "proxy": str(proxy_socket(cid)),
                "terminal": terminal, "console_socket": console_socket, "foreground": foreground, "vm": vm}
        ident = monitor.configure(conf)
        timings.mark("monitor_ready")
        rec.pid, rec.pid_start, rec.status = ident.pid, ident.start_time, "created"
        store.save(rec)
        for kind in ("prestart", "createRuntime", "createContainer"):
            _hooks(bundle.spec, kind, rec, "creating", fatal=True)
        timings.mark("hooks_done")
        log.debug(f"timings {timings.as_json()}")  # bench/run_vs_runc.py reads this line
        return rec, monitor.proc
    except BaseException:
        if monitor is not None:
            monitor.cancel()
        if sandbox is not None:
            sandbox.destroy()
        if rec.netns_pinned:
            from kata.utils import netns

            netns.unpin(rec.netns)
        try:
            store.remove(cid)
        except KataError as exc:  # the create's own failure is the one to report
            log.warning(f"create {cid}: {exc}")
        raise


# ---- start, kill, pause, resume -------------------------------------------------------------
def start(store: ContainerStore, cid: str) -> None:
    with store.locked(cid) as rec:
        status = rec.current_status()
        if status == "stopped":
            raise StateError("cannot start a container that has stopped")
        if status == "running":
            raise StateError("cannot start an already running container")
        if status != "created":
            raise StateError(f"cannot start a container in the {status} state")
        spec = _spec_or_empty(rec)
        _hooks(spec, "startContainer", rec, "created", fatal=True)
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
            else:
                _mirror_network(store, rec)
            try:
                agent.start_container(cid)
            except ttrpc.TTRPCError as exc:
                if exc.code != ttrpc.Code.UNAVAILABLE:
                    raise
        rec.status = "running"
        store.save(rec)
        # The spec: a poststart hook's failure is logged, and the lifecycle goes on.
        _hooks(spec, "poststart", rec, "running", fatal=False)


def _mirror_network(store: ContainerStore, rec: ContainerRecord) -> None:
    """The interfaces Docker's (or CNI's) setup left in the container's namespace go into the VM."""
    from kata.sandbox import network as networking

    if not rec.netns or not networking.may_have_endpoints(rec.pid):
        return
    with agent_of(rec) as agent:
        made = networking.mirror(rec.netns, SandboxPaths(rec.id).vm_dir, agent)
    rec.network = [list(pair) for pair in made]
    store.save(rec)


def kill(store: ContainerStore, cid: str, signum: int, all_processes: bool = False) -> None:
    rec = store.load(cid)
    if rec.current_status() == "stopped":
        raise StateError("container not running")
    from kata import ttrpc

    with lite_agent_of(rec) as agent:
        try:
            agent.signal(cid, "", signum)
        except ttrpc.TTRPCError as exc:
            monitor = rec.monitor()
            if exc.code != ttrpc.Code.UNAVAILABLE or monitor is None:
                raise
            # The VM is gone and the monitor still stands for the process (it was never started):
            # the signal goes to the monitor, as runc's goes to its init process.
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
        if status == "stopped":
            raise StateError("container not running")
        if status == "paused":
            raise StateError("container already paused")
        with agent_of(rec) as agent:
            agent.pause_container(container_id=cid)
        rec.paused_from, rec.status = status, "paused"
        store.save(rec)


def resume(store: ContainerStore, cid: str) -> None:
    with store.locked(cid) as rec:
        if rec.current_status() != "paused":
            raise StateError("container not paused")
        with agent_of(rec) as agent:
            agent.resume_container(container_id=cid)
        rec.status = rec.paused_from or "running"
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
            if status in ("running", "paused") and not force:
                raise StateError(f"cannot delete container {cid} that is not stopped: {status}")
            _destroy(rec)
            store.remove(cid)
    except ContainerNotFound:
        # As runc: a directory without a record (a create killed before its first save) goes, or
        # the id could never be used again.
        store.remove(cid)
        if not force:
            raise
        _destroy_leftovers(cid)


def _destroy(rec: ContainerRecord) -> None:
    """End the monitors and the VM with everything around it, then the poststop hooks."""
    from kata.sandbox.sandbox import Sandbox

    monitor = rec.monitor()
    for proc in [*rec.live_execs().values(), *([monitor] if monitor else [])]:
        # As runc's --force: SIGKILL, so whoever waits on the monitor sees a death by signal 9.
        signal_process(proc, signal.SIGKILL)
        wait_exit(proc, 5.0)
    try:
        Sandbox.attach(rec.id, _config_of(rec)).destroy()
    except KataError as exc:
        log.debug(f"delete {rec.id}: {exc}")
    if rec.network:
        from kata.sandbox import network as networking

        networking.unmirror(rec.netns, rec.network)
    _hooks(_spec_or_empty(rec), "poststop", rec, "stopped", fatal=False)
    if rec.netns_pinned:
        from kata.utils import netns

        netns.unpin(rec.netns)


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


def _destroy_leftovers(cid: str) -> None:
    """A sandbox without a record (a create that was killed half-way): tear down what exists."""
    if not SandboxPaths(cid).state_dir.exists():
        return
    from kata.config import load_config
    from kata.sandbox.sandbox import Sandbox

    try:
        Sandbox.attach(cid, load_config(None)).destroy()
    except KataError as exc:
        log.debug(f"delete {cid}: {exc}")


def vm_running(store: ContainerStore, cid: str) -> bool:
    from kata.sandbox.sandbox import Sandbox

    try:
        hyp = Sandbox.attach(cid, _config_of(store.load(cid))).hypervisor
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
        if status == "paused":
            raise StateError("cannot exec in a paused container")
        if status != "running":
            raise StateError("cannot exec in a stopped container" if status == "stopped"
                             else f"cannot exec in a {status} container")
        terminal = bool(process.get("terminal"))
        check_console(terminal, console_socket, foreground)
    except BaseException:
        monitor.cancel()
        raise
    exec_id = secrets.token_hex(8)
    conf = {"role": "exec", "cid": cid, "exec_id": exec_id, "proxy": str(proxy_socket(cid)),
            "terminal": terminal, "console_socket": console_socket, "foreground": foreground,
            "process": process}
    ident = monitor.configure(conf)
    with store.locked(cid) as rec:
        rec.execs = {k: [p.pid, p.start_time] for k, p in rec.live_execs().items()}
        rec.execs[exec_id] = [ident.pid, ident.start_time]
        store.save(rec)
    return ident


# ---- update ---------------------------------------------------------------------------------
def update(store: ContainerStore, cid: str, resources: dict[str, Any]) -> None:
    """New limits for the container; the VM grows by hotplug first when they would not fit."""
    from kata.sandbox.sandbox import Sandbox

    rec = store.load(cid)
    if rec.current_status() == "stopped":
        raise StateError("container not running")
    sandbox = Sandbox.attach(cid, _config_of(rec))
    try:
        with agent_of(rec) as agent:
            _grow_vm(sandbox, agent, resources)
            agent.update_container(container_id=cid, resources_json=json.dumps(resources).encode())
    finally:
        sandbox.release()


def _grow_vm(sandbox: Any, agent: AgentClient, resources: dict[str, Any]) -> None:
    """The VM was sized as the configured default plus the container's limit (see vm_sizing):
    a larger limit gets the difference hot-added, as Kata does."""
    limit = (resources.get("memory") or {}).get("limit")
    if limit and limit > 0:
        sandbox.grow_memory(agent, sandbox.cfg.hypervisor.default_memory + -(-int(limit) // (1024 * 1024)))
