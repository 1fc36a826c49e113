"""kata.specconv: host spec -> guest spec and shares, and VM sizing, on real and edge-case specs."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from kata.config.model import HypervisorConfig
from kata.oci.spec import Bundle
from kata.specconv import (
    GUEST_SHARED_DIR,
    MAX_SUBMOUNT_BINDS,
    HostShare,
    SpecConvError,
    VMSizing,
    bind_share,
    plan_container,
    shared_binds,
    submount_binds,
    vm_sizing,
)
from tests.conftest import minimal_spec as minimal

REFERENCE = Path("/work/shared/reference")
BUNDLE = Path("/run/containerd/io.containerd.runtime.v2.task/default/c1")
CID = "c1"


def reference(name: str) -> dict[str, Any]:
    # The reference files had host-specific paths replaced by placeholders; put real-looking ones back.
    text = (REFERENCE / name).read_text().replace("<docker-data-root>", "/var/lib/docker")
    data: dict[str, Any] = json.loads(text.replace("<path>", "/var/lib/docker/elsewhere"))
    return data


def bundle_of(spec: dict[str, Any], path: Path = BUNDLE) -> Bundle:
    # plan_container does no I/O, so a Bundle need not point at real files.
    return Bundle(path=path, spec=spec)


def mount_by_dest(spec: dict[str, Any], dest: str) -> dict[str, Any]:
    (m,) = [m for m in spec["mounts"] if m["destination"] == dest]
    return m


# --- plan_container on what docker and containerd really write ---


def test_docker_reference() -> None:
    spec = reference("docker-create-config.json")
    original = copy.deepcopy(spec)
    plan = plan_container(bundle_of(spec), CID)
    g = plan.guest_spec
    assert spec == original  # input untouched

    assert plan.shares[0] == HostShare(spec["root"]["path"], "c1/rootfs", False)
    assert g["root"] == {"path": f"{GUEST_SHARED_DIR}/c1/rootfs", "readonly": False}

    # resolv.conf, hostname, hosts: file bind mounts become shares 7, 8, 9.
    assert [s.name for s in plan.shares[1:]] == ["c1/7-resolv.conf", "c1/8-hostname", "c1/9-hosts"]
    assert [s.source for s in plan.shares[1:]] == [
        "/var/lib/docker/containers/5a142b35d609/resolv.conf",
        "/var/lib/docker/containers/5a142b35d609/hostname",
        "/var/lib/docker/containers/5a142b35d609/hosts",
    ]
    assert not any(s.read_only for s in plan.shares)
    resolv = mount_by_dest(g, "/etc/resolv.conf")
    assert resolv == {
        "destination": "/etc/resolv.conf",
        "type": "bind",
        "source": f"{GUEST_SHARED_DIR}/c1/7-resolv.conf",
        "options": ["rbind", "rprivate"],
    }

    # Virtual filesystems pass through unchanged, in order.
    assert g["mounts"][:7] == spec["mounts"][:7]
    assert len(g["mounts"]) == len(spec["mounts"])

    linux = g["linux"]
    assert [ns["type"] for ns in linux["namespaces"]] == ["mount", "network", "uts", "pid", "ipc", "cgroup"]
    assert linux["cgroupsPath"] == "/kata/c1"
    assert linux["seccomp"] == spec["linux"]["seccomp"]
    assert linux["sysctl"] == spec["linux"]["sysctl"]
    assert linux["resources"] == spec["linux"]["resources"]
    assert "hooks" not in g
    assert g["process"] == spec["process"]
    assert g["hostname"] == "5a142b35d609"
    json.dumps(g)  # still serialisable for the agent


def test_docker_bridge_reference_drops_prestart_hook() -> None:
    spec = reference("docker-bridge-create-config.json")
    plan = plan_container(bundle_of(spec), CID)
    assert spec["hooks"]["prestart"]
    assert "hooks" not in plan.guest_spec


def test_ctr_reference_relative_root_and_no_binds() -> None:
    spec = reference("ctr-create-config.json")
    plan = plan_container(bundle_of(spec), "w-rm")
    assert plan.shares == (HostShare(str(BUNDLE / "rootfs"), "w-rm/rootfs", False),)
    g = plan.guest_spec
    assert g["root"]["path"] == f"{GUEST_SHARED_DIR}/w-rm/rootfs"
    assert g["mounts"] == spec["mounts"]
    assert g["linux"]["maskedPaths"] == spec["linux"]["maskedPaths"]
    assert g["linux"]["readonlyPaths"] == spec["linux"]["readonlyPaths"]
    assert g["linux"]["cgroupsPath"] == "/kata/w-rm"
    assert [ns for ns in g["linux"]["namespaces"] if ns["type"] == "network"] == [
        {"type": "network", "path": "/proc/1/ns/net"}]


# --- plan_container edge cases ---


def test_minimal_spec_no_mounts_no_linux() -> None:
    spec = minimal()
    plan = plan_container(bundle_of(spec), CID)
    assert len(plan.shares) == 1
    assert "mounts" not in plan.guest_spec
    assert "linux" not in plan.guest_spec  # nothing to rewrite, nothing invented
    assert plan.guest_spec["process"] == spec["process"]


def test_empty_mounts_list() -> None:
    plan = plan_container(bundle_of(minimal(mounts=[])), CID)
    assert plan.guest_spec["mounts"] == []
    assert len(plan.shares) == 1


# --- newer runtime-spec versions, told as one the guest's crun 1.8.1 takes ---


@pytest.mark.parametrize(("version", "told"), [("1.0.2", "1.0.2"), ("1.1.0", "1.1.0"), ("1.2.0", "1.1.0"),
                                               ("1.2.1", "1.1.0")])
def test_the_guest_spec_carries_a_version_its_crun_takes(version: str, told: str) -> None:
    spec = reference("ctr-create-config.json")
    spec["ociVersion"] = version
    g = plan_container(bundle_of(spec), CID).guest_spec
    assert g["ociVersion"] == told
    assert spec["ociVersion"] == version  # the bundle's spec is left as it was
    assert g["process"] == spec["process"] and g["mounts"] == spec["mounts"]


def test_relative_destinations_of_a_1_2_spec_become_absolute() -> None:
    mounts = [{"destination": "run/x", "type": "tmpfs", "source": "tmpfs"},
              {"destination": "data", "type": "bind", "source": "/srv/data", "options": ["rbind"]},
              {"destination": "/abs", "type": "tmpfs", "source": "tmpfs"}]
    g = plan_container(bundle_of(minimal(ociVersion="1.2.0", mounts=mounts)), CID).guest_spec
    assert [m["destination"] for m in g["mounts"]] == ["/run/x", "/data", "/abs"]
    assert g["mounts"][1]["source"] == f"{GUEST_SHARED_DIR}/c1/1-data"
    assert mounts[0]["destination"] == "run/x"


def test_readonly_rootfs() -> None:
    plan = plan_container(bundle_of(minimal(root={"path": "rootfs", "readonly": True})), CID)
    # The guest runtime makes the root read-only after creating mount points in it.
    assert plan.shares[0].read_only is False
    assert plan.guest_spec["root"]["readonly"] is True


def test_absolute_root_path() -> None:
    plan = plan_container(bundle_of(minimal(root={"path": "/var/lib/x/merged"})), CID)
    assert plan.shares[0].source == "/var/lib/x/merged"


def test_relative_root_path_with_dots() -> None:
    plan = plan_container(bundle_of(minimal(root={"path": "./rootfs"})), CID)
    assert Path(plan.shares[0].source) == BUNDLE / "rootfs"


def test_bind_variants_and_read_only() -> None:
    mounts = [
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
        {"destination": "/cfg", "type": "none", "source": "/etc/app/", "options": ["bind"]},
        {"destination": "/rel", "source": "volumes/v1", "options": ["rbind", "rw"]},
        {"destination": "/root-of-host", "type": "bind", "source": "/", "options": ["rbind"]},
        {"destination": "/odd", "type": "bind", "source": "/srv/a b:c", "options": []},
    ]
    plan = plan_container(bundle_of(minimal(mounts=mounts)), CID)
    # "rbind" takes the source's submounts along; "bind" (or no option: runc's default) does not.
    assert plan.shares[1:] == (
        HostShare("/srv/data", "c1/0-data", True),
        HostShare("/etc/app", "c1/1-app", False, recursive=False),
        HostShare(str(BUNDLE / "volumes/v1"), "c1/2-v1", False),
        HostShare("/", "c1/3-root", False),
        HostShare("/srv/a b:c", "c1/4-a_b_c", False, recursive=False),
    )
    g = plan.guest_spec["mounts"]
    assert g[0] == {
        "destination": "/data",
        "type": "bind",
        "source": f"{GUEST_SHARED_DIR}/c1/0-data",
        "options": ["rbind", "ro"],
    }
    assert g[1]["type"] == "none" and g[1]["options"] == ["bind"]
    assert g[2]["source"] == f"{GUEST_SHARED_DIR}/c1/2-v1"
    assert "type" not in g[2]
    # Every share name is unique and lies under the container's prefix.
    names = [s.name for s in plan.shares]
    assert len(set(names)) == len(names)
    assert all(n.startswith("c1/") for n in names)


@pytest.mark.parametrize(("options", "top", "below"), [
    (["rbind", "ro"], True, False),  # runc's "ro": the mount itself; submounts keep their flags
    (["rbind", "rro"], True, True),  # runtime-spec 1.1's recursive read-only
    (["rbind", "ro", "rw"], False, False),  # the last of ro/rw wins
    (["rbind", "rro", "rw"], True, True),  # rro is applied after the flags, as runc does
    (["rbind", "ro", "rrw"], False, False),  # ...and so is rrw, which clears every mount's flag
    (["rbind", "rrw", "rro"], True, True),  # the last of rro/rrw wins
    (["rbind"], False, False),
])
def test_read_only_options_as_runc_reads_them(options: list[str], top: bool, below: bool) -> None:
    share = bind_share("/src", "c1/0-src", options)
    assert (share.read_only, share.recursive_read_only) == (top, below)
    assert share.read_only_at_top == (top and not below)


@pytest.mark.parametrize(("options", "slave"), [
    (["rbind", "rslave"], True),
    (["bind", "slave"], True),
    # A VM cannot send the guest's mounts to the host: shared becomes slave (see docs/security.md).
    (["rbind", "rshared"], True),
    (["bind", "shared"], True),
    (["rbind", "rprivate"], False),
    (["rbind", "rslave", "rprivate"], False),  # the last propagation option wins
    (["rbind", "runbindable"], False),
    (["rbind"], False),
])
def test_propagation_options_decide_whether_host_mounts_come_in(options: list[str], slave: bool) -> None:
    assert bind_share("/src", "c1/0-src", options).slave is slave


def test_propagation_options_reach_the_guest_unchanged() -> None:
    """crun in the guest applies them to the container's own mount (what runtime-tools looks at)."""
    mounts = [{"destination": f"/m{i}", "source": "/etc", "options": ["bind", prop]}
              for i, prop in enumerate(["shared", "rshared", "slave", "rslave"])]
    mounts.append({"destination": "/t", "type": "tmpfs", "source": "tmpfs", "options": ["shared"]})
    plan = plan_container(bundle_of(minimal(mounts=mounts)), CID)
    assert [m["options"] for m in plan.guest_spec["mounts"]] == [m["options"] for m in mounts]
    assert all(s.slave for s in plan.shares[1:])
    # The binds warned about: shared one way only (a tmpfs of the guest's own is shared in full).
    assert shared_binds(plan.guest_spec) == ["/m0", "/m1"]


