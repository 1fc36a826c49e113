"""Kubernetes-style pods driven through containerd's CRI API, the same checks with the handlers "runc"
(the reference) and "kata" (containerd-shim-kata-v2: one VM per pod).

Two containers of a pod share its network namespace (one reaches the other on 127.0.0.1), a second pod
reaches the first on its CNI address, and StopPodSandbox/RemovePodSandbox leave nothing behind. With
kata, the pod's containers share one VM (one QEMU, one shim), whose eth0 has the pod's CNI address.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata.config.load import PACKAGED_CONFIG
from kata.protocols.cri import api_pb2 as cri_pb
from tests.conftest import pids_naming, process_gone
from tests.integration.conftest import daemons_unavailable
from tests.support.cri import CriClient, CriError, ExecResult, Pod
from tests.support.cri_config import CRI_NAMESPACE, DEFAULT_POD_SUBNET, KATA
from tests.support.daemons import Containerd, cri_missing_tools
from tests.support.images import PAUSE_REF
from tests.support.mounts import PROBE_WRITE, mount_tmpfs, shared_volume
from tests.support.netns import temporary_netns

# The kata handlers' configurations: the default one with the pods' sizing annotations allowed, and
# the same on a q35 machine, whose VM can grow by hotplug.
KATA_CONFIG = Path("/run/kata-cri-pods-configuration.toml")
KATA_Q35_CONFIG = Path("/run/kata-cri-pods-q35-configuration.toml")
CRI_RUNTIMES = {"kata": dataclasses.replace(KATA, options={"ConfigPath": str(KATA_CONFIG)}),
                "kata-q35": dataclasses.replace(KATA, options={"ConfigPath": str(KATA_Q35_CONFIG)})}
MiB = 1024 * 1024
HANDLERS = ["runc", pytest.param("kata", marks=pytest.mark.vm)]
PORT = 8080
PAGE = "hello-from-web"
# busybox httpd in the foreground, serving one page
SERVER = ["sh", "-c", f"mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p {PORT} -h /www"]
SLEEPER = ["sleep", "100000"]


def _until(check: Callable[[], ExecResult], timeout: float = 30.0) -> ExecResult:
    """Repeat an exec until it succeeds (a server that is still starting), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result.exit_code == 0 or time.monotonic() >= deadline:
            return result
        time.sleep(0.2)


def _fetch(cri: CriClient, cid: str, host: str) -> ExecResult:
    """An HTTP GET with nc (Debian's static busybox wget crashes, even on the host)."""
    script = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {PORT}"
    return cri.exec_sync(cid, ["sh", "-c", script], timeout=20)


def _body(result: ExecResult) -> str:
    assert result.exit_code == 0 and " 200 " in result.stdout.splitlines()[0], result
    return result.stdout.split("\r\n\r\n", 1)[1]


@pytest.fixture(scope="module", autouse=True)
def kata_config() -> Iterator[Path]:
    text = PACKAGED_CONFIG.read_text()
    assert "enable_annotations = []" in text
    text = text.replace("enable_annotations = []", 'enable_annotations = ["default_vcpus", "default_memory"]')
    KATA_CONFIG.write_text(text)
    assert 'machine_type = "microvm"' in text
    KATA_Q35_CONFIG.write_text(text.replace('machine_type = "microvm"', 'machine_type = "q35"'))
    yield KATA_CONFIG
    KATA_CONFIG.unlink(missing_ok=True)
    KATA_Q35_CONFIG.unlink(missing_ok=True)


def _run_pod(cri: CriClient, containerd: Containerd, name: str, handler: str = "runc") -> Pod:
    uid = uuid.uuid4().hex[:12]
    return cri.run_pod(name, "default", uid, handler, cgroup_parent=containerd.cgroup_parent,
                       log_directory=str(containerd.base / "pod-logs" / f"default_{name}_{uid}"),
                       annotations={"io.katacontainers.config.hypervisor.default_vcpus": "1"})


