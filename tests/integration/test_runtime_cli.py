"""kata-runtime driven as runc is: `--root --log --log-format json`, create/start/state/exec/ps/pause/
resume/kill/delete, hooks, a console socket, sizing and update. Real VMs; one VM serves many checks."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata.utils.mount import mounts_under
from tests.conftest import config_with, leftovers, process_gone, runtime_bin
from tests.support.bundles import make_busybox_bundle
from tests.support.mounts import PROBE_WRITE, mount_tmpfs, shared_volume

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 120


class Runtime:
    """kata-runtime with runc's global flags, as containerd's shim passes them."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log

    def __call__(self, *args: str, check: bool = True, input: bytes = b"", cwd: Path | None = None,
                 timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """Run it to its exit. Its output goes through files: a process it leaves running (a
        detached exec's monitor) keeps them open, as it would keep pipes, which we would wait on."""
        argv = [runtime_bin(), "--root", str(self.root), "--log", str(self.log), "--log-format", "json",
                *args]
        out, err = (self.log.with_name(f"cmd.{n}") for n in ("out", "err"))
        with open(out, "wb") as o, open(err, "wb") as e:
            code = subprocess.run(argv, input=input, stdout=o, stderr=e, timeout=timeout, cwd=cwd).returncode
        proc = subprocess.CompletedProcess(argv, code, out.read_bytes(), err.read_bytes())
        if check:
            assert proc.returncode == 0, f"{args}: {proc.stderr.decode()}"
        assert b"Traceback" not in proc.stderr, proc.stderr.decode()
        return proc

    def state(self, cid: str) -> dict[str, Any]:
        return dict(json.loads(self("state", cid).stdout))

    def last_error(self) -> dict[str, Any]:
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [entry for entry in lines if entry["level"] == "error"][-1]


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return Runtime(tmp_path / "root", tmp_path / "log.json")


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def all_leftovers(cid: str, rt: Runtime) -> list[str]:
    found = leftovers(cid)
    if (rt.root / cid).exists():
        found.append(f"state {rt.root / cid}")
    return found


@pytest.fixture
def running(tmp_path: Path, rt: Runtime, cid: str) -> Iterator[tuple[str, Path]]:
    """A detached container with its stdout in a file: `sleep` until killed."""
    script = "trap 'echo got-term; exit 42' TERM; echo started; while true; do sleep 0.2; done"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script])
    out = tmp_path / "out"
    # As with runc, the container's process keeps the descriptors create got: files, not pipes we
    # would wait on for EOF.
    try:
        with open(out, "wb") as f, open(tmp_path / "err", "wb") as err:
            proc = subprocess.run([runtime_bin(), "--root", str(rt.root), "create", "--pid-file",
                                   str(tmp_path / "init.pid"), cid], cwd=bundle, stdin=subprocess.DEVNULL,
                                  stdout=f, stderr=err, timeout=TIMEOUT)
        assert proc.returncode == 0, (tmp_path / "err").read_text()
        yield cid, tmp_path
    finally:
        rt("delete", "--force", cid, check=False)
        assert all_leftovers(cid, rt) == []