def test_each_submount_of_a_volume_read_only_at_its_top_gets_its_host_flag() -> None:
    volume = {"destination": "/vol", "type": "bind", "source": "/srv/v", "options": ["rbind", "ro", "rslave"]}
    mounts = [volume, {"destination": "/after", "type": "tmpfs", "source": "tmpfs"}]
    plan = plan_container(bundle_of(minimal(mounts=mounts)), CID)
    share = plan.shares[1]
    subs = [("a", False), ("a/b c", True), ("d", False)]
    spec = submount_binds(plan.guest_spec, share, subs)
    source = f"{GUEST_SHARED_DIR}/c1/0-v"

    def bind(relative: str, flag: str) -> dict[str, Any]:
        return {"destination": f"/vol/{relative}", "type": "bind", "source": f"{source}/{relative}",
                "options": ["rbind", flag, "rslave"]}

    added = [bind("a", "rw"), bind("a/b c", "ro"), bind("d", "rw")]
    assert spec["mounts"] == [volume | {"source": source}, *added, mounts[1]]
    assert len(plan.guest_spec["mounts"]) == 2  # the plan's own spec is left alone


def test_submount_binds_are_bounded_and_stay_below_the_volume() -> None:
    mounts = [{"destination": "/vol", "source": "/srv/vol", "options": ["rbind", "ro"]}]
    plan = plan_container(bundle_of(minimal(mounts=mounts)), CID)
    many = [(f"m{i}", False) for i in range(MAX_SUBMOUNT_BINDS + 10)]
    spec = submount_binds(plan.guest_spec, plan.shares[1], [("../x", False), ("/etc", False), *many])
    added = spec["mounts"][1:]
    assert len(added) == MAX_SUBMOUNT_BINDS - 2
    assert all(m["destination"].startswith("/vol/m") for m in added)


