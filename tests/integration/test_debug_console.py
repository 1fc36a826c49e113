"""`kata-runtime debug-console`: a root shell in a running sandbox's guest, through a real pty and
piped, for a sandbox of the runc command line and for a pod of containerd's kata shim; refused in
one line when the console is off. Real VMs (restored from their own template: the console is part
of the VM's shape)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import config_with, leftovers, runtime_bin
from tests.support.bundles import make_busybox_bundle
from tests.support.daemons import Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 180
HOST_KERNEL = os.uname().release


def console(sid: str, script: bytes, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[bytes]:
    """A piped session (stdin is no terminal)."""
    return subprocess.run([runtime_bin(), "debug-console", sid], input=script, capture_output=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]


def start_sandbox(tmp: Path, cid: str, config: Path) -> None:
    bundle = make_busybox_bundle(tmp / "b", ["sleep", "1000000"])
    with open(tmp / "run.err", "wb") as err:
        proc = subprocess.run([runtime_bin(), "--root", str(tmp / "root"), "--config", str(config), "run",
                               "-d", "--bundle", str(bundle), cid], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=TIMEOUT)
    assert proc.returncode == 0, (tmp / "run.err").read_text()


def remove_sandbox(tmp: Path, cid: str) -> None:
    subprocess.run([runtime_bin(), "--root", str(tmp / "root"), "delete", "--force", cid],
                   capture_output=True, timeout=TIMEOUT)
    assert leftovers(cid) == []


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A runc-path sandbox (kata-runtime run -d) whose VM has the console."""
    tmp = tmp_path_factory.mktemp("console")
    cid = f"t-console-{os.getpid()}"
    try:
        start_sandbox(tmp, cid, config_with(tmp, {"agent.kata": {"debug_console_enabled": True}}))
        yield cid
    finally:
        remove_sandbox(tmp, cid)


