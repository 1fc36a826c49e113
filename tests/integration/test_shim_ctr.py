"""containerd-shim-kata-v2 driven by a real containerd through `ctr --runtime io.containerd.kata.v2`:
the task API, IO (fifos, file:// and binary:// log URIs), events, and faults (QEMU or the shim
killed under a running task)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata.oci.default_spec import default_spec
from tests.conftest import process_gone
from tests.support.bundles import make_rootfs
from tests.support.daemons import Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

RUNTIME = "io.containerd.kata.v2"
TIMEOUT = 180


def run(containerd: Containerd, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return containerd.ctr("run", "--runtime", RUNTIME, *args, timeout=timeout)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def task_status(containerd: Containerd, cid: str) -> tuple[int, str]:
    for line in containerd.ctr("task", "ls", timeout=30).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1]), fields[2]
    return 0, ""


def _cmdline_has(pid: int, *words: bytes) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return all(w in cmd for w in words)


def qemu_alive(pid: int) -> bool:
    return _cmdline_has(pid, b"qemu-system")


def shim_pids() -> set[int]:
    found = set()
    for pid in os.listdir("/proc"):
        try:
            if b"containerd-shim-kata-v2" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(int(pid))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture
def detached(containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running task whose init traps SIGTERM (exit 7), removed afterwards whatever happened."""
    cid = request.node.name.replace("_", "-")[:40]
    try:
        proc = run(containerd, "-d", containerd.image, cid, "sh", "-c",
                   "trap 'exit 7' TERM; while :; do sleep 1; done")
        assert proc.returncode == 0, proc.stderr
        yield cid
    finally:
        containerd.ctr("task", "delete", "--force", cid, timeout=TIMEOUT)
        containerd.ctr("container", "delete", cid, timeout=60)


def test_run_rm_output_and_exit_code(containerd: Containerd) -> None:
    proc = run(containerd, "--rm", containerd.image, "kshim-rm", "sh", "-c",
               "echo from-vm; echo to-stderr >&2; uname -r; exit 3")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 3 and lines[0] == "from-vm", proc.stderr
    assert lines[1] != open("/proc/sys/kernel/osrelease").read().strip()  # the guest's kernel
    assert "to-stderr" in proc.stderr


def test_stdin_is_relayed_and_closed(containerd: Containerd) -> None:
    proc = subprocess.run(["ctr", "-a", str(containerd.socket), "run", "--runtime", RUNTIME, "--rm",
                           containerd.image, "kshim-stdin", "sh", "-c", "tr a-z A-Z; echo done"],
                          input="piped in\n", capture_output=True, text=True, timeout=TIMEOUT)
    assert (proc.returncode, proc.stdout) == (0, "PIPED IN\ndone\n"), proc.stderr


def test_detached_task_exec_ps_pause_metrics_kill_delete(containerd: Containerd, detached: str) -> None:
    qemu_pid, status = task_status(containerd, detached)
    assert status == "RUNNING" and b"qemu" in Path(f"/proc/{qemu_pid}/cmdline").read_bytes()
    ex = containerd.ctr("task", "exec", "--exec-id", "e1", detached, "sh", "-c",
                        "echo out; echo err >&2; exit 4", timeout=TIMEOUT)
    assert (ex.returncode, ex.stdout, ex.stderr) == (4, "out\n", "err\n")
    ps = containerd.ctr("task", "ps", detached, timeout=60)
    assert ps.returncode == 0 and str(qemu_pid) in ps.stdout, ps.stderr
    for verb, want in (("pause", "PAUSED"), ("resume", "RUNNING")):
        assert containerd.ctr("task", verb, detached, timeout=60).returncode == 0
        assert task_status(containerd, detached)[1] == want
    metrics = containerd.ctr("task", "metrics", detached, timeout=60)
    assert metrics.returncode == 0, metrics.stderr
    values = dict(line.split()[:2] for line in metrics.stdout.splitlines() if len(line.split()) >= 2)
    assert int(values["memory.usage_in_bytes"]) > 0 and int(values["pids.current"]) >= 1
    # SIGTERM reaches the init in the guest, whose trap decides the exit status.
    assert containerd.ctr("task", "kill", detached, timeout=60).returncode == 0
    wait_until(lambda: task_status(containerd, detached)[1] == "STOPPED", 60, "the task never stopped")
    delete = containerd.ctr("task", "delete", detached, timeout=TIMEOUT)
    assert delete.returncode == 0 and "exit code 7" in delete.stderr, delete.stderr
    wait_until(lambda: not qemu_alive(qemu_pid), 30, "QEMU outlived its pod")