@pytest.mark.parametrize("options", [["rbind", "rro"], ["rbind"], ["bind", "ro"]])
def test_no_submount_binds_where_the_guest_flags_are_right_already(options: list[str]) -> None:
    """rro: every guest submount inherits the volume's read-only flag, as it should; rw: they
    inherit rw and the host refuses what its flags refuse; "bind": the share has no submounts."""
    mounts = [{"destination": "/v", "source": "/s", "options": options}]
    plan = plan_container(bundle_of(minimal(mounts=mounts)), CID)
    assert submount_binds(plan.guest_spec, plan.shares[1], [("a", False)]) is plan.guest_spec


@pytest.mark.parametrize("cid", ["../c1", "", "c/1"])
def test_a_container_id_is_checked_before_shares_are_named_from_it(cid: str) -> None:
    with pytest.raises(SpecConvError, match="invalid id format|cannot be empty"):
        plan_container(bundle_of(minimal()), cid)


def test_same_basename_twice_stays_unique() -> None:
    mounts = [
        {"destination": "/a", "type": "bind", "source": "/x/conf", "options": ["rbind"]},
        {"destination": "/b", "type": "bind", "source": "/y/conf", "options": ["rbind"]},
    ]
    names = [s.name for s in plan_container(bundle_of(minimal(mounts=mounts)), CID).shares[1:]]
    assert names == ["c1/0-conf", "c1/1-conf"]


