"""What Kubernetes' CRI validation checks of a runtime, with runc (the reference) and kata side by side:
a pod's sysctls seen by its containers, what a privileged container builds in its network (a bridge,
a veth pair), a stop sent right after a start ending at once instead of after the grace period, and
an image pulled through PullImage from a registry (a local one, in containerd's network namespace)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from kata.protocols.cri import api_pb2 as cri_pb
from tests.support.cri import CriClient, Pod
from tests.support.cri_config import KATA
from tests.support.daemons import Containerd
from tests.support.images import busybox_oci_archive
from tests.support.registry import local_registry, push

CRI_RUNTIMES = {"kata": KATA}
HANDLERS = ["runc", pytest.param("kata", marks=pytest.mark.vm)]
SLEEPER = ["sleep", "100000"]
POD_SYSCTLS = {
    "kernel.shm_rmid_forced": "1",  # a "safe" sysctl (kubelet's default allow-list)
    "kernel.msgmax": "12345",  # an "unsafe" one, namespaced: the kubelet allows it when told to
    "net.ipv4.ip_unprivileged_port_start": "1000",
}
STOP_GRACE = 30  # seconds: a stop that lost its SIGTERM would wait this long


def _pod(cri: CriClient, containerd: Containerd, name: str, handler: str,
         linux: cri_pb.LinuxPodSandboxConfig | None = None) -> Pod:
    uid = uuid.uuid4().hex[:12]
    return cri.run_pod(name, "default", uid, handler, cgroup_parent=containerd.cgroup_parent,
                       log_directory=str(containerd.base / "pod-logs" / f"default_{name}_{uid}"), linux=linux)


def _sh(cri: CriClient, cid: str, script: str) -> str:
    result = cri.exec_sync(cid, ["sh", "-c", script], timeout=30)
    assert result.exit_code == 0, (script, result)
    return result.stdout.strip()


@pytest.fixture
def handler(request: pytest.FixtureRequest) -> str:
    if request.param == "kata":
        request.getfixturevalue("needs_guest")
    return str(request.param)


@pytest.mark.parametrize("handler", HANDLERS, indirect=True)
def test_pod_sysctls_and_a_privileged_containers_network_devices(
        cri: CriClient, cri_containerd: Containerd, handler: str) -> None:
    privileged = cri_pb.LinuxSandboxSecurityContext(privileged=True)
    pod = _pod(cri, cri_containerd, "sysctls", handler,
               cri_pb.LinuxPodSandboxConfig(sysctls=POD_SYSCTLS, security_context=privileged))
    try:
        plain = cri.run_container(pod, "plain", cri_containerd.image, SLEEPER)
        for name, value in POD_SYSCTLS.items():
            assert _sh(cri, plain, f"cat /proc/sys/{name.replace('.', '/')}") == value, name
        # A privileged container is root in the pod's network: with kata, the VM's, whose kernel
        # must have what CNI plugins, Docker-in-Docker and meshes build there.
        root = cri_pb.LinuxContainerConfig(
            security_context=cri_pb.LinuxContainerSecurityContext(privileged=True))
        priv = cri.run_container(pod, "priv", cri_containerd.image, SLEEPER, linux=root)
        # (busybox's ip names a veth's peer itself: veth0)
        _sh(cri, priv, "ip link add br-k type bridge && brctl addbr br-c && ip link add ve0 type veth"
                       " && ip link set ve0 master br-k && ip link set br-k up")
        links = _sh(cri, priv, "ip -o link show")
        for name in (" br-k:", " br-c:", " ve0@veth0:", "master br-k"):
            assert name in links, links
    finally:
        cri.remove_pod(pod.id)
    assert cri_containerd.traces_of(pod.id) == []


@pytest.mark.parametrize("handler", HANDLERS, indirect=True)
def test_a_stop_right_after_the_start_is_not_lost(cri: CriClient, cri_containerd: Containerd,
                                                  handler: str) -> None:
    """The workload is PID 1 of its container: until its SIGTERM handler is installed, the kernel drops a
    SIGTERM, and StopContainer waits out its grace period before SIGKILL."""
    pod = _pod(cri, cri_containerd, "stops", handler)
    try:
        cid = cri.create_container(pod.id, pod.config, "trapper", cri_containerd.image,
                                   ["sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"])
        cri.start_container(cid)
        began = time.monotonic()
        cri.stop_container(cid, grace=STOP_GRACE, timeout=STOP_GRACE + 30)
        took = time.monotonic() - began
        status = cri.container_status(cid).status
        # exit 0 is the trap's: the SIGTERM was handled, not replaced by the grace period's SIGKILL (137)
        assert (status.exit_code, took < STOP_GRACE / 3) == (0, True), (status.exit_code, took)
    finally:
        cri.remove_pod(pod.id)


@pytest.fixture(scope="module")
def registry_image(cri_containerd: Containerd) -> Iterator[str]:
    """The busybox image, in a registry on loopback of containerd's network namespace."""
    assert cri_containerd.netns
    with local_registry(cri_containerd.netns, cri_containerd.base / "registry") as address:
        ref = f"{address}/kata-test/pulled:v1"
        push(cri_containerd.netns, busybox_oci_archive(), ref)
        yield ref


@pytest.mark.parametrize("handler", HANDLERS, indirect=True)
def test_an_image_pulled_from_a_registry_runs(cri: CriClient, cri_containerd: Containerd, registry_image: str,
                                              handler: str) -> None:
    image_id = cri.pull_image(registry_image, timeout=120)
    status = cri.image_status(registry_image)
    assert status is not None and registry_image in status.repo_tags and status.id == image_id
    pod = _pod(cri, cri_containerd, "pulled", handler)
    try:
        cid = cri.run_container(pod, "from-registry", registry_image, SLEEPER)
        assert _sh(cri, cid, "echo pulled-$(uname -s)") == "pulled-Linux"
    finally:
        cri.remove_pod(pod.id)