def test_lifecycle_like_runc(rt: Runtime, running: tuple[str, Path]) -> None:
    cid, tmp = running
    pid = int((tmp / "init.pid").read_text())
    st = rt.state(cid)
    assert st["status"] == "created" and st["pid"] == pid and st["id"] == cid
    assert Path(st["bundle"]) == tmp / "b"
    # The monitor lives in a network namespace of its own, as the container's process would.
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    # runc pauses a created container too; resume brings it back to created.
    rt("pause", cid)
    assert rt.state(cid)["status"] == "paused"
    assert b"paused state" in rt("start", cid, check=False).stderr
    rt("resume", cid)
    assert rt.state(cid)["status"] == "created"

    rt("start", cid)
    assert rt.state(cid)["status"] == "running"
    # A second start is refused as runc refuses it.
    again = rt("start", cid, check=False)
    assert again.returncode != 0 and b"running" in again.stderr

    # exec in the foreground: output and exit status.
    ex = rt("exec", cid, "sh", "-c", "echo from-exec; exit 7", check=False)
    assert ex.returncode == 7 and ex.stdout == b"from-exec\n", ex.stderr.decode()
    # Under TCG the agent's helpers run at fixed addresses; the container's init and its execs
    # keep address-space randomisation (kata.guest.agent.layout).
    pers = rt("exec", cid, "sh", "-c", "cat /proc/1/personality /proc/self/personality "
              "/proc/sys/kernel/randomize_va_space").stdout.split()
    assert pers == [b"00000000", b"00000000", b"2"], pers
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):  # TCG: the helpers did run at fixed addresses
        assert b"agent.helper_aslr=off" in rt("exec", cid, "cat", "/proc/cmdline").stdout.split()
    # exec --process FILE --detach --pid-file, as Docker does: the pid names the exec's monitor.
    (tmp / "p.json").write_text(json.dumps({"args": ["sleep", "30"], "cwd": "/", "env": ["PATH=/bin"],
                                            "user": {"uid": 0, "gid": 0}}))
    rt("exec", "--process", str(tmp / "p.json"), "--detach", "--pid-file", str(tmp / "e.pid"), cid)
    exec_pid = int((tmp / "e.pid").read_text())
    assert not process_gone(exec_pid)
    assert sorted(json.loads(rt("ps", "--format", "json", cid).stdout)) == sorted([pid, exec_pid])
    table = rt("ps", cid).stdout.decode()
    assert "sleep 30" in table and "PID" in table

    rt("pause", cid)
    assert rt.state(cid)["status"] == "paused"
    assert rt("exec", cid, "true", check=False).returncode != 0
    rt("resume", cid)
    assert rt.state(cid)["status"] == "running"

    listing = json.loads(rt("list", "--format", "json").stdout)
    assert [c["id"] for c in listing] == [cid] and listing[0]["status"] == "running"
    stats = json.loads(rt("events", "--stats", cid).stdout)
    assert stats["type"] == "stats" and stats["data"]["pids"]["current"] >= 2

    # delete without --force refuses a running container, in runc's words, in the JSON log too.
    refused = rt("delete", cid, check=False)
    assert refused.returncode != 0
    assert "cannot delete container" in rt.last_error()["msg"] and "not stopped" in rt.last_error()["msg"]

    # An exec in the foreground, to see what it reports when the container's init ends under it.
    fg_exec = subprocess.Popen([runtime_bin(), "--root", str(rt.root), "exec", cid, "sleep", "100"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    # kill by name: the trap runs in the guest and the monitor exits with the container's status.
    rt("kill", cid, "TERM")
    wait_gone(pid)
    wait_gone(exec_pid)  # its container's init is gone, and with it the exec
    assert fg_exec.wait(timeout=30) == 137  # killed with the container's pid namespace, as with runc
    assert rt.state(cid)["status"] == "stopped"
    assert (tmp / "out").read_bytes() == b"started\ngot-term\n"
    assert rt("kill", cid, "9", check=False).returncode != 0
    rt("delete", cid)
    assert rt("state", cid, check=False).returncode != 0


def test_delete_races_with_delete_force(rt: Runtime, running: tuple[str, Path]) -> None:
    """containerd runs `delete` and `delete --force` from two processes once the container stopped:
    one deletes it, the other finds nothing (in words containerd takes as "already gone")."""
    cid, tmp = running
    rt("start", cid)
    rt("kill", cid, "KILL")
    wait_gone(int((tmp / "init.pid").read_text()))
    argv = [runtime_bin(), "--root", str(rt.root), "delete"]
    procs = [subprocess.Popen([*argv, *flags, cid], stderr=subprocess.PIPE) for flags in ([], ["--force"])]
    results = [(p.wait(timeout=TIMEOUT), p.stderr.read().decode() if p.stderr else "") for p in procs]
    assert results[1] == (0, ""), results
    assert results[0][0] == 0 or "does not exist" in results[0][1], results
    assert all_leftovers(cid, rt) == []


def test_unknown_ids_and_bad_bundles(tmp_path: Path, rt: Runtime, cid: str) -> None:
    for verb in (["state"], ["start"], ["kill"], ["delete"], ["pause"], ["exec"], ["ps"]):
        args = [*verb, cid] + (["true"] if verb == ["exec"] else [])
        proc = rt(*args, check=False)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert "does not exist" in rt.last_error()["msg"]
    rt("delete", "--force", cid)  # runc: --force of an unknown container is not an error

    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "process": ')
    bad = rt("create", "--bundle", str(bundle), cid, check=False)
    assert bad.returncode != 0 and "config.json" in bad.stderr.decode()
    assert all_leftovers(cid, rt) == []
    bad_id = rt("create", "--bundle", str(bundle), "../x", check=False)
    assert bad_id.returncode != 0 and "invalid id" in bad_id.stderr.decode()


def test_hooks_run_in_order_with_the_state(tmp_path: Path, rt: Runtime, cid: str) -> None:
    record = tmp_path / "hooks.log"
    script = tmp_path / "hook.sh"
    # Each hook appends its name and the state it read; it also checks the pid's network namespace.
    script.write_text(f"#!/bin/sh\necho \"$1 $(cat)\" >> {record}\n")
    script.chmod(0o755)
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "exit 0"])
    spec = json.loads((bundle / "config.json").read_text())
    kinds = ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"]
    spec["hooks"] = {k: [{"path": str(script), "args": ["hook", k]}] for k in kinds}
    (bundle / "config.json").write_text(json.dumps(spec))
    rt("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), cid)
    rt("start", cid)
    wait_gone(int((tmp_path / "pid").read_text()))
    rt("delete", cid)
    lines = record.read_text().splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines] == kinds
    states = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in lines}
    assert states["prestart"]["status"] == "creating" and states["prestart"]["id"] == cid
    assert states["prestart"]["pid"] == int((tmp_path / "pid").read_text())
    assert states["poststart"]["status"] == "running"
    assert states["poststop"]["status"] == "stopped"
    assert all_leftovers(cid, rt) == []


