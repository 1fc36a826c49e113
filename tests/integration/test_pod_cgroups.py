"""Host cgroups end to end (Kata's sandbox_cgroup_only): a CRI pod with a cgroup parent under both
settings (two kata handlers of one containerd, each with its configuration), and `docker run --runtime
kata` with limits. Where the pod's QEMU, virtiofsd and shim (or monitor) live, what the cgroups carry,
that the pod's memory usage includes the VM, and that nothing of the cgroups we made is left after the
pod; a cgroup the manager had made (the kubelet's pod cgroup) stays."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.cgroups.host import host_cgroups
from kata.config import load_config
from kata.protocols.cri import api_pb2 as cri_pb
from kata.sandbox.host_cgroups import HOST_PROCESSES_MIB
from tests.conftest import cgroup_of, config_with, pids_naming
from tests.integration.test_docker import inspect
from tests.support.cri import CriClient
from tests.support.cri_config import KATA
from tests.support.daemons import Containerd, Dockerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

MiB = 1 << 20
CONFIGS = {mode: Path(f"/run/kata-host-cgroups-{mode}.toml") for mode in ("split", "whole")}
CRI_RUNTIMES = {f"kata-{mode}": dataclasses.replace(KATA, options={"ConfigPath": str(path)})
                for mode, path in CONFIGS.items()}
# Docker's kata runtime lives whole in /docker/<id>.
KATA_RUNTIME_ARGS = ("--config", str(CONFIGS["whole"]))
CG = Path("/sys/fs/cgroup")


@pytest.fixture(scope="module", autouse=True)
def configs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    for mode, path in CONFIGS.items():
        changes = {"runtime": {"sandbox_cgroup_only": mode == "whole"}}
        made = config_with(tmp_path_factory.mktemp(mode), changes)
        path.write_text(made.read_text())
    yield
    for path in CONFIGS.values():
        path.unlink(missing_ok=True)


def _overhead_mib() -> int:
    """What sandbox_cgroup_only adds to a pod's memory limit: the VM's base memory, its processes' own."""
    return load_config(CONFIGS["whole"]).hypervisor.default_memory + HOST_PROCESSES_MIB


def _figure(rel: str, controller: str, file: str) -> str:
    return (CG / controller / rel.strip("/") / file).read_text().strip()


def _pod_processes(pod_id: str, qemu: int) -> dict[str, int]:
    shims = pids_naming("containerd-shim-kata-v2", pod_id)
    # virtiofsd in namespaces of its own is two processes: the one started and the one it forks
    virtiofsd = pids_naming("virtiofsd", f"/run/vc/vm/{pod_id}/")
    assert len(shims) == 1 and virtiofsd, (shims, virtiofsd)
    return {"qemu": qemu, "shim": shims.pop(), **{f"virtiofsd {pid}": pid for pid in virtiofsd}}


def _gone_everywhere(rel: str) -> bool:
    return not any((CG / c / rel.strip("/")).exists() for c in ("memory", "cpu", "cpuacct", "cpuset", "pids"))


@pytest.fixture(autouse=True)
def v1_host() -> None:
    if host_cgroups().version != 1:
        pytest.skip("the figures are read from cgroup v1 files")