def _ctr_ids(containerd: Containerd, what: str) -> list[str]:
    proc = containerd.ctr(what, "ls", "-q", namespace=CRI_NAMESPACE, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_runtime_ready_and_images(cri: CriClient, cri_containerd: Containerd) -> None:
    version = cri.version()
    assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
    assert cri.conditions() == {"RuntimeReady": True, "NetworkReady": True}
    for ref in (PAUSE_REF, cri_containerd.image):
        image = cri.image_status(ref)
        assert image is not None and ref in image.repo_tags, ref
    assert cri.image_status("docker.io/library/no-such-image:latest") is None
    assert {PAUSE_REF, cri_containerd.image} <= {t for i in cri.list_images() for t in i.repo_tags}



@pytest.mark.parametrize("handler", HANDLERS)
def test_pods_share_and_reach_networks(cri: CriClient, cri_containerd: Containerd, handler: str,
                                       request: pytest.FixtureRequest) -> None:
    if handler == "kata":
        request.getfixturevalue("needs_guest")
    web = _run_pod(cri, cri_containerd, "web", handler)
    pods = [web]
    try:
        status = cri.pod_sandbox_status(web.id).status
        assert status.state == 0 and status.runtime_handler == handler  # SANDBOX_READY
        assert status.metadata.name == "web"
        assert status.annotations["io.katacontainers.config.hypervisor.default_vcpus"] == "1"
        web_ip = status.network.ip
        assert ipaddress.ip_address(web_ip) in ipaddress.ip_network(DEFAULT_POD_SUBNET)
        netns = cri.pod_netns(web.id)
        assert netns.startswith(str(cri_containerd.base)) and os.path.exists(netns)

        server = cri.run_container(web, "server", cri_containerd.image, SERVER)
        sidecar = cri.run_container(web, "sidecar", cri_containerd.image, SLEEPER)
        listed = {c.metadata.name: c for c in cri.list_containers(web.id)}
        assert set(listed) == {"server", "sidecar"}
        assert all(cri.container_state(c) == "CONTAINER_RUNNING" for c in (server, sidecar))

        # Both containers are in the pod's network namespace: its hostname, its address.
        for cid in (server, sidecar):
            assert cri.exec_sync(cid, ["hostname"]) == ExecResult(0, "web\n", "")
            addr = cri.exec_sync(cid, ["ip", "-4", "-o", "addr", "show", "eth0"])
            assert addr.exit_code == 0 and f" {web_ip}/" in addr.stdout, addr
        assert cri.exec_sync(sidecar, ["sh", "-c", "echo out; echo err >&2; exit 7"]) == \
            ExecResult(7, "out\n", "err\n")
        # The container's figures, from the runtime's task metrics.
        stats = cri.container_stats(sidecar)
        assert stats.attributes.id == sidecar and stats.attributes.metadata.name == "sidecar"
        assert stats.memory.working_set_bytes.value > 0 and stats.cpu.usage_core_nano_seconds.value > 0
        if handler == "kata":
            # One VM for the pod: its kernel in both containers, one QEMU and one shim for the pod.
            host_kernel = open("/proc/sys/kernel/osrelease").read().strip()
            kernels = {cri.exec_sync(cid, ["uname", "-r"]).stdout for cid in (server, sidecar)}
            assert len(kernels) == 1 and kernels != {host_kernel + "\n"}
            assert len(pids_naming("qemu-system", web.id)) == 1
            assert len(pids_naming("containerd-shim-kata-v2", web.id)) == 1

        # A container whose command does not exist fails to start; the pod goes on, and nothing of
        # the container stays (no mount names it, in the runtime's directories either).
        broken = cri.create_container(web.id, web.config, "broken", cri_containerd.image, ["/no/such/binary"])
        with pytest.raises(CriError, match="no/such/binary"):
            cri.start_container(broken)
        cri.remove_container(broken)
        assert cri_containerd.traces_of(broken) == []
        assert broken not in open("/proc/self/mountinfo").read()
        assert cri.exec_sync(server, ["true"]).exit_code == 0

        # The sidecar reaches the server on loopback, shared by the pod.
        assert _body(_until(lambda: _fetch(cri, sidecar, "127.0.0.1"))) == PAGE + "\n"

        # Another pod reaches it on the pod's address, across the CNI bridge.
        client_pod = _run_pod(cri, cri_containerd, "client", handler)
        pods.append(client_pod)
        client_ip = cri.pod_ip(client_pod.id)
        assert client_ip and client_ip != web_ip
        client = cri.run_container(client_pod, "wget", cri_containerd.image, SLEEPER)
        assert _body(_until(lambda: _fetch(cri, client, web_ip))) == PAGE + "\n"

        # A container stops and goes on its own; the pod stays.
        cri.stop_container(sidecar, grace=0)
        assert cri.container_state(sidecar) == "CONTAINER_EXITED"
        cri.remove_container(sidecar)
        assert [c.metadata.name for c in cri.list_containers(web.id)] == ["server"]
        assert cri_containerd.traces_of(sidecar) == []

        # StopPodSandbox ends its containers and its network; RemovePodSandbox removes it all.
        cri.stop_pod_sandbox(web.id)
        assert cri.pod_sandbox_status(web.id).status.state == 1  # SANDBOX_NOTREADY
        assert cri.container_state(server) == "CONTAINER_EXITED"
        assert not os.path.exists(netns)
        cri.remove_pod_sandbox(web.id)
        assert web.id not in {p.id for p in cri.list_pod_sandbox()}
        assert cri.list_containers(web.id) == []
        assert cri_containerd.traces_of(web.id) == []
        assert cri_containerd.traces_of(server) == []
        cri.remove_pod_sandbox(web.id)  # idempotent, as kubelet expects
    finally:
        for pod in pods:
            cri.remove_pod(pod.id)
    assert cri.list_pod_sandbox() == []
    assert _ctr_ids(cri_containerd, "containers") == [] and _ctr_ids(cri_containerd, "tasks") == []
    assert [t for pod in pods for t in cri_containerd.traces_of(pod.id)] == []


@pytest.mark.parametrize("handler", HANDLERS)
def test_volumes_read_only_over_a_submount_and_host_mounts_propagated(
        cri: CriClient, cri_containerd: Containerd, handler: str, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    """Volumes of a host directory with a tmpfs below it, the same checks for runc and kata.
    readonly, which containerd 1.6 applies to the volume's own mount only (it has no
    recursive_read_only; rro is tested through kata-runtime): the top is read-only, the tmpfs
    writable. HOST_TO_CONTAINER (rslave) and BIDIRECTIONAL (rshared, which kata takes as rslave):
    a tmpfs the host mounts after the start appears in the container; a private volume keeps it out."""
    if handler == "kata":
        request.getfixturevalue("needs_guest")
    with shared_volume(tmp_path / "vol") as vol:
        pod = _run_pod(cri, cri_containerd, "volumes", handler)
        try:
            mounts = [cri_pb.Mount(container_path="/ro", host_path=str(vol), readonly=True)] + [
                cri_pb.Mount(container_path=path, host_path=str(vol), propagation=propagation)
                for path, propagation in (("/h2c", cri_pb.PROPAGATION_HOST_TO_CONTAINER),
                                          ("/bidi", cri_pb.PROPAGATION_BIDIRECTIONAL))]
            cid = cri.run_container(pod, "volumes", cri_containerd.image, SLEEPER, mounts=mounts)
            probe = PROBE_WRITE + "w /ro/top; w /ro/sub/f"
            assert cri.exec_sync(cid, ["sh", "-c", probe]) == ExecResult(0, "/ro/top ro\n/ro/sub/f rw\n", "")
            assert (vol / "sub" / "f").read_text() == "x\n"

            mount_tmpfs(vol / "late", "file", "mounted after the start\n")
            for path in ("/h2c/late/file", "/bidi/late/file"):
                seen = _until(functools.partial(cri.exec_sync, cid, ["cat", path]))
                assert seen == ExecResult(0, "mounted after the start\n", ""), (path, seen)
            assert cri.exec_sync(cid, ["ls", "/ro/late"]) == ExecResult(0, "", "")
        finally:
            cri.remove_pod(pod.id)
        assert cri_containerd.traces_of(pod.id) == []


def test_stop_removes_running_pods() -> None:
    """A containerd stopped with a pod still running removes it through the CRI: no shim, container
    process, network namespace, mount, cgroup or CNI cache entry remains."""
    reason = daemons_unavailable() or ", ".join(cri_missing_tools())
    if reason:
        pytest.skip(reason)
    with temporary_netns("ktcri") as netns_name:
        daemon = Containerd(cri=True, netns=netns_name).start()
        try:
            daemon.import_image(namespace=CRI_NAMESPACE)
            with daemon.cri_client() as cri:
                pod = _run_pod(cri, daemon, "abandoned")
                cid = cri.run_container(pod, "sleeper", daemon.image, SLEEPER)
                netns = cri.pod_netns(pod.id)
                pid = cri.container_pid(cid)
            assert pid and not process_gone(pid) and daemon.traces_of(pod.id) != []
        finally:
            daemon.stop()
        assert daemon.leftovers() == []
        assert not os.path.exists(netns) and process_gone(pid)


def _guest_memory_kib(cri: CriClient, cid: str) -> int:
    meminfo = cri.exec_sync(cid, ["head", "-1", "/proc/meminfo"]).stdout.split()
    return int(meminfo[1])


@pytest.mark.vm
@pytest.mark.usefixtures("needs_guest")
def test_kata_pod_vm_grows_when_limited_containers_join(cri: CriClient, cri_containerd: Containerd) -> None:
    pod = _run_pod(cri, cri_containerd, "grows", "kata-q35")
    try:
        first = cri.run_container(pod, "first", cri_containerd.image, SLEEPER)
        before = _guest_memory_kib(cri, first)
        cpus_before = int(cri.exec_sync(first, ["nproc"]).stdout)
        limits = cri_pb.LinuxContainerConfig(resources=cri_pb.LinuxContainerResources(
            memory_limit_in_bytes=256 * MiB, cpu_quota=100000, cpu_period=100000))
        second = cri.run_container(pod, "second", cri_containerd.image, SLEEPER, linux=limits)
        # The VM took the container's 256 MiB (hot-added, onlined by the agent) and one more vCPU.
        assert _guest_memory_kib(cri, first) - before >= 250 * 1024
        assert int(cri.exec_sync(first, ["nproc"]).stdout) == cpus_before + 1
        # The container's own limit applies inside the VM.
        limit = cri.exec_sync(second, ["cat", "/sys/fs/cgroup/memory.max"]).stdout.strip()
        assert limit == str(256 * MiB)
        # A larger limit later (kubelet's UpdateContainerResources): the VM grows by the difference.
        grown = _guest_memory_kib(cri, first)
        cri.update_container_resources(second, cri_pb.LinuxContainerResources(
            memory_limit_in_bytes=512 * MiB, cpu_quota=100000, cpu_period=100000))
        assert cri.exec_sync(second, ["cat", "/sys/fs/cgroup/memory.max"]).stdout.strip() == str(512 * MiB)
        assert _guest_memory_kib(cri, first) - grown >= 250 * 1024
        # The kubelet repeats an update it is unsure of: the VM does not grow again.
        regrown = _guest_memory_kib(cri, first)
        cri.update_container_resources(second, cri_pb.LinuxContainerResources(
            memory_limit_in_bytes=512 * MiB, cpu_quota=100000, cpu_period=100000))
        assert _guest_memory_kib(cri, first) == regrown
    finally:
        cri.remove_pod(pod.id)
    assert cri_containerd.traces_of(pod.id) == []


@pytest.mark.vm
@pytest.mark.usefixtures("needs_guest")
def test_kata_pod_qemu_killed_reports_exits_and_leaves_nothing(cri: CriClient,
                                                                 cri_containerd: Containerd) -> None:
    pod = _run_pod(cri, cri_containerd, "doomed", "kata")
    try:
        cid = cri.run_container(pod, "sleeper", cri_containerd.image, SLEEPER)
        (qemu,) = pids_naming("qemu-system", pod.id)
        os.kill(qemu, 9)
        # containerd hears every task of the pod exit (status 255, the VM is gone).
        deadline = time.monotonic() + 60
        while cri.container_state(cid) != "CONTAINER_EXITED":
            assert time.monotonic() < deadline, "the container never exited"
            time.sleep(0.2)
        assert cri.container_status(cid).status.exit_code == 255
        cri.stop_pod_sandbox(pod.id)
        cri.remove_pod_sandbox(pod.id)
    finally:
        cri.remove_pod(pod.id)
    assert cri_containerd.traces_of(pod.id) == [] and cri_containerd.traces_of(cid) == []
    assert not pids_naming("containerd-shim-kata-v2", pod.id)


@pytest.mark.vm
@pytest.mark.usefixtures("needs_guest")
def test_ctr_run_with_the_kata_shim_beside_cri(cri_containerd: Containerd) -> None:
    """`ctr run --runtime io.containerd.kata.v2` on the same CRI-enabled containerd as the pods."""
    proc = cri_containerd.ctr("run", "--rm", "--runtime", "io.containerd.kata.v2", cri_containerd.image,
                              "ctr-beside-cri", "sh", "-c", "echo in-vm; uname -r; exit 4",
                              namespace=CRI_NAMESPACE, timeout=180)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 4 and lines[0] == "in-vm", proc.stderr
    assert lines[1] != open("/proc/sys/kernel/osrelease").read().strip()
    assert cri_containerd.traces_of("ctr-beside-cri") == []