def test_events_in_containerds_order(containerd: Containerd) -> None:
    watcher = subprocess.Popen(["ctr", "-a", str(containerd.socket), "events"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)
        proc = run(containerd, "-d", containerd.image, "kshim-ev", "sleep", "1000")
        assert proc.returncode == 0, proc.stderr
        containerd.ctr("task", "exec", "--exec-id", "ev1", "kshim-ev", "true", timeout=TIMEOUT)
        containerd.ctr("task", "pause", "kshim-ev", timeout=60)
        containerd.ctr("task", "resume", "kshim-ev", timeout=60)
        containerd.ctr("task", "kill", "-s", "SIGKILL", "kshim-ev", timeout=60)
        wait_until(lambda: task_status(containerd, "kshim-ev")[1] == "STOPPED", 60, "the task never stopped")
        containerd.ctr("task", "delete", "kshim-ev", timeout=TIMEOUT)
        time.sleep(1.0)
    finally:
        containerd.ctr("task", "delete", "--force", "kshim-ev", timeout=TIMEOUT)
        containerd.ctr("container", "delete", "kshim-ev", timeout=60)
        watcher.terminate()
        out, _ = watcher.communicate(timeout=30)
    topics = [f for line in out.splitlines() if "kshim-ev" in line
              for f in line.split() if f.startswith("/tasks/")]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                      "/tasks/exit", "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"], out


def test_log_uris_file_and_binary(containerd: Containerd, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "out.log"
    proc = run(containerd, "--rm", "--log-uri", f"file://{log_file}", containerd.image, "kshim-file",
               "sh", "-c", "echo to-file; echo err-to-file >&2")
    assert proc.returncode == 0, proc.stderr
    assert set(log_file.read_text().splitlines()) == {"to-file", "err-to-file"}

    # containerd's logging-program protocol: stdout on fd 3, stderr on fd 4, fd 5 closed when ready.
    logger = tmp_path / "logger.sh"
    captured = tmp_path / "captured"
    logger.write_text(f"#!/bin/sh\nexec 5>&-\ncat <&3 > {captured}.out & cat <&4 > {captured}.err\nwait\n"
                      f"echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $1\" > {captured}.env\n")
    logger.chmod(0o755)
    proc = run(containerd, "--rm", "--log-uri", f"binary://{logger}?flag", containerd.image, "kshim-bin",
               "sh", "-c", "echo via-binary; echo err-via-binary >&2")
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: Path(f"{captured}.env").exists(), 10, "the logging program never finished")
    assert Path(f"{captured}.out").read_text() == "via-binary\n"
    assert Path(f"{captured}.err").read_text() == "err-via-binary\n"
    assert Path(f"{captured}.env").read_text().split() == ["kshim-bin", "default", "flag"]


@pytest.mark.parametrize("victim", ["qemu", "virtiofsd"])
def test_killing_the_vmm_or_virtiofsd_reports_exit_255_and_leaves_nothing(
        containerd: Containerd, detached: str, victim: str) -> None:
    qemu_pid, _ = task_status(containerd, detached)
    if victim == "qemu":
        os.kill(qemu_pid, signal.SIGKILL)
    else:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        # virtiofsd's namespace sandbox is two processes: the one we started, and its child.
        virtiofsd = [p for p in pids if _cmdline_has(p, b"/virtiofsd\0", f"/{detached}/".encode())]
        assert virtiofsd
        os.kill(min(virtiofsd), signal.SIGKILL)
    wait_until(lambda: task_status(containerd, detached)[1] == "STOPPED", 60,
               "the VM's death was not reported")
    delete = containerd.ctr("task", "delete", detached, timeout=TIMEOUT)
    assert delete.returncode == 0 and "exit code 255" in delete.stderr, delete.stderr
    containerd.ctr("container", "delete", detached, timeout=60)
    wait_until(lambda: not Path(f"/run/vc/sbs/{detached}").exists() and not shim_pids(), 30,
               "the pod's state or shim outlived it")


def test_killed_shim_is_cleaned_up_by_shim_delete(containerd: Containerd, detached: str) -> None:
    qemu_pid, _ = task_status(containerd, detached)
    (shim,) = shim_pids()
    os.kill(shim, signal.SIGKILL)
    # containerd sees the shim gone, runs `containerd-shim-kata-v2 delete`, and marks the task stopped.
    wait_until(lambda: not Path(f"/run/vc/sbs/{detached}").exists(), 60,
               "the VM of the dead shim was not removed")
    wait_until(lambda: not qemu_alive(qemu_pid), 30, "QEMU outlived its shim")


