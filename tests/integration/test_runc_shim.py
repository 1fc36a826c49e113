"""containerd's runc shim (io.containerd.runc.v2) pointed at kata-runtime with `ctr run --runc-binary`:
the same CLI contract Docker uses, driven by containerd alone."""

from __future__ import annotations

import time

import pytest

from tests.support.daemons import Containerd, kata_runtime_path

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 180


def kata_run(containerd: Containerd, *args: str) -> list[str]:
    return ["run", "--runc-binary", kata_runtime_path(), *args]


def test_run_rm_output_and_exit_code(containerd: Containerd) -> None:
    proc = containerd.ctr(*kata_run(containerd, "--rm", containerd.image, "shim-rm", "sh", "-c",
                                    "echo from-vm; uname -r; exit 3"), timeout=TIMEOUT)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 3 and lines[0] == "from-vm", proc.stderr
    assert lines[1] != open("/proc/sys/kernel/osrelease").read().strip()  # the guest's kernel


def test_detached_task_exec_ps_pause_kill_delete(containerd: Containerd) -> None:
    run = containerd.ctr(*kata_run(containerd, "-d", containerd.image, "shim-d", "sleep", "1000"),
                         timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    try:
        ex = containerd.ctr("task", "exec", "--exec-id", "e1", "shim-d", "sh", "-c", "echo in-exec; exit 5",
                            timeout=TIMEOUT)
        assert (ex.returncode, ex.stdout) == (5, "in-exec\n"), ex.stderr
        ps = containerd.ctr("task", "ps", "shim-d", timeout=60)
        assert ps.returncode == 0 and len(ps.stdout.strip().splitlines()) >= 2, ps.stdout + ps.stderr
        for verb, status in (("pause", "PAUSED"), ("resume", "RUNNING")):
            assert containerd.ctr("task", verb, "shim-d", timeout=60).returncode == 0
            assert status in containerd.ctr("task", "ls", timeout=30).stdout
        assert containerd.ctr("task", "kill", "--signal", "SIGKILL", "shim-d", timeout=60).returncode == 0
        deadline = time.monotonic() + 60
        while "STOPPED" not in containerd.ctr("task", "ls", timeout=30).stdout:
            assert time.monotonic() < deadline, "the task never stopped"
            time.sleep(0.2)
        assert containerd.ctr("task", "delete", "shim-d", timeout=TIMEOUT).returncode == 0
    finally:
        containerd.ctr("task", "delete", "--force", "shim-d", timeout=TIMEOUT)
        containerd.ctr("container", "delete", "shim-d", timeout=60)
