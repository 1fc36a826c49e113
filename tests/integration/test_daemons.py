"""The test daemons themselves, driven with runc: the busybox image runs under a real dockerd and
containerd, the kata runtime is registered, and stopping them leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import process_gone
from tests.integration.conftest import daemons_unavailable
from tests.support.daemons import (
    SHIM_SOCKET_DIR,
    Containerd,
    Dockerd,
    Runtime,
    containerd_daemon,
    docker_daemons,
    kata_runtime_path,
    sweep_stale,
)

TIMEOUT = 60


def test_docker_run_rm_echo(docker: Dockerd) -> None:
    proc = docker.run("run", "--rm", "--runtime", "runc", docker.image, "echo", "hi", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hi\n"
    assert docker.container_ids() == []


def test_docker_exit_status_and_stdin(docker: Dockerd) -> None:
    proc = docker.run("run", "--rm", "-i", docker.image, "sh", "-c", "cat; exit 3", input="piped\n",
                      timeout=TIMEOUT)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "piped\n"


def test_docker_image_config(docker: Dockerd) -> None:
    proc = docker.run("image", "inspect", docker.image, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)[0]["Config"]
    assert config["Cmd"] == ["sh"]
    assert any(e.startswith("PATH=") for e in config["Env"])


def test_kata_runtime_is_registered(docker: Dockerd) -> None:
    proc = docker.run("info", "--format", "{{json .Runtimes}}", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    runtimes = json.loads(proc.stdout)
    assert runtimes["kata"]["path"] == kata_runtime_path()
    assert "runc" in runtimes


def test_ctr_run_rm_echo(containerd: Containerd) -> None:
    cid = f"t-{uuid.uuid4().hex[:8]}"
    proc = containerd.ctr("run", "--rm", containerd.image, cid, "echo", "hi", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hi\n"
    assert containerd.ctr("containers", "ls", "-q").stdout.split() == []


@pytest.fixture
def needs_daemons() -> None:
    reason = daemons_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.usefixtures("needs_daemons")
def test_stop_leaves_nothing_behind() -> None:
    """Stopped with containers still running in both daemons: no daemon, shim, container process, mount
    or directory of theirs remains."""
    with docker_daemons(runtimes={"kata": Runtime(kata_runtime_path())}) as docker, \
            containerd_daemon() as containerd:
        run = docker.run("run", "-d", "--runtime", "runc", docker.image, "sleep", "1000", timeout=TIMEOUT)
        assert run.returncode == 0, run.stderr
        pid = int(docker.run("inspect", "-f", "{{.State.Pid}}", run.stdout.strip()).stdout)
        ctr = containerd.ctr("run", "-d", containerd.image, "sleeper", "sleep", "1000", timeout=TIMEOUT)
        assert ctr.returncode == 0, ctr.stderr
        # What a leak would look like, while they run: mounts under the daemons' directories.
        assert any(item.startswith("mount ") for item in docker.leftovers())
        assert any(item.startswith("mount ") for item in containerd.leftovers())
        daemon_pids = [p.pid for p in (docker.proc, docker.containerd.proc, containerd.proc) if p]
        assert len(daemon_pids) == 3
    assert docker.leftovers() == []
    assert docker.containerd.leftovers() == []
    assert containerd.leftovers() == []
    for p in (pid, *daemon_pids):
        assert process_gone(p)


_ABANDON = """
import os, sys
from tests.support.daemons import Containerd
c = Containerd().start()
c.import_image()
proc = c.ctr("run", "-d", c.image, sys.argv[1], "sleep", "1000")
assert proc.returncode == 0, proc.stderr
print(c.base, c.proc.pid, flush=True)
os._exit(0)  # dies without stopping containerd: its owner is gone
"""


@pytest.mark.usefixtures("needs_daemons")
def test_a_dead_owners_daemon_is_swept() -> None:
    """A test process killed before its teardown leaves its containerd running; the next start sweeps it."""
    cid = f"abandoned-{uuid.uuid4().hex[:8]}"
    shim_sockets = set(os.listdir(SHIM_SOCKET_DIR)) if os.path.isdir(SHIM_SOCKET_DIR) else set()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", _ABANDON, cid], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env)
    assert out.returncode == 0, out.stderr
    base_s, pid_s = out.stdout.split()
    base, pid = Path(base_s), int(pid_s)
    assert not process_gone(pid)
    assert base in sweep_stale()
    assert process_gone(pid)
    assert not base.exists()
    # The killed shim's socket (in the directory every containerd's shims share) went with it.
    assert set(os.listdir(SHIM_SOCKET_DIR)) <= shim_sockets
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if base_s in line]
    # A container killed under runc (not deleted through it) keeps its state and empty cgroups, outside the
    # daemon's directory: the sweep cannot know them; here they have a known name.
    shutil.rmtree(f"/run/containerd/runc/default/{cid}", ignore_errors=True)
    for cgroup in Path("/sys/fs/cgroup").glob(f"*/default/{cid}"):
        cgroup.rmdir()
