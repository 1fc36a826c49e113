"""podman 4.3 (Debian's, with conmon) with kata-runtime as its OCI runtime, end to end: the `podman` fixture
(tests/support/podman.py) keeps podman's storage, configuration, CNI network and cgroups private and fails
the module if anything of them, or a VM, is left."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import inspect, wait_for
from tests.support.netns import call_in_netns
from tests.support.podman import Podman

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 180
NO_NET = ("--network", "none")
TRAP_TERM = "echo started; trap 'echo got-term; exit 0' TERM; while true; do sleep 0.2; done"
PAGE = "hello from a kata pod\n"
SANDBOXES = Path("/run/vc/sbs")


def run_in_pty(argv: list[str], env: dict[str, str], rows: int = 30, cols: int = 100,
               timeout: float = TIMEOUT) -> tuple[int, str]:
    """``argv`` with a new pty as its stdin, stdout and stderr (``rows`` x ``cols``), as from a terminal;
    its exit status and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every slave descriptor is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        status = proc.wait(max(deadline - time.monotonic(), 1.0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    return status, out.decode(errors="replace")


def http_get(port: int) -> str:
    """One GET of / on 127.0.0.1:``port``; the body, or "" when nothing answered yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return ""
    return data.decode(errors="replace").partition("\r\n\r\n")[2]


def get_from_host(podman: Podman, port: int) -> str:
    """The page published on ``port``, fetched where podman runs (its network namespace is the host
    side of its network), retried while the server starts."""
    body = ""

    def answered() -> bool:
        nonlocal body
        body = call_in_netns(podman.netns, lambda: http_get(port))
        return bool(body)

    wait_for(answered, 60, f"an answer on port {port}")
    return body


@pytest.fixture(scope="module")
def www(podman: Podman) -> Path:
    """A directory of the host with an index page, for busybox httpd."""
    d = podman.base / "www"
    d.mkdir(exist_ok=True)
    (d / "index.html").write_text(PAGE)
    return d


def test_run_rm_exit_codes_and_runtime_by_path(podman: Podman) -> None:
    echo = podman.run("run", "--rm", *NO_NET, podman.image, "echo", "hi", timeout=TIMEOUT)
    assert (echo.returncode, echo.stdout) == (0, "hi\n"), echo.stderr
    proc = podman.run("run", "--rm", *NO_NET, podman.image, "sh", "-c", "echo out; echo err >&2; exit 3",
                      timeout=TIMEOUT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    # The runtime named by its path on the command line (podman then knows it by its file name), in
    # a VM: the guest's kernel, not the host's.
    uname = podman.run("--runtime", podman.runtime_path, "run", "--rm", *NO_NET, podman.image, "uname", "-r",
                       timeout=TIMEOUT)
    assert uname.returncode == 0, uname.stderr
    assert uname.stdout.strip() != Path("/proc/sys/kernel/osrelease").read_text().strip()
    # A VM cannot share the host's network namespace: refused in one line (Kata's limitation).
    host = podman.run("run", "--rm", "--network", "host", podman.image, "true", timeout=TIMEOUT)
    refusals = [line for line in host.stderr.splitlines() if "host networking is not supported" in line]
    assert host.returncode != 0 and len(refusals) == 1, host.stderr


def test_run_it_has_a_terminal_of_the_callers_size(podman: Podman) -> None:
    """conmon passes --console-socket to `create` and relays the pty's master it receives."""
    status, out = run_in_pty(podman.command("run", "--rm", "-it", *NO_NET, podman.image, "sh", "-c",
                                            "tty; stty size; echo done"), podman.env(), rows=30, cols=100)
    lines = out.replace("\r", "").splitlines()
    assert status == 0, out
    assert lines[-3:] == ["/dev/pts/0", "30 100", "done"], out


def test_detached_exec_logs_stop_kill_and_rm(podman: Podman) -> None:
    run = podman.run("run", "-d", "--name", "kd", *NO_NET, podman.image, "sh", "-c", TRAP_TERM,
                     timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    for name in ("kk", "ki"):  # sleep as PID 1 ignores SIGTERM: stop must wait, then kill
        proc = podman.run("run", "-d", "--name", name, *NO_NET, podman.image, "sleep", "1000",
                          timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
    try:
        wait_for(lambda: "started" in podman.run("logs", "kd", timeout=30).stdout, what="the first output")
        ex = podman.run("exec", "kd", "sh", "-c", "echo from-exec; exit 4", timeout=TIMEOUT)
        assert (ex.returncode, ex.stdout) == (4, "from-exec\n"), ex.stderr
        piped = podman.run("exec", "-i", "kd", "cat", input="piped\n", timeout=TIMEOUT)
        assert (piped.returncode, piped.stdout) == (0, "piped\n"), piped.stderr
        status, out = run_in_pty(podman.command("exec", "-it", "kd", "tty"), podman.env())
        assert status == 0 and "/dev/pts/" in out, out
        # ps(1) descriptors make podman run ps in the container: the guest's processes.
        top = podman.run("top", "kd", "-eo", "pid,comm", timeout=TIMEOUT)
        assert top.returncode == 0, top.stderr
        assert top.stdout.splitlines()[1].split() == ["1", "sh"], top.stdout
        assert podman.run("pause", "kd", timeout=60).returncode == 0
        assert inspect(podman, "kd")["State"]["Status"] == "paused"
        assert podman.run("unpause", "kd", timeout=60).returncode == 0
        assert inspect(podman, "kd")["State"]["Status"] == "running"

        # SIGTERM reaches the container's trap: stop returns long before its 30 s timeout.
        started = time.monotonic()
        stop = podman.run("stop", "-t", "30", "kd", timeout=TIMEOUT)
        assert stop.returncode == 0, stop.stderr
        assert time.monotonic() - started < 15
        state = inspect(podman, "kd")["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0)
        assert "got-term" in podman.run("logs", "kd", timeout=30).stdout

        # One that ignores SIGTERM is killed when the timeout is up.
        started = time.monotonic()
        stop = podman.run("stop", "-t", "2", "ki", timeout=TIMEOUT)
        elapsed = time.monotonic() - started
        assert stop.returncode == 0, stop.stderr
        assert 2 <= elapsed < 15, elapsed
        assert inspect(podman, "ki")["State"]["ExitCode"] == 137

        assert podman.run("kill", "kk", timeout=60).returncode == 0
        wait_for(lambda: inspect(podman, "kk")["State"]["Status"] == "exited", what="kill")
        assert inspect(podman, "kk")["State"]["ExitCode"] == 137
    finally:
        rm = podman.run("rm", "--force", "--time", "2", "kd", "kk", "ki", timeout=TIMEOUT)
    assert rm.returncode == 0, rm.stderr
    names = podman.run("ps", "-a", "--format", "{{.Names}}", timeout=30).stdout.split()
    assert not {"kd", "kk", "ki"} & set(names)


def test_memory_limit_sizes_the_vm(podman: Podman) -> None:
    probe = "cat /sys/fs/cgroup/memory.max; awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo"
    mem = podman.run("run", "--rm", "--memory", "256m", *NO_NET, podman.image, "sh", "-c", probe,
                     timeout=TIMEOUT)
    assert mem.returncode == 0, mem.stderr
    limit, total_mib = mem.stdout.split()
    assert int(limit) == 256 * 2**20
    assert int(total_mib) > 256  # the VM was sized for the limit on top of its default


def test_published_port_through_podmans_network(podman: Podman, www: Path) -> None:
    run = podman.run("run", "-d", "--name", "web", "-p", "18080:80", "-v", f"{www}:/www:ro", podman.image,
                     "httpd", "-f", "-p", "80", "-h", "/www", timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    try:
        assert get_from_host(podman, 18080) == PAGE
        addr = inspect(podman, "web")["NetworkSettings"]["Networks"][podman.network_name]["IPAddress"]
        assert addr.startswith("10.89.0.")  # podman's CNI network, mirrored into the VM
    finally:
        rm = podman.run("rm", "--force", "--time", "0", "web", timeout=TIMEOUT)
    assert rm.returncode == 0, rm.stderr


def test_pod_containers_share_one_vm_and_localhost(podman: Podman, www: Path) -> None:
    create = podman.run("pod", "create", "--name", "kp", "--cgroup-parent", podman.cgroup_parent,
                        "-p", "18081:80", timeout=60)
    assert create.returncode == 0, create.stderr
    try:
        server = ("httpd", "-f", "-p", "80", "-h", "/www")
        for args in (("--name", "srv", "-v", f"{www}:/www:ro", podman.image, *server),
                     ("--name", "trap", podman.image, "sh", "-c", TRAP_TERM)):
            proc = podman.run("run", "-d", "--pod", "kp", *args, timeout=TIMEOUT)
            assert proc.returncode == 0, proc.stderr
        # A third container reaches the server over localhost, in the pod's VM, named as the pod.
        client = podman.run("run", "--rm", "--pod", "kp", podman.image, "sh", "-c",
                            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 127.0.0.1 80; hostname",
                            timeout=TIMEOUT)
        assert client.returncode == 0, client.stderr
        assert client.stdout.endswith(f"{PAGE}kp\n"), client.stdout
        assert get_from_host(podman, 18081) == PAGE  # the pod's published port

        infra = podman.run("pod", "inspect", "kp", "--format", "{{.InfraContainerID}}",
                           timeout=30).stdout.strip()
        members = [inspect(podman, name)["Id"] for name in ("srv", "trap")]
        vms = {p.name for p in SANDBOXES.iterdir()}
        assert infra in vms and not set(members) & vms  # one VM, the infra container's

        # podman stops a pod's containers all at once: each ends as under runc, not with the VM.
        started = time.monotonic()
        stop = podman.run("pod", "stop", "-t", "3", "kp", timeout=TIMEOUT)
        assert stop.returncode == 0, stop.stderr
        assert time.monotonic() - started < 20
        codes = {name: inspect(podman, name)["State"]["ExitCode"] for name in ("srv", "trap")}
        assert codes == {"srv": 137, "trap": 0}  # httpd ignores SIGTERM as PID 1; the trap exits
    finally:
        rm = podman.run("pod", "rm", "--force", "--time", "0", "kp", timeout=TIMEOUT)
    assert rm.returncode == 0, rm.stderr
    assert infra not in {p.name for p in SANDBOXES.iterdir()}


def test_pod_member_with_a_network_of_its_own_is_refused(podman: Podman) -> None:
    """A VM has one network: a pod that does not share its network namespace cannot put its containers
    in the infra container's VM, and kata-runtime says so in one line."""
    create = podman.run("pod", "create", "--name", "kn", "--cgroup-parent", podman.cgroup_parent,
                        "--share", "ipc,uts", timeout=60)
    assert create.returncode == 0, create.stderr
    try:
        proc = podman.run("run", "--rm", "--pod", "kn", podman.image, "true", timeout=TIMEOUT)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if "must share its network namespace" in line]
        assert len(errors) == 1 and "(a VM has one network)" in errors[0], proc.stderr
    finally:
        with contextlib.suppress(Exception):
            podman.run("pod", "rm", "--force", "--time", "0", "kn", timeout=TIMEOUT)
    assert "kn" not in podman.run("pod", "ps", "--format", "{{.Name}}", timeout=30).stdout.split()