def test_failing_prestart_hook_fails_create_and_cleans_up(tmp_path: Path, rt: Runtime, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["hooks"] = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 3"]}]}
    (bundle / "config.json").write_text(json.dumps(spec))
    proc = rt("create", "--bundle", str(bundle), cid, check=False)
    assert proc.returncode != 0 and "prestart" in proc.stderr.decode()
    assert all_leftovers(cid, rt) == []


def _run_to_exit(rt: Runtime, bundle: Path, cid: str, tmp_path: Path) -> str:
    """create + start + wait + delete, as containerd's runc shim does; the container's stdout."""
    out, err = tmp_path / "out", tmp_path / "err"
    try:
        # The container's output goes where create's went (files: the monitor keeps them open).
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.run([runtime_bin(), "--root", str(rt.root), "create", "--bundle", str(bundle),
                                   "--pid-file", str(tmp_path / "pid"), cid], stdin=subprocess.DEVNULL,
                                  stdout=o, stderr=e, timeout=TIMEOUT)
        assert proc.returncode == 0, err.read_text()
        rt("start", cid)
        wait_gone(int((tmp_path / "pid").read_text()))
        rt("delete", cid)
        return out.read_text() + err.read_text()
    finally:
        rt("delete", "--force", cid, check=False)
        assert all_leftovers(cid, rt) == []


def test_a_runtime_spec_1_2_bundle_runs(tmp_path: Path, rt: Runtime, cid: str) -> None:
    """containerd 2.x writes ociVersion 1.2.x, which the guest's crun (1.8.1) refuses by itself: the
    guest is told a version it takes. A relative mount destination (allowed from 1.2 on) works too."""
    script = "echo spec-1.2; grep -q ' /tmp/rel tmpfs ' /proc/mounts && echo relative-ok"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script], spec_changes={"ociVersion": "1.2.0"})
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"].append({"destination": "tmp/rel", "type": "tmpfs", "source": "tmpfs"})
    (bundle / "config.json").write_text(json.dumps(spec))
    assert _run_to_exit(rt, bundle, cid, tmp_path) == "spec-1.2\nrelative-ok\n"


