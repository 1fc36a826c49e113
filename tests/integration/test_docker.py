"""Docker 20.10 with `--runtime kata` end to end: a real dockerd and containerd (tests/integration/
conftest.py), the locally built busybox image, every container in a VM of its own."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import inspect, pids_naming, wait_for
from tests.support.daemons import DaemonError, Dockerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 180
KATA = ("--runtime", "kata", "--network", "none")


def test_run_rm_with_output_and_exit_codes(docker: Dockerd) -> None:
    proc = docker.run("run", "--rm", *KATA, docker.image, "sh", "-c", "echo out; echo err >&2; exit 3",
                      timeout=TIMEOUT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    # It ran in a VM: the guest's kernel, not the host's.
    uname = docker.run("run", "--rm", *KATA, docker.image, "uname", "-r", timeout=TIMEOUT)
    host = open("/proc/sys/kernel/osrelease").read().strip()
    assert uname.returncode == 0 and uname.stdout.strip() != host
    # A missing command is "not found" (127) to Docker, as with runc.
    missing = docker.run("run", "--rm", *KATA, docker.image, "no-such-command", timeout=TIMEOUT)
    assert missing.returncode == 127 and "executable file not found" in missing.stderr, missing.stderr


def test_default_network_goes_through_the_setkey_hook(docker: Dockerd) -> None:
    """Without --network none, Docker's libnetwork-setkey prestart hook configures the namespace of
    the pid it is given (the monitor's, not the host's); the container sees loopback up, as under runc."""
    probe = ["cat", "/sys/class/net/lo/flags"]
    kata = docker.run("run", "--rm", "--runtime", "kata", docker.image, *probe, timeout=TIMEOUT)
    runc = docker.run("run", "--rm", docker.image, *probe, timeout=TIMEOUT)
    assert kata.returncode == 0, kata.stderr
    assert kata.stdout == runc.stdout == "0x9\n"


def test_tty_and_piped_stdin(docker: Dockerd) -> None:
    # What the process sees of its terminal, exactly as under runc.
    probe = ["sh", "-c", "tty; stty -a | head -3; echo x"]
    tty = docker.run("run", "--rm", "-t", *KATA, docker.image, *probe, timeout=TIMEOUT)
    assert tty.returncode == 0, tty.stderr
    runc = docker.run("run", "--rm", "-t", "--network", "none", docker.image, *probe, timeout=TIMEOUT)
    assert tty.stdout.startswith("/dev/pts/") and tty.stdout == runc.stdout
    piped = docker.run("run", "--rm", "-i", *KATA, docker.image, "sh", "-c", "cat; echo done",
                       input="from stdin\n", timeout=TIMEOUT)
    assert (piped.returncode, piped.stdout) == (0, "from stdin\ndone\n"), piped.stderr


def test_detached_exec_logs_top_pause_and_stop(docker: Dockerd) -> None:
    script = "echo started; trap 'echo got-term; exit 0' TERM; while true; do sleep 0.2; done"
    run = docker.run("run", "-d", "--name", "kd", *KATA, docker.image, "sh", "-c", script, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    try:
        wait_for(lambda: "started" in docker.run("logs", "kd", timeout=30).stdout, what="the first output")
        ex = docker.run("exec", "kd", "sh", "-c", "echo from-exec; exit 4", timeout=TIMEOUT)
        assert (ex.returncode, ex.stdout) == (4, "from-exec\n"), ex.stderr
        ex_i = docker.run("exec", "-i", "kd", "cat", input="piped\n", timeout=TIMEOUT)
        assert ex_i.stdout == "piped\n", ex_i.stderr
        top = docker.run("top", "kd", timeout=30)
        assert top.returncode == 0 and len(top.stdout.strip().splitlines()) >= 2, top.stdout + top.stderr

        assert docker.run("pause", "kd", timeout=60).returncode == 0
        assert inspect(docker, "kd")["State"]["Status"] == "paused"
        assert docker.run("unpause", "kd", timeout=60).returncode == 0
        assert inspect(docker, "kd")["State"]["Status"] == "running"

        # SIGTERM reaches the container's trap: stop returns long before its 30 s timeout.
        started = time.monotonic()
        stop = docker.run("stop", "-t", "30", "kd", timeout=TIMEOUT)
        assert stop.returncode == 0, stop.stderr
        assert time.monotonic() - started < 20
        state = inspect(docker, "kd")["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 0
        assert "got-term" in docker.run("logs", "kd", timeout=30).stdout
    finally:
        docker.run("rm", "-f", "kd", timeout=TIMEOUT)


def test_kill_rm_force_and_memory_limit(docker: Dockerd) -> None:
    for name in ("kk", "kr"):
        proc = docker.run("run", "-d", "--name", name, *KATA, docker.image, "sleep", "1000", timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
    try:
        assert docker.run("kill", "kk", timeout=60).returncode == 0
        wait_for(lambda: inspect(docker, "kk")["State"]["Status"] == "exited", what="kill")
        assert inspect(docker, "kk")["State"]["ExitCode"] == 137
        assert docker.run("rm", "-f", "kr", timeout=TIMEOUT).returncode == 0
        assert "kr" not in docker.run("ps", "-a", "--format", "{{.Names}}", timeout=30).stdout.split()
    finally:
        docker.run("rm", "-f", "kk", "kr", timeout=TIMEOUT)

    # --memory and --cpus size the VM, and the container sees its limits through its cgroup;
    # --init (docker-init, bind-mounted from the host) runs as PID 1 in the guest container.
    probe = ("cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; cat /proc/1/comm; "
             "awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo")
    mem = docker.run("run", "--rm", "--init", "--memory", "256m", "--cpus", "0.5", *KATA, docker.image,
                     "sh", "-c", probe, timeout=TIMEOUT)
    assert mem.returncode == 0, mem.stderr
    limit, quota, period, init, total_mib = mem.stdout.split()
    assert int(limit) == 256 * 2**20 and (quota, period) == ("50000", "100000") and init == "docker-init"
    assert int(total_mib) > 256  # the VM was sized for the limit on top of its default


def test_restart_policy(docker: Dockerd) -> None:
    proc = docker.run("run", "-d", "--name", "kre", "--restart", "on-failure:2", *KATA, docker.image,
                      "sh", "-c", "echo run; exit 1", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    try:
        def done() -> bool:
            state = inspect(docker, "kre")
            return bool(state["RestartCount"] == 2 and state["State"]["Status"] == "exited")

        wait_for(done, timeout=150, what="two restarts")
        assert docker.run("logs", "kre", timeout=30).stdout == "run\nrun\nrun\n"
    finally:
        docker.run("rm", "-f", "kre", timeout=TIMEOUT)


def test_exec_starting_when_the_vm_dies_ends_before_its_container(docker: Dockerd) -> None:
    """A VM that dies while `docker exec` is still starting: the exec must be reported before its
    container. dockerd 20.10 forgets a container's execs once it has handled the container's exit,
    and an exec whose exit comes later leaves `docker exec` waiting for ever. Under runc the order
    comes for free: a pid namespace's init is reaped after every other process in it.

    The test holds the container's record lock, so that kata-runtime exec stays in its last step
    (recording the exec) while the VM goes; the exec's monitor waits for it to exit, longer than the
    container's monitor used to wait for exec monitors."""
    name = "exec-vm-dies"
    assert docker.run("run", "-d", *KATA, "--name", name, docker.image, "sleep", "600",
                      timeout=TIMEOUT).returncode == 0
    ended: list[subprocess.CompletedProcess[str] | DaemonError] = []

    def exec_sleep() -> None:
        try:
            ended.append(docker.run("exec", name, "sh", "-c", "sleep 5", timeout=90))
        except DaemonError as exc:  # it hung: killed at the timeout
            ended.append(exc)

    waiter = threading.Thread(target=exec_sleep)
    try:
        cid = docker.run("inspect", "-f", "{{.Id}}", name, timeout=30).stdout.strip()
        records = [os.path.join(root, cid) for root, dirs, _files in os.walk(docker.exec_root)
                   if cid in dirs and os.path.exists(os.path.join(root, cid, "state.json"))]
        assert len(records) == 1, f"kata-runtime's records of {cid} under {docker.exec_root}: {records}"
        fd = os.open(records[0], os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            waiter.start()
            # kata-runtime exec waits for the lock once its monitor has started the process.
            wait_for(lambda: _lock_waited_for(os.fstat(fd).st_ino), 60, "kata-runtime exec at the lock")
            qemu = pids_naming("qemu-system", cid)
            assert qemu, f"no QEMU of {cid}"
            for pid in qemu:
                os.kill(pid, signal.SIGKILL)
            time.sleep(3.0)  # the container's monitor sees the VM go
        finally:
            os.close(fd)
        waiter.join(120)
        assert ended and not isinstance(ended[0], DaemonError), \
            "docker exec never returned: the exec's exit came after its container's"
        assert ended[0].returncode in (255, 137), (ended[0].returncode, ended[0].stderr)
        assert "Traceback" not in ended[0].stderr
    finally:
        docker.run("rm", "-f", name, timeout=TIMEOUT)
        if waiter.is_alive():
            waiter.join(120)


def test_an_exec_that_outlives_its_container_is_killed_with_it(docker: Dockerd) -> None:
    """With --pid=host the container shares the guest's pid namespace, so an exec's process outlives
    the container's. It is killed when the container's process ends, as runc's shim kills what is
    left of a container whose init has exited, and reported first (137): `docker exec` returns."""
    name = "exec-outlives"
    # The container ends a second after the exec has started (the exec makes /go).
    assert docker.run("run", "-d", *KATA, "--pid=host", "--name", name, docker.image, "sh", "-c",
                      "until [ -e /go ]; do sleep 0.1; done; sleep 1", timeout=TIMEOUT).returncode == 0
    ended: list[subprocess.CompletedProcess[str] | DaemonError] = []

    def exec_sleep() -> None:
        try:
            ended.append(docker.run("exec", name, "sh", "-c", "touch /go; exec sleep 120", timeout=100))
        except DaemonError as exc:
            ended.append(exc)

    waiter = threading.Thread(target=exec_sleep)
    try:
        waiter.start()
        assert docker.run("wait", name, timeout=90).stdout.strip() == "0"
        waiter.join(100)
        assert ended and not isinstance(ended[0], DaemonError), "docker exec did not return"
        assert ended[0].returncode == 137, (ended[0].returncode, ended[0].stderr)
        assert "Traceback" not in ended[0].stderr
    finally:
        docker.run("rm", "-f", name, timeout=TIMEOUT)
        waiter.join(100)


def _lock_waited_for(inode: int) -> bool:
    """Whether a process waits for a lock on the file with this inode (a "->" line of /proc/locks)."""
    return any("->" in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines())