def test_bad_runtime_config_is_one_line_and_leaves_nothing(containerd: Containerd, tmp_path: Path) -> None:
    bad = tmp_path / "configuration.toml"
    bad.write_text("[hypervisor.qemu]\ndefault_memory = 'lots'\n")
    before = set(os.listdir("/run/vc/sbs")) if os.path.isdir("/run/vc/sbs") else set()
    proc = run(containerd, "--rm", "--runtime-config-path", str(bad), containerd.image, "kshim-bad", "true")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "default_memory" in proc.stderr, proc.stderr
    containerd.ctr("container", "delete", "kshim-bad", timeout=60)
    wait_until(lambda: not shim_pids(), 30, "a shim outlived its failed create")
    assert (set(os.listdir("/run/vc/sbs")) if os.path.isdir("/run/vc/sbs") else set()) == before


def test_terminal_and_its_size(containerd: Containerd, detached: str) -> None:
    """`-t` through a pty that `script` gives ctr: the guest process has a terminal of ctr's size
    (ResizePty), for the init and for an exec."""
    ctr = f"ctr -a {containerd.socket}"
    runs = ((f"stty cols 77 rows 22; {ctr} run --runtime {RUNTIME} -t --rm {containerd.image} kshim-tty "
             "sh -c 'tty; stty size; exit 3'", 3, "22 77"),
            (f"stty cols 91 rows 33; {ctr} task exec -t --exec-id tty1 {detached} "
             "sh -c 'tty; stty size; exit 5'", 5, "33 91"))
    for command, status, size in runs:
        proc = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True,
                              timeout=TIMEOUT)
        # script's terminal echoes what ctr writes to it first (a NUL, shown as ^@).
        lines = [ln.removeprefix("^@") for ln in proc.stdout.splitlines() if ln.strip()]
        assert (proc.returncode, lines[:2]) == (status, ["/dev/pts/0", size]), proc.stdout + proc.stderr


def test_out_of_memory_is_an_oom_event_before_the_exit(containerd: Containerd) -> None:
    watcher = subprocess.Popen(["ctr", "-a", str(containerd.socket), "events"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)
        # A shell string that doubles until the container's 32 MiB limit kills it.
        proc = run(containerd, "--rm", "--memory-limit", str(32 * 1024 * 1024), containerd.image, "kshim-oom",
                   "sh", "-c", "a=xxxxxxxxxxxxxxxx; while :; do a=$a$a; done")
        assert proc.returncode == 137, proc.stderr
        time.sleep(1.0)
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=30)
    topics = [f for line in out.splitlines() if "kshim-oom" in line
              for f in line.split() if f.startswith("/tasks/")]
    assert topics[:4] == ["/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit"], out


def test_host_networking_is_refused_in_one_line(containerd: Containerd) -> None:
    before = set(os.listdir("/run/vc/sbs")) if os.path.isdir("/run/vc/sbs") else set()
    proc = run(containerd, "--rm", "--net-host", containerd.image, "kshim-hostnet", "true")
    assert proc.returncode != 0 and "host networking is not supported" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    containerd.ctr("container", "delete", "kshim-hostnet", timeout=60)
    wait_until(lambda: not shim_pids(), 30, "a shim outlived its refused create")
    assert (set(os.listdir("/run/vc/sbs")) if os.path.isdir("/run/vc/sbs") else set()) == before


HOOK_KINDS = ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"]


def spec_file(tmp_path: Path, args: list[str], hooks: dict[str, list[dict[str, object]]]) -> Path:
    """A whole spec for `ctr run --config`: ctr then takes no image and the root is a directory."""
    make_rootfs(tmp_path / "rootfs")
    spec = default_spec(args)
    spec["root"] = {"path": str(tmp_path / "rootfs")}
    spec["hooks"] = hooks
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_hooks_run_under_the_shim_in_order_with_containerds_state(
        containerd: Containerd, tmp_path: Path) -> None:
    record = tmp_path / "hooks.log"
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\necho \"$1 $(cat)\" >> {record}\n")
    script.chmod(0o755)
    spec = spec_file(tmp_path, ["sh", "-c", "exit 0"],
                     {k: [{"path": str(script), "args": ["hook", k]}] for k in HOOK_KINDS})
    proc = run(containerd, "--rm", "--config", str(spec), "kshim-hooks")
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: record.exists() and len(record.read_text().splitlines()) == len(HOOK_KINDS), 30,
               "not every hook ran")
    lines = record.read_text().splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines] == HOOK_KINDS
    states = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in lines}
    assert {s["id"] for s in states.values()} == {"kshim-hooks"}
    assert states["prestart"]["status"] == "creating" and states["prestart"]["pid"] > 0
    assert states["startContainer"]["status"] == "created"
    assert states["poststart"]["status"] == "running"
    assert states["poststop"]["status"] == "stopped"
    # The bundle is containerd's, where it wrote the spec: the hooks are told where it is.
    assert len({s["bundle"] for s in states.values()}) == 1 and "kshim-hooks" in states["prestart"]["bundle"]
    wait_until(lambda: not shim_pids(), 30, "the shim outlived its task")


