"""specconv for pods: the CRI annotations that make a container a pod's sandbox or a member of one,
the sandbox's whole-pod sizing, what a joining container adds, and the pod's shared namespaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kata.config.model import HypervisorConfig
from kata.oci.cri_annotations import CRIO_CONTAINER_TYPE, CRIO_SANDBOX_ID
from kata.oci.spec import Bundle
from kata.specconv import (
    CRI_CONTAINER_TYPE,
    CRI_SANDBOX_CPU_PERIOD,
    CRI_SANDBOX_CPU_QUOTA,
    CRI_SANDBOX_ID,
    CRI_SANDBOX_MEMORY,
    PodRole,
    SpecConvError,
    VMSizing,
    container_growth,
    plan_container,
    pod_resources,
    pod_role,
    vm_sizing,
)

HV = HypervisorConfig(default_vcpus=1, default_memory=512)
MiB = 1024 * 1024


def test_roles_from_cri_annotations() -> None:
    assert pod_role({}, "c1") == PodRole(is_sandbox=True, sandbox_id="c1")
    assert pod_role({CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "p1"}, "p1") == PodRole(True, "p1")
    member = {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "p1"}
    assert pod_role(member, "c2") == PodRole(is_sandbox=False, sandbox_id="p1")
    with pytest.raises(SpecConvError, match="names no other sandbox"):
        pod_role({CRI_CONTAINER_TYPE: "container"}, "c3")


def test_roles_from_cri_o_annotations_as_podman_sets_them() -> None:
    """podman's pod members name the infra container with CRI-O's keys; the infra has none."""
    member = {CRIO_CONTAINER_TYPE: "container", CRIO_SANDBOX_ID: "infra1", "io.container.manager": "libpod"}
    assert pod_role(member, "c2") == PodRole(is_sandbox=False, sandbox_id="infra1")
    assert pod_role({"io.container.manager": "libpod"}, "infra1") == PodRole(True, "infra1")
    with pytest.raises(SpecConvError, match=f"annotation {CRIO_SANDBOX_ID}: invalid id format"):
        pod_role({CRIO_CONTAINER_TYPE: "container", CRIO_SANDBOX_ID: "../x"}, "c3")
    # containerd's keys win where a spec has both
    both = {CRI_CONTAINER_TYPE: "sandbox", CRIO_CONTAINER_TYPE: "container", CRIO_SANDBOX_ID: "p9"}
    assert pod_role(both, "c4") == PodRole(True, "c4")


def sandbox_spec(**annotations: str) -> dict[str, Any]:
    return {"annotations": {CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "p1", **annotations}}


def test_sandbox_is_sized_for_the_whole_pod() -> None:
    spec = sandbox_spec(**{CRI_SANDBOX_CPU_QUOTA: "150000", CRI_SANDBOX_CPU_PERIOD: "100000",
                           CRI_SANDBOX_MEMORY: str(256 * MiB)})
    res = pod_resources(spec)
    assert res is not None
    assert (res.cpu_quota, res.cpu_period, res.memory_limit) == (150000, 100000, 256 * MiB)
    assert vm_sizing(spec, HV, 8, 24000) == VMSizing(vcpus=3, max_vcpus=8, memory_mib=768,
                                                     max_memory_mib=24000)


def test_sandbox_without_pod_limits_gets_the_defaults() -> None:
    assert pod_resources(sandbox_spec()) is None
    assert pod_resources(sandbox_spec(**{CRI_SANDBOX_MEMORY: "0", CRI_SANDBOX_CPU_QUOTA: "-1"})) is None
    assert vm_sizing(sandbox_spec(), HV, 8, 24000) == VMSizing(1, 8, 512, 24000)
    # Not a sandbox: the annotations are another container's business.
    assert pod_resources({"annotations": {CRI_SANDBOX_MEMORY: str(MiB)}}) is None


def test_bad_pod_limit_is_an_error() -> None:
    with pytest.raises(SpecConvError, match=CRI_SANDBOX_MEMORY):
        pod_resources(sandbox_spec(**{CRI_SANDBOX_MEMORY: "lots"}))


def test_joining_container_adds_its_limits() -> None:
    limits = {"memory": {"limit": 100 * MiB + 1}, "cpu": {"quota": 50000, "period": 100000}}
    spec = {"linux": {"resources": limits}}
    assert container_growth(spec) == (1, 101)
    assert container_growth({"linux": {"resources": {"memory": {"limit": -1}}}}) == (0, 0)
    assert container_growth({}) == (0, 0)


def test_pod_member_keeps_the_vms_ipc_and_uts() -> None:
    spec = {"root": {"path": "rootfs"}, "linux": {"namespaces": [
        {"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "mount"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}}
    guest = plan_container(Bundle(path=Path("/b"), spec=spec), "c2").guest_spec
    assert guest["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"},
                                            {"type": "network", "path": "/proc/1/ns/net"}, {"type": "cgroup"}]


POD_NAMESPACES = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                  {"type": "network", "path": "/var/run/netns/cni-1"}]


def test_pod_sandbox_joins_the_vms_ipc_and_uts_and_its_sysctls_go_to_the_agent() -> None:
    spec = {**sandbox_spec(), "root": {"path": "rootfs"}, "hostname": "pod-a",
            "linux": {"namespaces": POD_NAMESPACES, "sysctl": {
                "kernel.shm_rmid_forced": "1", "kernel.msgmax": "10000", "fs.mqueue.msg_max": "20",
                "net.ipv4.ip_unprivileged_port_start": "80"}}}
    plan = plan_container(Bundle(path=Path("/b"), spec=spec), "p1")
    linux = plan.guest_spec["linux"]
    # Its containers join the pod's ipc and uts, which in the VM are the guest's: so does the sandbox.
    assert [ns["type"] for ns in linux["namespaces"]] == ["pid", "mount", "network", "cgroup"]
    assert "hostname" not in plan.guest_spec  # the agent's CreateSandbox set it
    assert plan.pod_sysctls == {"kernel.shm_rmid_forced": "1", "kernel.msgmax": "10000",
                                "fs.mqueue.msg_max": "20"}
    # The network namespace is the VM's own, which crun names by path: crun sets those.
    assert linux["sysctl"] == {"net.ipv4.ip_unprivileged_port_start": "80"}


def test_a_container_with_its_own_namespaces_has_crun_set_its_sysctls() -> None:
    spec = {"root": {"path": "rootfs"}, "hostname": "c",
            "linux": {"namespaces": POD_NAMESPACES, "sysctl": {"kernel.shm_rmid_forced": "1",
                                                               "kernel.domainname": "example"}}}
    plan = plan_container(Bundle(path=Path("/b"), spec=spec), "c1")
    assert plan.guest_spec["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1",
                                                  "kernel.domainname": "example"}
    assert plan.pod_sysctls == {}
    assert plan.guest_spec["hostname"] == "c"


@pytest.mark.parametrize("name, problem", [
    ("vm.swappiness", "not namespaced"),
    ("kernel.pid_max", "not namespaced"),
    ("kernel.hostname", "set the spec's hostname"),
    ("net/../../etc/x", "not a sysctl name"),
    ("net.", "not a sysctl name"),
])
def test_sysctls_no_container_may_set_are_refused_in_one_line(name: str, problem: str) -> None:
    spec = {"root": {"path": "rootfs"}, "linux": {"namespaces": POD_NAMESPACES, "sysctl": {name: "1"}}}
    with pytest.raises(SpecConvError, match=problem):
        plan_container(Bundle(path=Path("/b"), spec=spec), "c1")


def test_the_agent_writes_pod_sysctls_below_proc_sys_only(tmp_path: Path) -> None:
    from kata.guest.agent.sandbox import InvalidArgument
    from kata.guest.agent.sysctl import set_sysctls

    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "shm_rmid_forced").write_text("0")
    (tmp_path / "net" / "ipv4" / "conf" / "eth0.100").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "conf" / "eth0.100" / "forwarding").write_text("0")
    set_sysctls({"kernel.shm_rmid_forced": "1", "net/ipv4/conf/eth0.100/forwarding": "1"}, str(tmp_path))
    assert (tmp_path / "kernel" / "shm_rmid_forced").read_text() == "1"
    assert (tmp_path / "net/ipv4/conf/eth0.100/forwarding").read_text() == "1"
    with pytest.raises(InvalidArgument, match="no such sysctl"):
        set_sysctls({"kernel.msgmax": "1"}, str(tmp_path))
    with pytest.raises(InvalidArgument, match="not namespaced"):
        set_sysctls({"vm.overcommit_memory": "1"}, str(tmp_path))


def test_a_podman_pods_infra_container_joins_the_vms_ipc_and_uts_too() -> None:
    """podman marks its pods with CRI-O's annotations: its infra container is the pod's sandbox."""
    spec = {"annotations": {"io.kubernetes.cri-o.ContainerType": "sandbox"}, "root": {"path": "rootfs"},
            "hostname": "pod-b", "linux": {"namespaces": POD_NAMESPACES, "sysctl": {"kernel.msgmax": "9"}}}
    plan = plan_container(Bundle(path=Path("/b"), spec=spec), "infra")
    kinds = [ns["type"] for ns in plan.guest_spec["linux"]["namespaces"]]
    assert kinds == ["pid", "mount", "network", "cgroup"]
    assert "hostname" not in plan.guest_spec and plan.pod_sysctls == {"kernel.msgmax": "9"}
