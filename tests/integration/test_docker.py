"""Docker 20.10 with `--runtime kata` end to end: a real dockerd and containerd (tests/integration/
conftest.py), the locally built busybox image, every container in a VM of its own."""

from __future__ import annotations

import time

import pytest

from tests.conftest import inspect, wait_for
from tests.support.daemons import Dockerd

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