def test_a_seccomp_profile_confines_the_container_compiled_by_either_side(tmp_path: Path, rt: Runtime,
                                                                          cid: str) -> None:
    """linux.seccomp holds in the guest: compiled on the host (kata.oci.seccomp_bpf, crun given the
    BPF), and alike when left to the guest's crun (run.oci.seccomp_fail_unknown_syscall)."""
    script = "grep Seccomp: /proc/self/status; mkdir /tmp/d 2>&1; echo mkdir=$?; echo alive"
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}
    for side, extra in (("host", {}), ("guest", {"run.oci.seccomp_fail_unknown_syscall": "1"})):
        bundle = make_busybox_bundle(tmp_path / side / "b", ["sh", "-c", script])
        spec = json.loads((bundle / "config.json").read_text())
        spec["linux"]["seccomp"] = profile
        spec["annotations"] = {**spec.get("annotations", {}), **extra}
        (bundle / "config.json").write_text(json.dumps(spec))
        out = _run_to_exit(rt, bundle, cid, tmp_path / side).split("\n")
        assert out[0].split() == ["Seccomp:", "2"], (side, out)
        assert "Permission denied" in out[1] and out[2] == "mkdir=1" and out[3] == "alive", (side, out)


def test_every_namespace_new_and_device_nodes(tmp_path: Path, rt: Runtime, cid: str) -> None:
    """runtime-tools' checks runc passes: a spec with every namespace new (none named by path), and
    linux.devices made as nodes in the container with their type, numbers and mode (the numbers name
    the VM's devices). Then the same with a user namespace too, whose mappings apply."""
    script = "cat /proc/self/uid_map; stat -c '%n %F %t:%T %a' /dev/kt-char /dev/kt-block /dev/kt-fifo"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script])
    spec = json.loads((bundle / "config.json").read_text())
    linux = spec["linux"]
    linux["namespaces"] = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    linux["devices"] = [
        {"path": "/dev/kt-char", "type": "c", "major": 10, "minor": 666, "fileMode": 0o660, "uid": 0},
        {"path": "/dev/kt-block", "type": "b", "major": 8, "minor": 666, "fileMode": 0o640},
        {"path": "/dev/kt-fifo", "type": "p", "fileMode": 0o600},
    ]
    (bundle / "config.json").write_text(json.dumps(spec))
    lines = _run_to_exit(rt, bundle, cid, tmp_path).splitlines()
    assert lines[0].split() == ["0", "0", "4294967295"], lines  # no user namespace: the guest's
    # stat prints device numbers in hex
    assert lines[1:] == ["/dev/kt-char character special file a:29a 660",
                         "/dev/kt-block block special file 8:29a 640",
                         "/dev/kt-fifo fifo 0:0 600"], lines
    # A user namespace as well: the device nodes cannot be made in it (runc refuses such a spec),
    # so only its mappings are checked.
    linux["namespaces"].append({"type": "user"})
    linux["uidMappings"] = linux["gidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 65536}]
    del linux["devices"]
    (bundle / "config.json").write_text(json.dumps(spec))
    (tmp_path / "user").mkdir()
    out = _run_to_exit(rt, bundle, cid, tmp_path / "user")
    assert out.split()[:3] == ["0", "1000", "65536"], out


def test_a_namespace_path_of_another_type_is_refused(tmp_path: Path, rt: Runtime, cid: str) -> None:
    """An ipc namespace given as the cgroup namespace: one line, before anything is booted."""
    ipc = f"/proc/{os.getpid()}/ns/ipc"
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns if ns["type"] != "cgroup" else {"type": "cgroup", "path": ipc}
                                   for ns in spec["linux"]["namespaces"]]
    (bundle / "config.json").write_text(json.dumps(spec))
    proc = rt("create", "--bundle", str(bundle), cid, check=False)
    err = proc.stderr.decode()
    expect = f"cgroup namespace {ipc}: the path is a namespace of type ipc, not cgroup"
    assert proc.returncode != 0 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert rt.last_error()["msg"].endswith(expect)
    assert all_leftovers(cid, rt) == []


# runtime-tools' validation/mounts: a bind with each propagation option (runc shows them all).
PROPAGATED = {"shared": ["bind", "shared"], "rshared": ["rbind", "rshared"], "slave": ["bind", "slave"],
              "rslave": ["rbind", "rslave"]}