def test_unsupported_mount_type() -> None:
    mounts = [{"destination": "/mnt", "type": "ext4", "source": "/dev/sdb1", "options": []}]
    with pytest.raises(SpecConvError, match="mount /mnt: type 'ext4' cannot be passed into the VM"):
        plan_container(bundle_of(minimal(mounts=mounts)), CID)


def test_bind_without_source() -> None:
    mounts = [{"destination": "/mnt", "type": "bind", "options": ["rbind"]}]
    with pytest.raises(SpecConvError, match="bind mount without a source"):
        plan_container(bundle_of(minimal(mounts=mounts)), CID)


def test_host_only_parts_dropped() -> None:
    spec = minimal(
        hooks={"poststop": [{"path": "/usr/bin/cleanup"}]},
        linux={
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
            ],
            "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": "system.slice:docker:abc",
            "mountLabel": "system_u:object_r:container_file_t:s0",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        },
    )
    spec["process"].update(
        apparmorProfile="docker-default",
        selinuxLabel="system_u:system_r:container_t:s0",
        rlimits=[{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
    )
    original = copy.deepcopy(spec)
    g = plan_container(bundle_of(spec), CID).guest_spec
    assert spec == original
    assert "hooks" not in g
    linux = g["linux"]
    # ipc and uts joined by path are the pod's: the guest's own (tests/unit/test_specconv_pods.py).
    assert linux["namespaces"] == [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"},
                                   {"type": "cgroup"}]
    assert linux["devices"] == original["linux"]["devices"]  # made in the guest by crun
    assert linux["resources"] == original["linux"]["resources"]  # cgroup device rules stay
    assert linux["cgroupsPath"] == "/kata/c1"
    assert "mountLabel" not in linux
    assert linux["rlimits"] == original["linux"]["rlimits"]
    assert linux["uidMappings"] == original["linux"]["uidMappings"]
    assert "apparmorProfile" not in g["process"] and "selinuxLabel" not in g["process"]
    assert g["process"]["rlimits"] == original["process"]["rlimits"]


def test_guest_spec_not_shared_with_input() -> None:
    spec = reference("ctr-create-config.json")
    g = plan_container(bundle_of(spec), CID).guest_spec
    g["process"]["args"].append("x")
    g["linux"]["resources"]["cpu"]["shares"] = 1
    assert spec["process"]["args"] == ["/bin/true"]
    assert spec["linux"]["resources"]["cpu"]["shares"] == 1024


# --- vm_sizing ---

HV = HypervisorConfig()  # default_vcpus 1, default_maxvcpus 0, default_memory 512


def hv(**changes: Any) -> HypervisorConfig:
    return dataclasses.replace(HV, **changes)


def resources(
    memory: int | None = None, quota: int | None = None, period: int | None = None
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if memory is not None:
        res["memory"] = {"limit": memory}
    if quota is not None or period is not None:
        res["cpu"] = {k: v for k, v in (("quota", quota), ("period", period)) if v is not None}
    return {"linux": {"resources": res}}


def test_sizing_defaults_for_reference_specs() -> None:
    for name in ("docker-create-config.json", "ctr-create-config.json"):
        assert vm_sizing(reference(name), HV, 2, 24000) == VMSizing(1, 2, 512, 24000)


def test_sizing_missing_linux_section() -> None:
    assert vm_sizing(minimal(), HV, 2, 24000) == VMSizing(1, 2, 512, 24000)


def test_sizing_docker_memory_64m_cpus_half() -> None:
    # docker run --memory 64m --cpus 0.5
    spec = {
        "linux": {
            "resources": {
                "memory": {"limit": 67108864, "swap": 134217728},
                "cpu": {"shares": 0, "quota": 50000, "period": 100000},
            }
        }
    }
    assert vm_sizing(spec, HV, 2, 24000) == VMSizing(vcpus=2, max_vcpus=2, memory_mib=576,
                                                         max_memory_mib=24000)
    assert vm_sizing(spec, HV, 8, 24000) == VMSizing(vcpus=2, max_vcpus=8, memory_mib=576,
                                                         max_memory_mib=24000)


@pytest.mark.parametrize(
    ("quota", "period", "host_cpus", "expected"),
    [
        (100000, 100000, 8, 2),  # --cpus 1
        (150000, 100000, 8, 3),  # --cpus 1.5 rounds up
        (400000, 100000, 8, 5),
        (400000, 100000, 2, 2),  # capped by max (the host)
        (50000, None, 8, 2),  # unset period: kernel default 100 ms
        (-1, 100000, 8, 1),  # unlimited
        (None, 100000, 8, 1),  # period alone means nothing
    ],
)
def test_sizing_cpu_quota(quota: int | None, period: int | None, host_cpus: int, expected: int) -> None:
    assert vm_sizing(resources(quota=quota, period=period), HV, host_cpus, 24000).vcpus == expected


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (67108864, 576),  # 64 MiB
        (1, 513),  # any partial MiB rounds up
        (1024 * 1024 + 1, 514),
        (-1, 512),  # unlimited
        (0, 512),
        (9223372036854771712, 24000),  # docker's "no limit" sentinel on some versions: capped by the host
    ],
)
def test_sizing_memory_limit(limit: int, expected: int) -> None:
    assert vm_sizing(resources(memory=limit), HV, 2, 24000).memory_mib == expected


@pytest.mark.parametrize(
    ("default_vcpus", "default_maxvcpus", "host_cpus", "expected"),
    [
        (1, 0, 2, (1, 2)),
        (0, 0, 4, (1, 4)),  # 0 means 1
        (-1, 0, 4, (4, 4)),  # negative means all host CPUs
        (16, 0, 4, (4, 4)),  # more than the host: the host
        (2, 1, 4, (2, 2)),  # max never below the start count
        (1, 3, 4, (1, 3)),
        (1, 64, 4, (1, 4)),  # max above the host: the host
        (1, 0, 0, (1, 1)),  # host count unknown
    ],
)
def test_sizing_vcpu_rules(
    default_vcpus: int, default_maxvcpus: int, host_cpus: int, expected: tuple[int, int]
) -> None:
    config = hv(default_vcpus=default_vcpus, default_maxvcpus=default_maxvcpus)
    s = vm_sizing(minimal(), config, host_cpus, 24000)
    assert (s.vcpus, s.max_vcpus) == expected


def test_sizing_quota_capped_by_configured_max() -> None:
    s = vm_sizing(resources(quota=300000, period=100000), hv(default_maxvcpus=2), 8, 24000)
    assert s == VMSizing(2, 2, 512, 24000)


def test_sizing_memory_defaults() -> None:
    assert vm_sizing(minimal(), hv(default_memory=2048), 2, 24000).memory_mib == 2048
    assert vm_sizing(minimal(), hv(default_memory=0), 2, 24000).memory_mib == 512  # 0 means default
    assert vm_sizing(minimal(), HV, 2, 300).memory_mib == 300  # small host
    assert vm_sizing(minimal(), HV, 2, 0).memory_mib == 512  # host size unknown: no cap


def test_sizing_does_not_modify_spec() -> None:
    spec = resources(memory=67108864, quota=50000, period=100000)
    before = copy.deepcopy(spec)
    vm_sizing(spec, HV, 2, 24000)
    assert spec == before
