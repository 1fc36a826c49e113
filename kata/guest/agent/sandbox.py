"""The agent's model of the sandbox: containers, their processes, and the crun calls that drive them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from kata.guest.agent import log
from kata.guest.agent.crun import ConsoleSocket, Crun, CrunError
from kata.guest.agent.devices import fix_device_modes
from kata.guest.agent.layout import helpers_fixed, keep_container_randomised
from kata.guest.agent.reaper import Exit, Reaper
from kata.guest.agent.settle import SETTLE_LIMIT, exe_of, wait_settled
from kata.guest.agent.stdio import Stdio
from kata.utils.ids import id_problem

RUN_DIR = "/run/kata-containers"


class NotFound(Exception):
    pass


class AlreadyExists(Exception):
    pass


class InvalidArgument(Exception):
    pass


# Plain classes, not dataclasses, and json imported on first use: both cost start-up time in the guest.
class Process:
    def __init__(self, *, exec_id: str, pid: int, exit: Exit, stdio: Stdio, terminal: bool) -> None:
        self.exec_id = exec_id  # "" for the container's init
        self.pid = pid
        self.exit = exit
        self.stdio = stdio
        self.terminal = terminal
        self.waited = False  # a WaitProcess has had its status


class Container:
    def __init__(self, *, id: str, bundle: str, spec: dict[str, Any], init: Process | None = None) -> None:
        self.id = id
        self.bundle = bundle
        self.spec = spec
        self.init = init
        self.execs: dict[str, Process] = {}
        self.started = False
        # While the init may still be starting up: what ran it before the start (crun's init), and
        # when the start was; a signal in that window waits for it to settle (kata.guest.agent.settle).
        self.launcher: str | None = None
        self.started_at = 0.0

    @property
    def log_file(self) -> str:
        return os.path.join(self.bundle, "crun.log")


def _rmtree(path: str) -> None:
    import shutil  # only on removal: shutil's own imports cost start-up time in the guest

    shutil.rmtree(path, ignore_errors=True)


def _parse_json(data: bytes, what: str) -> Any:
    import json

    try:
        return json.loads(data)
    except ValueError as e:
        raise InvalidArgument(f"{what} is not JSON: {e}") from None


def _check_id(id_: str, what: str) -> None:
    """Ids name the container's directory and its exec files here: the host checks them too, but
    the guest builds its own paths, so it checks what it is given (defence in depth)."""
    problem = id_problem(id_)
    if problem:
        raise InvalidArgument(f"{what}: {problem}")


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


class Sandbox:
    def __init__(self, reaper: Reaper, crun: Crun, run_dir: str = RUN_DIR) -> None:
        self.reaper = reaper
        self.crun = crun
        self.run_dir = run_dir
        self.id = ""
        self._lock = threading.Lock()
        self.containers: dict[str, Container] = {}
        self._consoles = 0

    # lookups -------------------------------------------------------------------------------
    def container(self, cid: str) -> Container:
        with self._lock:
            c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid!r} not found")
        return c

    def process(self, cid: str, exec_id: str) -> Process:
        c = self.container(cid)
        p = c.init if not exec_id else c.execs.get(exec_id)
        if p is None:
            what = f"exec {exec_id!r}" if exec_id else "init process"
            raise NotFound(f"{what} of container {cid!r} not found")
        return p

    # lifecycle -----------------------------------------------------------------------------
    def _start_process(
        self, c: Container, args: list[str], terminal: bool, pid_file: str, exec_id: str
    ) -> Process:
        """Run a crun verb that leaves a process behind (create, exec --detach) and adopt it."""
        stdio: Stdio
        os.makedirs(self.run_dir, exist_ok=True)
        console: ConsoleSocket | None = None
        if terminal:
            # Not under the bundle: ids can be 64 characters and sun_path holds only 108.
            with self._lock:
                self._consoles += 1
                n = self._consoles
            console = ConsoleSocket(os.path.join(self.run_dir, f".console-{n}.sock"))
            args = [args[0], "--console-socket", console.path, *args[1:]]
            stdio = Stdio()
        else:
            stdio = Stdio.pipes()
        try:
            try:
                self.crun.run(args, log_file=c.log_file, stdio=None if terminal else stdio.child_fds())
            finally:
                if not terminal:
                    stdio.close_child_fds()
            if console is not None:
                stdio.tty_master = console.receive()
            pid = _read_pid(pid_file)
        except BaseException:
            stdio.close()
            raise
        finally:
            if console is not None:
                console.close()
        return Process(exec_id=exec_id, pid=pid, exit=self.reaper.register(pid), stdio=stdio,
                       terminal=terminal)

    def create_container(self, cid: str, spec_json: bytes) -> None:
        _check_id(cid, "container id")
        spec = _parse_json(spec_json, f"OCI spec of {cid!r}")
        if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
            raise InvalidArgument(f"OCI spec of {cid!r} has no process")
        if helpers_fixed():
            import json

            keep_container_randomised(spec)
            # Written as parsed, so that crun reads what was checked (duplicate keys and all).
            spec_json = json.dumps(spec).encode()
        bundle = os.path.join(self.run_dir, cid)
        with self._lock:
            if cid in self.containers:
                raise AlreadyExists(f"container {cid!r} already exists")
            c = Container(id=cid, bundle=bundle, spec=spec)
            self.containers[cid] = c
        try:
            os.makedirs(bundle, exist_ok=True)
            with open(os.path.join(bundle, "config.json"), "wb") as f:
                f.write(spec_json)
            pid_file = os.path.join(bundle, "init.pid")
            terminal = bool(spec["process"].get("terminal"))
            args = ["create", "--bundle", bundle, "--pid-file", pid_file, cid]
            c.init = self._start_process(c, args, terminal, pid_file, "")
        except BaseException:
            with self._lock:
                self.containers.pop(cid, None)
            _rmtree(bundle)
            raise
        fix_device_modes(c.init.pid, spec)
        log.info(f"created container {cid} init pid {c.init.pid}")

    def start_container(self, cid: str) -> None:
        c = self.container(cid)
        if c.started:
            raise InvalidArgument(f"container {cid!r} already started")
        c.launcher = exe_of(c.init.pid) if c.init is not None else None
        self.crun.run(["start", cid], log_file=c.log_file)
        c.started_at = time.monotonic()
        c.started = True
        log.info(f"started container {cid}")

    def exec_process(self, cid: str, exec_id: str, process_json: bytes) -> None:
        c = self.container(cid)
        _check_id(exec_id, "exec id")
        proc = _parse_json(process_json, f"process of exec {exec_id!r}")
        if not isinstance(proc, dict):
            raise InvalidArgument(f"process of exec {exec_id!r} is not an object")
        with self._lock:
            if exec_id in c.execs:
                raise AlreadyExists(f"exec {exec_id!r} already exists in {cid!r}")
        self._forget_finished_execs(c)
        proc_file = os.path.join(c.bundle, f"exec-{exec_id}.json")
        pid_file = os.path.join(c.bundle, f"exec-{exec_id}.pid")
        with open(proc_file, "wb") as f:
            f.write(process_json)
        args = ["exec", "--process", proc_file, "--detach", "--pid-file", pid_file, cid]
        try:
            p = self._start_process(c, args, bool(proc.get("terminal")), pid_file, exec_id)
        finally:
            for path in (proc_file, pid_file):  # read by crun and by us: done with
                try:
                    os.unlink(path)
                except OSError:
                    pass
        with self._lock:
            c.execs[exec_id] = p
        log.info(f"exec {exec_id} in {cid}: pid {p.pid}")

    def _forget_finished_execs(self, c: Container) -> None:
        """Execs that have exited, had their status taken and their output read to its end hold
        nothing anyone will ask for again: their descriptors go (a container that runs thousands of
        execs must not run the agent out of them)."""
        with self._lock:
            done = [k for k, p in c.execs.items() if p.waited and p.exit.done() and p.stdio.drained()]
            finished = [c.execs.pop(k) for k in done]
        for p in finished:
            p.stdio.close()

    def signal_process(self, cid: str, exec_id: str, sig: int) -> None:
        p = self.process(cid, exec_id)
        if p.exit.done():
            return  # nothing left to signal; the shim signals exited processes routinely
        c = self.container(cid)
        launcher, since = c.launcher, time.monotonic() - c.started_at
        if not exec_id and launcher and since < SETTLE_LIMIT:
            # A stop right after the start: the signal waits until the workload can take it (a
            # PID 1 without its handler yet would drop a SIGTERM). Only this window pays the wait.
            waited = wait_settled(p.pid, launcher, SETTLE_LIMIT - since)
            log.info(f"signal {sig} to {cid} waited {waited * 1000:.0f} ms for its process to settle")
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass

    def wait_process(self, cid: str, exec_id: str) -> int:
        p = self.process(cid, exec_id)
        code = p.exit.wait()
        assert code is not None
        p.waited = True
        return code

    def remove_container(self, cid: str, timeout: float | None = None) -> None:
        c = self.container(cid)
        try:
            self.crun.run(["delete", "--force", cid], log_file=c.log_file)
        except CrunError as e:
            # A container whose create half-failed may be unknown to crun: kill what we know.
            log.warn(f"remove {cid}: {e}")
            _kill_processes(c)
        for p in [c.init, *c.execs.values()]:
            if p is not None:
                p.exit.wait(timeout or 10.0)
                p.stdio.close()
        with self._lock:
            self.containers.pop(cid, None)
        _rmtree(c.bundle)
        log.info(f"removed container {cid}")

    def kill_all(self) -> None:
        with self._lock:
            containers = list(self.containers.values())
        for c in containers:
            _kill_processes(c)

    def pause(self, cid: str) -> None:
        c = self.container(cid)
        self.crun.run(["pause", cid], log_file=c.log_file)

    def resume(self, cid: str) -> None:
        c = self.container(cid)
        self.crun.run(["resume", cid], log_file=c.log_file)

    def update(self, cid: str, resources_json: bytes) -> None:
        c = self.container(cid)
        _parse_json(resources_json, f"resources of {cid!r}")
        path = os.path.join(c.bundle, "resources.json")
        with open(path, "wb") as f:
            f.write(resources_json)
        self.crun.run(["update", "--resources", path, cid], log_file=c.log_file)

    def list_processes(self, cid: str, fmt: str) -> bytes:
        c = self.container(cid)
        out = self.crun.run(["ps", "--format", "json", cid], log_file=c.log_file, capture=True)
        if fmt == "json":
            return out
        if fmt not in ("", "table"):
            raise InvalidArgument(f"unknown process list format {fmt!r}")
        lines = ["PID CMD"]
        for pid in _parse_json(out or b"[]", "crun ps output"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").strip().decode(errors="replace")
            except OSError:
                cmd = "?"
            lines.append(f"{pid} {cmd}")
        return ("\n".join(lines) + "\n").encode()

    def cgroup_dir(self, cid: str) -> str:
        """The container's cgroup v2 directory, as its init process sees it from the agent."""
        p = self.process(cid, "")
        with open(f"/proc/{p.pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return "/sys/fs/cgroup" + line[3:].strip()
        raise NotFound(f"container {cid!r} has no cgroup v2 membership")


def _kill_processes(c: Container) -> None:
    """SIGKILL every process of ``c`` still running (its init and execs)."""
    for p in [c.init, *c.execs.values()]:
        if p is not None and not p.exit.done():
            try:
                os.kill(p.pid, 9)
            except ProcessLookupError:
                pass