@pytest.mark.parametrize("shared_fs", ["virtio-fs", "virtio-9p"])
def test_bind_mounts_read_only_flags_and_propagation(tmp_path: Path, rt: Runtime, cid: str,
                                                     shared_fs: str) -> None:
    """A host volume with a tmpfs below it: "ro" leaves the tmpfs writable (runc's reading), "rro"
    does not, the top is read-only for both. Binds with any propagation option appear; the slave
    and shared ones (shared is slave in a VM) receive a mount the host makes after the start,
    the private one does not."""
    with shared_volume(tmp_path / "vol") as vol:
        (vol / "hello").write_text("hi\n")
        bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
        spec = json.loads((bundle / "config.json").read_text())
        binds = {**PROPAGATED, "private": ["rbind", "rprivate"], "ro": ["rbind", "ro"],
                 "rro": ["rbind", "rro"]}
        spec["mounts"] += [{"destination": f"/mnt/{name}", "source": str(vol), "options": options}
                           for name, options in binds.items()]
        (bundle / "config.json").write_text(json.dumps(spec))
        conf = config_with(tmp_path, {"hypervisor.qemu": {"shared_fs": shared_fs}})
        rt("--config", str(conf), "create", "--bundle", str(bundle), cid)
        try:
            rt("start", cid)
            shown = rt("exec", cid, "sh", "-c", "for m in /mnt/*; do echo $m $(cat $m/hello); done").stdout
            assert shown.decode().split("\n")[:-1] == [f"/mnt/{name} hi" for name in sorted(binds)]
            probe = PROBE_WRITE + "for m in ro rro; do w /mnt/$m/top; w /mnt/$m/sub/f; done"
            assert rt("exec", cid, "sh", "-c", probe).stdout.decode().split("\n")[:-1] == [
                "/mnt/ro/top ro", "/mnt/ro/sub/f rw", "/mnt/rro/top ro", "/mnt/rro/sub/f ro"]
            assert (vol / "sub" / "f").read_text() == "x\n"  # written through the host's own mount
            assert not (vol / "top").exists()

            mount_tmpfs(vol / "late", "file", "mounted after the start\n")
            wait = "i=0; while [ $i -lt 150 ] && ! [ -e /mnt/$0/late/file ]; do sleep 0.2; i=$((i+1)); done"
            for name in PROPAGATED:
                seen = rt("exec", cid, "sh", "-c", f"{wait}; cat /mnt/$0/late/file", name, check=False)
                assert seen.stdout == b"mounted after the start\n", (name, seen.stderr)
            assert rt("exec", cid, "ls", "/mnt/private/late").stdout == b""
            rt("kill", cid, "KILL")
        finally:
            rt("delete", "--force", cid, check=False)
        assert all_leftovers(cid, rt) == []
        # Only the host's own mounts are left below the volume for shared_volume to undo.
        assert sorted(mounts_under(str(vol))) == [str(vol), str(vol / "late"), str(vol / "sub")]


def _receive_pty(listener: socket.socket) -> int:
    conn, _ = listener.accept()
    with conn:
        fds = array.array("i")
        _, anc, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: fds.itemsize])
    assert fds, "no descriptor on the console socket"
    return fds[0]


def _read_until(fd: int, needle: bytes, timeout: float = 30.0) -> bytes:
    import select

    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        left = deadline - time.monotonic()
        assert left > 0, got
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return got