def read_until(fd: int, pattern: bytes, deadline: float, out: bytearray, start: int = 0) -> re.Match[bytes]:
    """Read the pty until ``pattern`` appears in ``out`` after ``start``."""
    while (found := re.compile(pattern, re.DOTALL).search(out, start)) is None:
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in {bytes(out)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side of the pty is closed
                chunk = b""
            assert chunk, f"the terminal closed before {pattern!r}: {bytes(out)!r}"
            out += chunk
    return found


def console_pid(sandbox: str) -> int:
    for pid in os.listdir("/proc"):
        try:
            if f"debug-console\0{sandbox}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        except (OSError, ValueError):
            continue
    raise AssertionError("no debug-console process")


def test_a_shell_on_the_operators_terminal(sandbox: str) -> None:
    # The command runs on a pty, as from an operator's terminal, twice in a row (the second time
    # ended by SIGTERM); a shell around it shows the terminal's settings before and after, and the
    # command's statuses.
    command = f"{runtime_bin()} debug-console {sandbox}; echo rc=$?"
    pid, master = pty.fork()
    if pid == 0:
        os.execv("/bin/sh", ["/bin/sh", "-c", f"stty -g; {command}; {command}; stty -g"])
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out = bytearray()
    deadline = time.monotonic() + 90
    try:
        start = 0
        for session in (1, 2):
            # Typed once the guest's shell prompts: going raw, the command drops what was typed before.
            start = read_until(master, rb"built-in shell \(ash\).*?# ", deadline, out, start).end()
            # The marker is split in the typed line: only the command's output has it whole.
            os.write(master, b"echo K''ERNEL=$(uname -r)=; stty size; tty\r")
            found = read_until(master, rb"KERNEL=([^=\s]+)=\r\n40 120\r\n/dev/pts/\d+\r\n", deadline, out,
                               start)
            assert found.group(1).decode() != HOST_KERNEL, (found.group(1), HOST_KERNEL)
            if session == 1:
                # The pty is the shell's controlling terminal: ^C reaches its foreground job.
                os.write(master, b"sleep 600\r")
                time.sleep(0.5)
                os.write(master, b"\x03echo A''FTER\r")
                start = read_until(master, rb"AFTER\r\n", deadline, out, found.end()).end()
                os.write(master, b"exit\r")
            else:
                os.kill(console_pid(sandbox), signal.SIGTERM)
            start = read_until(master, rb"rc=\d+\r\n", deadline, out, start).end()
        read_until(master, rb"[0-9a-f]+(:[0-9a-f]+)+\r\n", deadline, out, start)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(master)
    assert re.findall(rb"rc=(\d+)", out) == [b"0", b"143"], bytes(out)
    text = bytes(out).decode(errors="replace")
    settings = [ln for ln in text.replace("\r", "").split("\n")
                if re.fullmatch(r"[0-9a-f]+(:[0-9a-f]+)+", ln)]
    assert len(settings) == 2 and settings[0] == settings[1], text  # the terminal left as it was found
    assert os.waitstatus_to_exitcode(status) == 0


def test_piped_sessions(sandbox: str) -> None:
    # A script's view: the guest's kernel, the status of the shell, no prompt or echo.
    first = console(sandbox, b"uname -r\nexit 7\n")
    assert first.returncode == 7, first.stderr
    assert re.fullmatch(rb"\S+\n", first.stdout), first.stdout
    assert first.stdout.strip() != HOST_KERNEL.encode(), first.stdout
    # The shell is root in the guest's own namespaces: it sees the container's process, and the agent
    # as PID 1.
    second = console(sandbox, b"id -u\nps -o args | grep -c '^[s]leep 1000000'\n"
                              b"tr '\\0' ' ' </proc/1/cmdline\n")
    assert second.returncode == 0, second.stderr
    uid, sleeps, init = second.stdout.decode().splitlines()
    assert uid == "0" and sleeps == "1" and "kata-agent" in init, second.stdout


def test_the_guest_root_is_the_image_in_persistent_memory(sandbox: str) -> None:
    # The runtime's default: the image mapped into the guest and mounted with DAX (its files are
    # read from the host's page cache, not cached again by every guest).
    out = console(sandbox, b"awk '$5 == \"/\" {print $3, $6}' /proc/self/mountinfo\n"
                           b"cat /sys/block/pmem0/dev; grep -o 'dax=always' /proc/mounts\n")
    assert out.returncode == 0, out.stderr
    root, pmem0, dax = out.stdout.decode().splitlines()
    assert root.split()[0] == pmem0 and root.split()[1].startswith("ro"), out.stdout
    assert dax == "dax=always", out.stdout
    # The guest is root: it writes over the device's last 64 KiB as a hostile guest would. The
    # host's image, which every VM maps, is unchanged.
    image = Path("/usr/share/kata-containers/kata-containers.img")
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    wrote = console(sandbox, b"n=$(( $(cat /sys/block/pmem0/size) / 8 ))\n"
                             b"dd if=/dev/urandom of=/dev/pmem0 bs=4K count=16 seek=$((n - 16)) conv=fsync\n")
    assert wrote.returncode == 0, wrote.stderr
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "the guest wrote the host's image"


def test_a_host_that_goes_ends_its_shell(sandbox: str) -> None:
    proc = subprocess.Popen([runtime_bin(), "debug-console", sandbox], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"sleep 4242 & echo started\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"started\n"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while (left := console(sandbox, b"ps -o args | grep -c '^[s]leep 4242' || true\n")).stdout != b"0\n":
        assert time.monotonic() < deadline, left
        time.sleep(0.5)


def test_the_console_is_roots_alone(sandbox: str) -> None:
    sock = Path("/run/vc/vm") / sandbox / "console.sock"
    # QEMU made it under umask 077, in the VM's root-only directory, as the agent's socket.
    assert sock.stat().st_uid == 0 and stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    other = console(sandbox, b"id\n", user=65534, group=65534, cwd="/")
    assert other.returncode != 0
    assert other.stderr.decode().splitlines() == [
        "kata-runtime: debug-console: only root may open a guest's console"]


def test_refused_in_one_line(tmp_path: Path, cid: str, sandbox: str) -> None:
    vm_dirs = set(os.listdir("/run/vc/vm"))
    unknown = console("no-such-sandbox", b"")
    assert unknown.returncode != 0
    assert unknown.stderr.decode().splitlines() == ["kata-runtime: sandbox no-such-sandbox does not exist"]
    bad = console("../x", b"")
    assert bad.returncode != 0 and len(bad.stderr.decode().splitlines()) == 1
    assert set(os.listdir("/run/vc/vm")) == vm_dirs

    # The console off (the default): no channel in the VM, and the command says so.
    config = config_with(tmp_path, {"agent.kata": {"debug_console_enabled": False}})
    start_sandbox(tmp_path, cid, config)
    try:
        assert not (Path("/run/vc/vm") / cid / "console.sock").exists()
        off = console(cid, b"uname -r\n")
        assert off.returncode != 0 and off.stdout == b""
        assert off.stderr.decode().splitlines() == [
            f"kata-runtime: the debug console is disabled for sandbox {cid} (set [agent.kata] "
            f"debug_console_enabled = true in {config})"]
    finally:
        remove_sandbox(tmp_path, cid)


def test_a_pod_of_containerds_kata_shim(containerd: Containerd, tmp_path: Path, cid: str) -> None:
    config = config_with(tmp_path, {"agent.kata": {"debug_console_enabled": True}})
    try:
        proc = containerd.ctr("run", "--runtime", "io.containerd.kata.v2", "--runtime-config-path",
                              str(config), "-d", containerd.image, cid, "sleep", "1000000", timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        shell = console(cid, b"uname -r; ps -o args | grep -c '^[s]leep 1000000'\n")
        assert shell.returncode == 0, shell.stderr
        kernel, sleeps = shell.stdout.decode().split()
        assert kernel != HOST_KERNEL and sleeps == "1", shell.stdout
    finally:
        containerd.ctr("task", "delete", "--force", cid, timeout=TIMEOUT)
        containerd.ctr("container", "delete", cid, timeout=60)
