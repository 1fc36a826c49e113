"""`kata-runtime run` end to end: real QEMU (TCG here), real guest kernel, image and agent."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import config_with, leftovers, process_gone, runtime_bin
from tests.support.bundles import make_busybox_bundle

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 180


def run(bundle: Path, cid: str, *extra: str, stdin: bytes | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([runtime_bin(), *extra, "run", "--bundle", str(bundle), cid],
                          input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout)


def test_boot_id_differs_from_host(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["cat", "/proc/sys/kernel/random/boot_id"])
    proc = run(bundle, cid)
    assert proc.returncode == 0, proc.stderr.decode()
    guest_boot_id = proc.stdout.decode().strip()
    host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert len(guest_boot_id) == 36
    assert guest_boot_id != host_boot_id
    assert leftovers(cid) == []


def test_exit_code_and_stderr(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    proc = run(bundle, cid)
    assert proc.returncode == 7, proc.stderr.decode()
    assert proc.stdout == b"out\n"
    assert b"err\n" in proc.stderr
    assert leftovers(cid) == []


def test_stdin_is_piped_to_cat(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["cat"])
    data = b"".join(b"line %d\n" % i for i in range(2000))
    proc = run(bundle, cid, stdin=data)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == data
    assert leftovers(cid) == []


def test_terminal_on_a_pty(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "tty; stty size; echo done"], terminal=True)
    pid, master = pty.fork()
    if pid == 0:  # child: the runtime with the pty as its controlling terminal
        os.execv(runtime_bin(), [runtime_bin(), "run", "--bundle", str(bundle), cid])
    out = b""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0, out
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text or "/dev/console" in text, text
    assert "done" in text
    assert leftovers(cid) == []


@pytest.mark.parametrize("target", ["monitor", "run"])
def test_signal_reaches_the_container(tmp_path: Path, cid: str, target: str) -> None:
    script = "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.1; done"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script])
    pid_file = tmp_path / "container.pid"
    proc = subprocess.Popen([runtime_bin(), "run", "--pid-file", str(pid_file), "--bundle", str(bundle), cid],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the container is running once it prints
        assert line == b"ready\n", proc.stderr.read() if proc.stderr else b""
        # The pid file names the host process that stands for the container (its monitor, a child of
        # `run`): signalling it reaches the container, and so does signalling `run` itself.
        monitor = int(pid_file.read_text())
        assert monitor != proc.pid and f"PPid:\t{proc.pid}\n" in Path(f"/proc/{monitor}/status").read_text()
        os.kill(monitor if target == "monitor" else proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"got-term" in out, err
    assert proc.returncode == 42
    assert leftovers(cid) == []


# ---- bad input: one line, non-zero, bounded time, nothing left -----------------------------

def _assert_clean_failure(proc: subprocess.CompletedProcess[bytes], cid: str, words: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    # One error line; warnings before it (e.g. the one-time TCG fall-back) are allowed.
    lines = err.strip().splitlines()
    assert lines[-1].startswith("kata-runtime: ") and words in lines[-1], err
    assert all("level=warning" in ln for ln in lines[:-1]), err
    assert leftovers(cid) == []


def test_missing_bundle(tmp_path: Path, cid: str) -> None:
    _assert_clean_failure(run(tmp_path / "nope", cid), cid, "nope")


def test_malformed_config(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "process": ')
    _assert_clean_failure(run(bundle, cid), cid, "config.json")


def test_missing_rootfs(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"]["path"] = "no-such-rootfs"
    (bundle / "config.json").write_text(json.dumps(spec))
    _assert_clean_failure(run(bundle, cid), cid, "rootfs")


def test_unknown_hypervisor_path(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    conf = config_with(tmp_path, {"hypervisor.qemu": {"path": "/nonexistent/qemu-system-x86_64",
                                                      "valid_hypervisor_paths": []}})
    _assert_clean_failure(run(bundle, cid, "--config", str(conf)), cid, "/nonexistent/qemu")


def test_guest_that_never_answers(tmp_path: Path, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    # busybox as PID 1 instead of the agent: the VM runs, nothing ever answers on the agent channel.
    # Its own template store: the template for this shape can never be made, and the failed attempt must
    # not leave a directory in the host's /run/vc/templates on every run.
    conf = config_with(tmp_path, {"hypervisor.qemu": {"kernel_params": "init=/bin/busybox",
                                                      "boot_timeout": 10.0},
                                  "factory": {"template_path": str(tmp_path / "templates")}})
    start = time.monotonic()
    proc = run(bundle, cid, "--config", str(conf), timeout=120)
    assert time.monotonic() - start < 60
    _assert_clean_failure(proc, cid, "agent")


def test_vm_sized_from_the_spec(tmp_path: Path, cid: str) -> None:
    """A memory limit and a CPU quota grow the VM over the defaults (Kata's static sizing)."""
    from kata.config import load_config

    default_mib = load_config().hypervisor.default_memory
    script = ("awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo; grep -c ^processor /proc/cpuinfo; "
              "cat /sys/fs/cgroup/memory.max")
    limit = 256 * 2**20
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["resources"] = {"memory": {"limit": limit}, "cpu": {"quota": 100000, "period": 100000}}
    (bundle / "config.json").write_text(json.dumps(spec))
    proc = run(bundle, cid)
    assert proc.returncode == 0, proc.stderr.decode()
    mem_mib, cpus, cgroup_max = proc.stdout.decode().split()
    # The guest kernel keeps some memory for itself: MemTotal is a little under what QEMU gives.
    assert int(mem_mib) > default_mib
    assert int(cpus) == min(2, os.cpu_count() or 1)
    assert int(cgroup_max) == limit  # the limit itself is enforced by the container's cgroup in the guest
    assert leftovers(cid) == []


def test_oci_process_semantics_in_the_guest(tmp_path: Path, cid: str) -> None:
    """One container, many checks: user, hostname, env, cwd, rlimits, capabilities, read-only root,
    masked and read-only paths, sysctls, bind mounts of host files."""
    host_file = tmp_path / "greeting"
    host_file.write_text("hello from the host\n")
    script = "; ".join([
        "echo user=$(id -u):$(id -g)", "echo host=$(hostname)", "echo env=$GREETING", "echo cwd=$(pwd)",
        "echo nofile=$(ulimit -n)", "echo capeff=$(awk '/CapEff/ {print $2}' /proc/self/status)",
        "touch /rootfs-write 2>/dev/null && echo rootfs=rw || echo rootfs=ro",
        "echo keys=$(wc -c < /proc/keys)",
        "echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo procsys=rw || echo procsys=ro",
        "echo msgmax=$(cat /proc/sys/kernel/msgmax)",
        "echo bind=$(cat /mnt/greeting)",
    ])
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script])
    spec = json.loads((bundle / "config.json").read_text())
    spec["hostname"] = "kata-guest-host"
    spec["root"]["readonly"] = True
    proc_spec = spec["process"]
    proc_spec["user"] = {"uid": 1000, "gid": 1000}
    proc_spec["env"].append("GREETING=hi")
    proc_spec["cwd"] = "/tmp"
    proc_spec["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}]
    proc_spec["capabilities"] = {k: ["CAP_KILL"] for k in ("bounding", "effective", "permitted")}
    spec["linux"]["sysctl"] = {"kernel.msgmax": "12345"}  # IPC-namespaced: allowed per container
    spec["mounts"].append({"destination": "/mnt/greeting", "type": "bind", "source": str(host_file),
                           "options": ["rbind", "ro"]})
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["mode=1777"]})
    (bundle / "config.json").write_text(json.dumps(spec))
    proc = run(bundle, cid)
    assert proc.returncode == 0, proc.stderr.decode()
    got = dict(line.split("=", 1) for line in proc.stdout.decode().split("\n") if "=" in line)
    assert got["user"] == "1000:1000"
    assert got["host"] == "kata-guest-host"
    assert got["env"] == "hi" and got["cwd"] == "/tmp"
    assert got["nofile"] == "321"
    assert got["capeff"] == "0000000000000000"  # a non-root user keeps no effective capabilities
    assert got["rootfs"] == "ro"
    assert got["keys"] == "0"  # masked: /dev/null over it
    assert got["procsys"] == "ro"
    assert got["msgmax"] == "12345"
    assert got["bind"] == "hello from the host"
    assert leftovers(cid) == []