def test_console_socket_tty_with_resize(tmp_path: Path, rt: Runtime, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sh"], terminal=True)
    sock_path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    try:
        with open(tmp_path / "err", "wb") as err:
            argv = [runtime_bin(), "--root", str(rt.root), "create", "--bundle", str(bundle),
                    "--console-socket", sock_path, "--pid-file", str(tmp_path / "pid"), cid]
            creator = subprocess.Popen(argv,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        listener.settimeout(TIMEOUT)
        master = _receive_pty(listener)
        assert creator.wait(timeout=TIMEOUT) == 0, (tmp_path / "err").read_text()
        rt("start", cid)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        time.sleep(0.5)  # the resize travels as SIGWINCH to the monitor, then to the guest
        os.write(master, b"stty size; tty; exit 5\n")
        out = _read_until(master, b"/dev/pts")
        assert b"33 111" in out, out
        wait_gone(int((tmp_path / "pid").read_text()))
        os.close(master)
        rt("delete", cid)
    finally:
        listener.close()
        rt("delete", "--force", cid, check=False)
    assert all_leftovers(cid, rt) == []


def test_memory_limit_sizes_the_vm_and_update_grows_it(tmp_path: Path, rt: Runtime, cid: str) -> None:
    """q35, where memory can be hot-added (microvm cannot: there `update` only sets the limit)."""
    from kata.config import load_config

    default_mib = load_config().hypervisor.default_memory
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["resources"] = {"memory": {"limit": 64 * 2**20}}
    (bundle / "config.json").write_text(json.dumps(spec))
    conf = config_with(tmp_path, {"hypervisor.qemu": {"machine_type": "q35"}})
    rt("--config", str(conf), "create", "--bundle", str(bundle), cid)
    try:
        rt("start", cid)
        probe = "cat /sys/fs/cgroup/memory.max; awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo"
        cg, total = rt("exec", cid, "sh", "-c", probe).stdout.split()
        assert int(cg) == 64 * 2**20 and int(total) > default_mib
        rt("update", "--memory", "512m", cid)
        cg2, total2 = rt("exec", cid, "sh", "-c", probe).stdout.split()
        assert int(cg2) == 512 * 2**20
        assert int(total2) >= default_mib + 512 - 64, (total, total2)  # the VM grew by hotplug
        # The same update again (each is a process of its own): the VM stays as it is.
        rt("update", "--memory", "512m", cid)
        assert rt("exec", cid, "sh", "-c", probe).stdout.split() == [cg2, total2]
    finally:
        rt("delete", "--force", cid, check=False)
    assert all_leftovers(cid, rt) == []


def test_run_detach_then_kill(tmp_path: Path, rt: Runtime, cid: str) -> None:
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    rt("run", "--detach", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), cid)
    pid = int((tmp_path / "pid").read_text())
    assert rt.state(cid)["status"] == "running"
    os.kill(pid, signal.SIGKILL)  # the monitor killed: the container counts as stopped
    wait_gone(pid)
    assert rt.state(cid)["status"] == "stopped"
    rt("delete", cid)
    assert all_leftovers(cid, rt) == []


def test_create_terminated_half_way_leaves_nothing(tmp_path: Path, rt: Runtime, cid: str) -> None:
    """containerd kills a create that takes too long: the VM being brought up goes with it."""
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    with open(tmp_path / "err", "wb") as err:
        argv = [runtime_bin(), "--root", str(rt.root), "create", "--bundle", str(bundle), cid]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + TIMEOUT
        while not (Path("/run/vc/vm") / cid / "qemu.pid").exists():  # the VM is on its way up
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) != 0
    assert "Traceback" not in (tmp_path / "err").read_text()
    assert all_leftovers(cid, rt) == []


def test_spec_events_kill_all_and_list(tmp_path: Path, rt: Runtime, cid: str) -> None:
    """A bundle from `kata-runtime spec`, `events` as a stream, `kill --all`, and `list`'s table."""
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    (bundle / "config.json").unlink()
    rt("spec", "--bundle", str(bundle))
    assert rt("spec", "--bundle", str(bundle), check=False).returncode != 0  # it will not overwrite
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["process"]["args"] == ["sh"] and spec["process"]["terminal"] is True
    spec["process"].update(args=["sleep", "1000"], terminal=False)
    (bundle / "config.json").write_text(json.dumps(spec))
    features = json.loads(rt("features").stdout)
    assert "prestart" in features["hooks"] and features["ociVersionMax"]

    rt("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), cid)
    try:
        rt("start", cid)
        events = subprocess.Popen([runtime_bin(), "--root", str(rt.root), "events", "--interval", "1s", cid],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert events.stdout is not None
            first, second = (json.loads(events.stdout.readline()) for _ in range(2))
            assert first["type"] == second["type"] == "stats" and first["id"] == cid
        finally:
            events.kill()
            events.wait()
        rt("kill", "--all", cid, "KILL")
        wait_gone(int((tmp_path / "pid").read_text()))
        table = rt("list").stdout.decode().splitlines()
        assert table[0].split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
        assert table[1].split()[:3] == [cid, "0", "stopped"]
    finally:
        rt("delete", "--force", cid, check=False)
    assert all_leftovers(cid, rt) == []
