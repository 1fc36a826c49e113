"""Faults: QEMU, virtiofsd, the pod's shim or a container's monitor is killed (SIGKILL) at a random
point of create/start, exec or delete, through the real clients: containerd with the kata shim v2,
containerd's runc shim driving kata-runtime, and Docker. At least 100 rounds (a fixed seed, so a
failure replays; KATA_FAULT_SEED picks another). Every round must end reported (the task stopped
with 255, or 137 where the killed process stood for the container's own, or a one-line error) and
leave nothing (processes, mounts, state, network namespaces), and the daemons keep working.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import leftovers
from tests.integration.conftest import daemons_unavailable
from tests.support.daemons import Containerd, Dockerd, Runtime, docker_daemons, kata_runtime_path
from tests.support.hang_report import HangWatch

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

SEED = int(os.environ.get("KATA_FAULT_SEED", "20261206"))
TIMEOUT = 120.0
# Exit statuses of a task whose VM, shim or monitor was killed under it: Kata's 255 for a VM gone,
# 128+SIGKILL where the killed process stood for the container's own (a monitor, or a dead shim's
# `shim delete` answer).
KILLED = {255, 137}
KATA_SHIM = "io.containerd.kata.v2"

# (client, victim) pairs and how many rounds each gets: 108 in all.
PLAN: list[tuple[str, str, int]] = [
    ("shim", "qemu", 12), ("shim", "virtiofsd", 12), ("shim", "shim", 12),
    ("runc", "qemu", 12), ("runc", "virtiofsd", 12), ("runc", "monitor", 12),
    ("docker", "qemu", 12), ("docker", "virtiofsd", 12), ("docker", "monitor", 12),
]
PHASES = ("create", "exec", "delete")

PATTERNS = {
    "qemu": (b"qemu-system",),
    "virtiofsd": (b"virtiofsd",),
    "shim": (b"containerd-shim-kata-v2",),
    "monitor": (b"kata.runc.monitor",),
}
WATCHED = (b"qemu-system", b"virtiofsd", b"containerd-shim-kata-v2", b"kata.runc.monitor")


def _cmdlines() -> dict[int, bytes]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
    return found


def _ours() -> set[int]:
    """Every process of the kinds a round may start (so that a round's own are the new ones)."""
    return {pid for pid, cmd in _cmdlines().items() if any(w in cmd for w in WATCHED)}


def _netns() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


@dataclass
class Killer:
    """Kills, once, every new process of ``kind`` (not in ``before``; ``extra`` bytes in its command
    line too) ``delay`` seconds after the first one appears. Armed for one phase of one round."""

    kind: str
    delay: float
    before: set[int]
    extra: bytes = b""
    killed: list[int] = field(default_factory=list)
    what: list[str] = field(default_factory=list)  # their command lines, for a failure's story
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _victims(self) -> list[int]:
        words = (*PATTERNS[self.kind], self.extra)
        return [pid for pid, cmd in _cmdlines().items()
                if pid not in self.before and all(w in cmd for w in words if w)]

    def _run(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self._victims():
                break
            time.sleep(0.01)
        if self._stop.wait(self.delay):
            return
        cmdlines = _cmdlines()
        for pid in self._victims():
            try:
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                self.what.append(cmdlines.get(pid, b"?")[:100].replace(b"\0", b" ").decode(errors="replace"))
            except ProcessLookupError:
                pass

    def __enter__(self) -> Killer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Disarm; wait for a kill that is due now, so the round sees its effect."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5.0)


def _one_line_error(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, f"{what}: {proc.stderr}"


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _settled(client: Client, name: str, timeout: float) -> tuple[str, int]:
    """The task's status once it no longer runs (or still "running" after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        state, code = client.status(name)
        if state != "running" or time.monotonic() > deadline:
            return state, code
        time.sleep(0.2)


class Client:
    """One container manager's verbs for a round's container ``name``."""

    def run_detached(self, name: str) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def exec(self, name: str) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def stop_and_remove(self, name: str) -> list[subprocess.CompletedProcess[str]]:
        raise NotImplementedError

    def status(self, name: str) -> tuple[str, int]:
        """("running" | "stopped" | "", exit status)."""
        raise NotImplementedError

    def force_remove(self, name: str) -> None:
        raise NotImplementedError

    def log_text(self) -> str:
        raise NotImplementedError

    def sandbox_id(self, name: str) -> str:
        return name


class Ctr(Client):
    def __init__(self, containerd: Containerd, shim: bool) -> None:
        self.c = containerd
        self.runtime_args = ["--runtime", KATA_SHIM] if shim else ["--runc-binary", kata_runtime_path()]

    def run_detached(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.c.ctr("run", "-d", *self.runtime_args, self.c.image, name, "sleep", "600",
                          timeout=TIMEOUT)

    def exec(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.c.ctr("task", "exec", "--exec-id", "fx", name, "sh", "-c", "sleep 0.5; exit 3",
                          timeout=TIMEOUT)

    def stop_and_remove(self, name: str) -> list[subprocess.CompletedProcess[str]]:
        kill = self.c.ctr("task", "kill", "-s", "SIGKILL", name, timeout=TIMEOUT)
        _wait(lambda: self.status(name)[0] != "running", 30)
        return [kill, self.c.ctr("task", "delete", name, timeout=TIMEOUT)]

    def status(self, name: str) -> tuple[str, int]:
        """A stopped task is deleted to learn its exit status (ctr prints it then)."""
        out = self.c.ctr("task", "ls", timeout=30).stdout.splitlines()[1:]
        for fields in (line.split() for line in out):
            if fields and fields[0] == name:
                state = fields[2].lower()
                if state == "stopped":
                    info = self.c.ctr("task", "delete", name, timeout=TIMEOUT)  # reports the status
                    code = re.search(r"exit code (\d+)", info.stderr)
                    return "stopped", int(code.group(1)) if code else -1
                return state, 0
        return "", 0

    def force_remove(self, name: str) -> None:
        self.c.ctr("task", "delete", "--force", name, timeout=TIMEOUT)
        self.c.ctr("container", "delete", name, timeout=60)

    def log_text(self) -> str:
        return self.c.log.read_text(errors="replace")


class Docker(Client):
    def __init__(self, docker: Dockerd) -> None:
        self.d = docker

    def run_detached(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.d.run("run", "-d", "--runtime", "kata", "--network", "none", "--name", name, self.d.image,
                          "sleep", "600", timeout=TIMEOUT)

    def exec(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.d.run("exec", name, "sh", "-c", "sleep 0.5; exit 3", timeout=TIMEOUT)

    def stop_and_remove(self, name: str) -> list[subprocess.CompletedProcess[str]]:
        return [self.d.run("rm", "-f", name, timeout=TIMEOUT)]

    def status(self, name: str) -> tuple[str, int]:
        proc = self.d.run("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name, timeout=30)
        if proc.returncode != 0:
            return "", 0
        state, code = proc.stdout.split()
        return ("running" if state == "running" else "stopped" if state == "exited" else state), int(code)

    def force_remove(self, name: str) -> None:
        self.d.run("rm", "-f", name, timeout=TIMEOUT)

    def log_text(self) -> str:
        return self.d.log.read_text(errors="replace") + self.d.containerd.log.read_text(errors="replace")

    def sandbox_id(self, name: str) -> str:
        proc = self.d.run("inspect", "-f", "{{.Id}}", name, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else name


@pytest.fixture(scope="module")
def clients(containerd: Containerd) -> Iterator[dict[str, Client]]:
    reason = daemons_unavailable()
    if reason:
        pytest.skip(reason)
    with docker_daemons(runtimes={"kata": Runtime(kata_runtime_path())}) as dockerd:
        yield {"shim": Ctr(containerd, shim=True), "runc": Ctr(containerd, shim=False),
               "docker": Docker(dockerd)}
    assert dockerd.leftovers() == [] and dockerd.containerd.leftovers() == []


def _round(client: Client, victim: str, phase: str, rng: random.Random, name: str) -> str:
    """One round; returns what happened, for the failure message of a later check."""
    netns_before = _netns()
    before = _ours()
    log_before = len(client.log_text())
    story = f"{name}: kill {victim} during {phase}"
    assert not any(w in name.encode() for w in PATTERNS[victim])
    print(story, flush=True)
    sid = name
    try:
        if phase == "create":
            with Killer(victim, rng.uniform(0.0, 2.5), before) as killer:
                proc = client.run_detached(name)
        else:
            proc = client.run_detached(name)
            assert proc.returncode == 0, f"{story}: setup failed: {proc.stderr}"
            extra = b"exec" if victim == "monitor" and phase == "exec" else b""
            with Killer(victim, rng.uniform(0.0, 0.6 if phase == "exec" else 0.3), before, extra) as killer:
                procs = [client.exec(name)] if phase == "exec" else client.stop_and_remove(name)
            for p in procs:
                _one_line_error(p, story)
            if phase == "exec" and not killer.killed:
                assert procs[0].returncode == 3, f"{story}: exec without a kill: {procs[0].stderr}"
            elif phase == "exec":
                assert procs[0].returncode != 3 or victim != "monitor", f"{story}: a killed exec exited 3"
        _one_line_error(proc, story)
        sid = client.sandbox_id(name)
        story += f" (killed {killer.what}, create exit {proc.returncode})"
        if killer.killed and phase != "delete":
            # Reported: the task stops, with a VM-gone or killed status (a kill of an exec's own
            # monitor ends that exec alone).
            exec_only = victim == "monitor" and phase == "exec"
            if proc.returncode == 0 and not exec_only:
                state, code = _settled(client, name, 60)
                # containerd drops the tasks of a shim that died, once `shim delete` has answered for
                # them (its exit event carries that answer, 137): ctr then lists no task.
                gone = victim == "shim" and state == ""
                assert gone or (state == "stopped" and code in KILLED), f"{story}: {state} {code}"
    finally:
        client.force_remove(name)
    # Nothing is left: every process the round started, the sandbox's traces, its network namespace.
    assert _wait(lambda: not (_ours() - before), 60), f"{story}: left {sorted(_ours() - before)}"
    assert _wait(lambda: leftovers(sid) == [], 30), f"{story}: left {leftovers(sid)}"
    assert _netns() <= netns_before, f"{story}: left netns {_netns() - netns_before}"
    assert "Traceback" not in client.log_text()[log_before:], f"{story}: a traceback in the daemon's log"
    return story


def test_faults_at_random_points_leave_nothing(clients: dict[str, Client]) -> None:
    rng = random.Random(SEED)
    rounds = [(c, v, rng.choice(PHASES)) for c, v, n in PLAN for _ in range(n)]
    rng.shuffle(rounds)
    assert len(rounds) >= 100
    done = []
    for i, (client, victim, phase) in enumerate(rounds):
        # The name must not contain a victim's pattern: the killer matches command lines. A round
        # that lasts (a call about to time out) is looked at while it hangs, for the failure's story.
        failure: Exception | None = None
        with HangWatch(TIMEOUT - 30) as watch:
            try:
                done.append(_round(clients[client], victim, phase, rng, f"fault-{i}-{client}"))
            except Exception as exc:  # noqa: BLE001 - raised below, with the report once it is complete
                failure = exc
        if failure is not None:
            if not watch.report:
                raise failure
            raise AssertionError(f"fault-{i}-{client}: {failure}\nas it hung:\n{watch.report}") from failure
    # The daemons keep working, with both kinds of shim and with Docker.
    ok = clients["shim"].run_detached("after-faults-shim")
    clients["shim"].force_remove("after-faults-shim")
    assert ok.returncode == 0, ok.stderr
    ok = clients["runc"].run_detached("after-faults-runc")
    clients["runc"].force_remove("after-faults-runc")
    assert ok.returncode == 0, ok.stderr
    ok = clients["docker"].run_detached("after-faults-docker")
    clients["docker"].force_remove("after-faults-docker")
    assert ok.returncode == 0, ok.stderr