@pytest.mark.parametrize("victim", ["qemu", "virtiofsd"])
def test_vm_dying_under_a_running_container(tmp_path: Path, cid: str, victim: str) -> None:
    """The VMM, or virtiofsd (the guest's filesystem would hang), killed under a running container:
    `run` fails at once with one line and cleans up everything."""
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "echo ready; while :; do sleep 1; done"])
    proc = subprocess.Popen([runtime_bin(), "run", "--bundle", str(bundle), cid],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        pid_file = "qemu.pid" if victim == "qemu" else "vhost-fs.sock.pid"
        pid = int((Path("/run/vc/vm") / cid / pid_file).read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    lines = err.decode().strip().splitlines()
    assert "Traceback" not in err.decode()
    assert lines and lines[-1].startswith("kata-runtime: "), err
    assert leftovers(cid) == []


def test_vm_gone_between_create_and_start(tmp_path: Path, cid: str) -> None:
    """QEMU killed after create: the monitor stays for the process (as runc's init waits on its exec
    fifo) until start, which then succeeds with a process that has ended (255, as for a VM gone);
    its exit comes after start, which containerd's runc shim and Docker can follow."""
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "600"])
    cli = [runtime_bin(), "--root", str(tmp_path / "root")]
    with open(tmp_path / "out", "wb") as out:
        subprocess.run([*cli, "create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), cid],
                       check=True, stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    try:
        monitor = int((tmp_path / "pid").read_text())
        os.kill(int((Path("/run/vc/vm") / cid / "qemu.pid").read_text()), signal.SIGKILL)
        time.sleep(1.0)
        assert not process_gone(monitor), "the monitor left before start"
        state = json.loads(subprocess.run([*cli, "state", cid], capture_output=True, timeout=60).stdout)
        assert state["status"] == "created"
        start = subprocess.run([*cli, "start", cid], capture_output=True, timeout=60)
        assert start.returncode == 0, start.stderr
        deadline = time.monotonic() + 30
        while not process_gone(monitor):
            assert time.monotonic() < deadline, "the monitor outlived its started process"
            time.sleep(0.1)
    finally:
        delete = subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=60)
    assert delete.returncode == 0, delete.stderr
    assert leftovers(cid) == []


def test_an_idle_guest_stops_its_tick(tmp_path: Path, cid: str) -> None:
    """While the container sleeps, the guest's CPU idles without a periodic tick (NO_HZ_IDLE, which
    needs the CPU's ARAT flag under TCG): far fewer local timer interrupts than HZ (100) a second.
    Each one costs QEMU a wake-up, so an idle pod's host CPU follows from this."""
    probe = "grep LOC: /proc/interrupts; sleep 3; grep LOC: /proc/interrupts"
    proc = run(make_busybox_bundle(tmp_path / "b", ["sh", "-c", probe]), cid)
    assert proc.returncode == 0, proc.stderr.decode()
    before, after = (int(line.split()[1]) for line in proc.stdout.decode().splitlines())
    assert after - before < 150, f"{after - before} timer interrupts in 3 s of idle"
    assert leftovers(cid) == []
