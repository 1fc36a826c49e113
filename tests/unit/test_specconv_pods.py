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