def test_failing_prestart_hook_fails_create_and_leaves_nothing(
        containerd: Containerd, tmp_path: Path) -> None:
    before = set(os.listdir("/run/vc/sbs")) if os.path.isdir("/run/vc/sbs") else set()
    spec = spec_file(tmp_path, ["true"],
                     {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 3"]}]})
    proc = run(containerd, "--rm", "--config", str(spec), "kshim-badhook")
    assert proc.returncode != 0 and "prestart" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    containerd.ctr("container", "delete", "kshim-badhook", timeout=60)
    wait_until(lambda: not shim_pids(), 30, "a shim outlived its failed create")
    assert (set(os.listdir("/run/vc/sbs")) if os.path.isdir("/run/vc/sbs") else set()) == before
    assert not any(_cmdline_has(int(p), b"qemu-system", b"kshim-badhook") for p in os.listdir("/proc")
                   if p.isdigit())


def _shim_of(cid: str) -> int:
    (pid,) = [p for p in shim_pids() if _cmdline_has(p, cid.encode())]
    return pid


def test_later_pods_shims_are_forked_by_the_zygote(containerd: Containerd) -> None:
    """The first pod's shim starts the zygote; the next pod's shim is its fork (twice forked: not
    the leader of its session, as `start`'s child is), and looks and works like the first's. A
    zygote whose code was replaced makes no more shims: it ends, `start` forks the shim itself,
    and that shim starts a new zygote."""
    from kata.shim import zygote

    zygote.stop()
    cids = [f"zyg-{i}-{os.urandom(3).hex()}" for i in range(3)]
    stamped = Path(zygote.__file__)
    mtime = stamped.stat().st_mtime_ns
    try:
        for cid in cids[:2]:
            proc = run(containerd, "-d", containerd.image, cid, "sleep", "1000")
            assert proc.returncode == 0, proc.stderr
            wait_until(zygote.is_running, 30, "no shim zygote came up")
        first, second = _shim_of(cids[0]), _shim_of(cids[1])
        assert os.getsid(first) == first
        assert os.getsid(second) != second
        # The same command line as start's own shim shows, but for the pod's id.
        shown = [Path(f"/proc/{p}/cmdline").read_bytes().rstrip(b"\0").split(b"\0") for p in (first, second)]
        assert shown[1][-1] == b"start" and shown[1][shown[1].index(b"-id") + 1] == cids[1].encode()
        assert [a.replace(cids[0].encode(), cids[1].encode()) for a in shown[0]] == shown[1]
        assert Path(f"/proc/{second}/comm").read_text() == Path(f"/proc/{first}/comm").read_text()
        # Nothing of the zygote's is held, and like start's shim it passes no descriptor on to a
        # program it runs (a binary:// logger, a hook): every one from 3 up is close-on-exec.
        for shim in (first, second):
            fds = [int(fd) for fd in os.listdir(f"/proc/{shim}/fd") if int(fd) >= 3]
            held = {os.readlink(f"/proc/{shim}/fd/{fd}") for fd in fds}
            assert not any("zygote" in name for name in held), held
            for fd in fds:
                flags = Path(f"/proc/{shim}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
                assert int(flags, 8) & os.O_CLOEXEC, (shim, fd, os.readlink(f"/proc/{shim}/fd/{fd}"))
        ex = containerd.ctr("task", "exec", "--exec-id", "e1", cids[1], "cat", "/proc/1/cmdline",
                            timeout=TIMEOUT)
        assert (ex.returncode, ex.stdout) == (0, "sleep\x001000\x00"), ex.stderr

        old_pid = int(zygote.LOCK.read_text())
        os.utime(stamped, ns=(mtime + 1_000_000, mtime + 1_000_000))
        proc = run(containerd, "-d", containerd.image, cids[2], "sleep", "1000")
        assert proc.returncode == 0, proc.stderr
        third = _shim_of(cids[2])
        assert os.getsid(third) == third
        wait_until(lambda: process_gone(old_pid), 30, "the stale zygote did not end")
        wait_until(zygote.is_running, 30, "no new shim zygote came up")
    finally:
        os.utime(stamped, ns=(mtime, mtime))
        for cid in cids:
            containerd.ctr("task", "delete", "--force", cid, timeout=TIMEOUT)
            containerd.ctr("container", "delete", cid, timeout=60)
        zygote.stop()