def test_cri_pods_in_their_cgroup_under_both_settings(cri: CriClient, cri_containerd: Containerd) -> None:
    for mode in ("split", "whole"):
        uid = uuid.uuid4().hex[:12]
        parent = f"{cri_containerd.cgroup_parent}/pod{uid}"
        if mode == "whole":  # as the kubelet does: the pod cgroup is there before the pod
            for c in ("memory", "cpu", "cpuacct", "cpuset", "pids"):
                os.makedirs(CG / c / parent.strip("/"))
                if c == "cpuset":
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        for d in (parent.strip("/").split("/")[0], parent.strip("/")):
                            (CG / c / d / f).write_text((CG / c / f).read_text())
        pod = cri.run_pod(f"cg-{mode}", "default", uid, f"kata-{mode}", cgroup_parent=parent)
        sandbox = f"{parent}/{pod.id}"
        try:
            limits = cri_pb.LinuxContainerResources(memory_limit_in_bytes=128 * MiB, cpu_quota=50000,
                                                    cpu_period=100000, cpu_shares=512)
            ctr = cri.run_container(pod, "sleeper", cri_containerd.image, ["sleep", "100000"],
                                    linux=cri_pb.LinuxContainerConfig(resources=limits))
            procs = _pod_processes(pod.id, cri.container_pid(ctr))
            # The pod's total: the container's figures (the pause container adds 2 shares).
            assert _figure(sandbox, "cpu", "cpu.cfs_quota_us") == "50000"
            assert _figure(sandbox, "cpu", "cpu.cfs_period_us") == "100000"
            assert _figure(sandbox, "cpu", "cpu.shares") == "514"
            tasks = {int(t) for t in _figure(sandbox, "cpu", "tasks").split()}
            qemu_threads = {int(t) for t in os.listdir(f"/proc/{procs['qemu']}/task")}
            if mode == "split":
                overhead = f"/kata_overhead/{pod.id}"
                for what, pid in procs.items():
                    for c in ("memory", "cpu"):
                        assert cgroup_of(pid, c) == overhead, (what, c)
                # the vCPU threads alone: threads of QEMU, not QEMU's main thread
                assert tasks and tasks < qemu_threads and procs["qemu"] not in tasks
                assert int(_figure(sandbox, "memory", "memory.limit_in_bytes")) == 128 * MiB
            else:
                for what, pid in procs.items():
                    for c in ("memory", "cpu"):
                        assert cgroup_of(pid, c) == sandbox, (what, c)
                assert qemu_threads <= tasks
                usage = int(_figure(sandbox, "memory", "memory.usage_in_bytes"))
                assert usage > 50 * MiB, usage  # the VM's memory is the pod's
                # the pod's limit plus the VM's base memory and its processes' own
                limit = int(_figure(sandbox, "memory", "memory.limit_in_bytes"))
                assert limit == (128 + _overhead_mib()) * MiB
                print(f"pod memory usage with its VM: {usage / MiB:.0f} MiB")
            # An update follows the pod's total.
            cri.update_container_resources(ctr, cri_pb.LinuxContainerResources(
                memory_limit_in_bytes=160 * MiB, cpu_quota=80000, cpu_period=100000, cpu_shares=512))
            assert _figure(sandbox, "cpu", "cpu.cfs_quota_us") == "80000"
            extra = 0 if mode == "split" else _overhead_mib()
            assert int(_figure(sandbox, "memory", "memory.limit_in_bytes")) == (160 + extra) * MiB
        finally:
            cri.remove_pod(pod.id)
        assert _gone_everywhere(sandbox), sandbox
        assert _gone_everywhere(f"/kata_overhead/{pod.id}")
        if mode == "whole":  # the kubelet's stays, for the kubelet to remove
            assert (CG / "memory" / parent.strip("/")).is_dir()
            for c in ("memory", "cpu", "cpuacct", "cpuset", "pids"):
                os.rmdir(CG / c / parent.strip("/"))
        else:  # what we made for it goes with it
            assert _gone_everywhere(parent)


def test_docker_limits_on_the_vms_cgroup(docker: Dockerd) -> None:
    name = f"cg-{uuid.uuid4().hex[:8]}"
    proc = docker.run("run", "-d", "--name", name, "--runtime", "kata", "--network", "none",
                      "--memory", "256m", "--cpus", "1", docker.image, "sleep", "100000", timeout=180)
    assert proc.returncode == 0, proc.stderr
    try:
        info = inspect(docker, name)
        cid, monitor = info["Id"], info["State"]["Pid"]
        rel = f"/docker/{cid}"
        qemu = pids_naming("qemu-system", f"/run/vc/vm/{cid}/")
        virtiofsd = pids_naming("virtiofsd", f"/run/vc/vm/{cid}/")
        assert len(qemu) == 1 and virtiofsd
        for pid in (monitor, *qemu, *virtiofsd):
            for c in ("memory", "cpu", "cpuset", "pids"):
                assert cgroup_of(pid, c) == rel, (pid, c)
        assert _figure(rel, "cpu", "cpu.cfs_quota_us") == "100000"
        assert _figure(rel, "cpu", "cpu.cfs_period_us") == "100000"
        assert int(_figure(rel, "memory", "memory.limit_in_bytes")) == (256 + _overhead_mib()) * MiB
        assert int(_figure(rel, "memory", "memory.usage_in_bytes")) > 50 * MiB
        # A later exec's monitor joins its container's cgroup too.
        assert docker.run("exec", "-d", name, "sleep", "1000", timeout=60).returncode == 0
        monitors = pids_naming("kata.runc.monitor", cid)
        assert len(monitors) == 2 and all(cgroup_of(pid, "memory") == rel for pid in monitors), monitors
    finally:
        assert docker.run("rm", "-f", name, timeout=180).returncode == 0
    deadline = time.monotonic() + 10
    while not _gone_everywhere(rel) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone_everywhere(rel)
