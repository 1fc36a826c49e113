"""Host cgroups: cgroupsPath in both notations and its refusals (kata.cgroups.path), the pod's figures
(kata.sandbox.host_cgroups), what the v1 and v2 writers put where (a directory laid out as the kernel
lays out a cgroup), and the real thing on this host: its v1 controllers, and its cgroup2 mount
(unified/ on a hybrid host, / on a v2 one), where making, joining, refusing single threads and removing
with stragglers are the kernel's own behaviour."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.cgroups.host import (
    CgroupError,
    CgroupsV1,
    CgroupsV2,
    Hierarchy,
    HostCgroups,
    Limits,
    _mount_id_of,
    host_cgroups,
    layout,
    shares_to_weight,
)
from kata.cgroups.path import CgroupPathError, overhead_cgroup, sandbox_cgroup
from kata.oci.spec import Resources
from kata.sandbox.host_cgroups import figures, pod_limits, updated

MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


# ---- cgroupsPath -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "rel"), [
    ("/kubepods/burstable/pod1/abc", "kubepods/burstable/pod1/abc"),
    ("/docker/0123abcd", "docker/0123abcd"),
    ("docker//0123abcd/", "docker/0123abcd"),  # relative, doubled slashes: as runc cleans them
    ("", ""),  # nothing asked: nothing made
    ("kubepods-burstable-pod1_2.slice:cri-containerd:abc",
     "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice/cri-containerd-abc.scope"),
    ("system.slice:docker:abc", "system.slice/docker-abc.scope"),
    (":runc:abc", "system.slice/runc-abc.scope"),  # runc's default slice
    ("-.slice:p:abc", "p-abc.scope"),  # the root slice
    ("machine.slice:p:pod.slice", "machine.slice/pod.slice"),  # a unit that is a slice itself
    ("a.slice::abc", "a.slice/abc.scope"),
    ("a.slice:p:..", "a.slice/p-...scope"),  # a name, never a step up
    ("a.slice:p:../x", "a.slice:p:../x"),  # a slash: cgroupfs notation, whose ".." is its own name
])
def test_cgroups_path_notations(given: str, rel: str) -> None:
    assert sandbox_cgroup(given) == rel


@pytest.mark.parametrize(("given", "why"), [
    ("/", "root cgroup"),
    ("//", "root cgroup"),
    ("/a/../../etc", "would leave"),
    ("..", "would leave"),
    ("/a/./b", "would leave"),
    ("/a/b\nc", "control characters"),
    ("/a/\x00", "control characters"),
    ("/a/cgroup.procs", "interface file"),
    ("/a/tasks", "interface file"),
    ("/kata_overhead/other", "runtime's own"),
    ("/" + "x" * 256, "longer than 255"),
    ("/a" * 2100, "longer than 4096"),
    ("kubepods:p:abc", "not a slice"),
    ("a--b.slice:p:abc", "not a valid slice"),
    ("-a.slice:p:abc", "not a valid slice"),
    ("a.slice:p:", "unit name"),
])
def test_cgroups_path_refusals(given: str, why: str) -> None:
    with pytest.raises(CgroupPathError) as e:
        sandbox_cgroup(given)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_overhead_cgroup_is_kata_s() -> None:
    assert overhead_cgroup("abc") == "kata_overhead/abc"


# ---- the pod's figures -----------------------------------------------------------------------------
def _fig(**kw: object) -> dict[str, object]:
    return figures(Resources(**kw))  # type: ignore[arg-type]


def test_pod_limits_sum_the_containers() -> None:
    pause = _fig(cpu_shares=2)
    a = _fig(memory_limit=256 * MiB, cpu_shares=512, cpu_quota=50000, cpu_period=100000, cpuset_cpus="0")
    b = _fig(memory_limit=128 * MiB, cpu_shares=256, cpu_quota=20000, cpu_period=50000, cpuset_cpus="1,3-4",
             cpuset_mems="0")
    assert pod_limits([pause], None) == Limits(cpu_shares=2)
    assert pod_limits([a], None) == Limits(memory=256 * MiB, cpu_shares=512, cpu_quota=50000,
                                           cpu_period=100000, cpus="0")
    # 0.5 + 0.4 CPUs over the first period; sets joined; no limit adds nothing
    assert pod_limits([pause, a, b], None) == Limits(memory=384 * MiB, cpu_shares=770, cpu_quota=90000,
                                                     cpu_period=100000, cpus="0-1,3-4", mems="0")


def test_pod_limits_take_the_pods_own_figures() -> None:
    a = _fig(memory_limit=256 * MiB, cpu_quota=50000)
    whole = Resources(memory_limit=1024 * MiB, cpu_quota=300000, cpu_period=100000)
    assert pod_limits([a], whole) == Limits(memory=1024 * MiB, cpu_quota=300000, cpu_period=100000)


def test_an_update_keeps_what_it_leaves_out() -> None:
    old = _fig(memory_limit=256 * MiB, cpu_shares=512)
    assert updated(old, _fig(memory_limit=512 * MiB)) == _fig(memory_limit=512 * MiB, cpu_shares=512)


def test_cpusets_that_no_host_has_are_refused() -> None:
    with pytest.raises(CgroupError):
        pod_limits([_fig(cpuset_cpus="0-99999999999")], None)


def test_shares_map_onto_weights_as_runc_does() -> None:
    assert (shares_to_weight(2), shares_to_weight(1024), shares_to_weight(262144)) == (1, 39, 10000)
    assert shares_to_weight(1) == 1 and shares_to_weight(10**9) == 10000


# ---- what the writers write, in directories laid out as the kernel's -------------------------------
def _cgroup_dir(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (path / name).write_text(value)


def test_v1_limits_go_to_each_controller(tmp_path: Path) -> None:
    roots = {c: tmp_path / c for c in ("memory", "cpu", "cpuset", "pids")}
    files = {"memory": ["memory.limit_in_bytes"],
             "cpu": ["cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"],
             "cpuset": ["cpuset.cpus", "cpuset.mems"], "pids": ["pids.max"]}
    for c, root in roots.items():
        _cgroup_dir(root / "pod" / "sb", dict.fromkeys(files[c], "x"))
    v1 = CgroupsV1(Hierarchy(c, str(root)) for c, root in roots.items())
    v1.set_limits("pod/sb", Limits(memory=256 * MiB, cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                                   cpus="0-1", mems="0"))
    read = {f: (roots[c] / "pod/sb" / f).read_text() for c, fs in files.items() for f in fs}
    assert read == {"memory.limit_in_bytes": str(256 * MiB), "cpu.shares": "512",
                    "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000", "cpuset.cpus": "0-1",
                    "cpuset.mems": "0", "pids.max": "x"}
    v1.set_limits("pod/sb", Limits())  # no limit: unlimited memory and quota, the rest as it was
    assert (roots["memory"] / "pod/sb/memory.limit_in_bytes").read_text() == "-1"
    assert (roots["cpu"] / "pod/sb/cpu.cfs_quota_us").read_text() == "-1"
    assert (roots["cpu"] / "pod/sb/cpu.shares").read_text() == "512"


def test_v2_limits_and_a_missing_controller(tmp_path: Path) -> None:
    leaf = tmp_path / "pod" / "sb"
    files = ("memory.max", "cpu.weight", "cpu.max", "cpuset.cpus", "cpuset.mems")
    _cgroup_dir(leaf, dict.fromkeys(files, "x"))
    v2 = CgroupsV2(Hierarchy("unified", str(tmp_path)))
    v2.set_limits("pod/sb", Limits(memory=256 * MiB, cpu_shares=1024, cpu_quota=50000, cpu_period=100000,
                                   cpus="0", mems="0"))
    assert {f.name: f.read_text() for f in leaf.iterdir()} == {
        "memory.max": str(256 * MiB), "cpu.weight": "39", "cpu.max": "50000 100000", "cpuset.cpus": "0",
        "cpuset.mems": "0"}
    v2.set_limits("pod/sb", Limits(cpu_period=20000))
    assert (leaf / "memory.max").read_text() == "max" and (leaf / "cpu.max").read_text() == "max 20000"
    (leaf / "memory.max").unlink()
    with pytest.raises(CgroupError, match="no memory.max"):
        v2.set_limits("pod/sb", Limits(memory=MiB))
    v2.set_limits("pod/sb", Limits())  # nothing asked of the missing controller: nothing refused


def test_v2_enables_the_controllers_above_the_pod(tmp_path: Path) -> None:
    _cgroup_dir(tmp_path, {"cgroup.controllers": "cpuset cpu io memory hugetlb pids",
                           "cgroup.subtree_control": ""})
    _cgroup_dir(tmp_path / "pod", {"cgroup.controllers": "cpu memory", "cgroup.subtree_control": "cpu"})
    made = CgroupsV2(Hierarchy("unified", str(tmp_path))).make("pod/sb")
    assert made == {"unified": ["pod/sb"]}
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory +pids +io"
    assert (tmp_path / "pod/cgroup.subtree_control").read_text() == "+memory"


def test_walks_refuse_symlinks_and_dotdot(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    v1 = CgroupsV1([Hierarchy("memory", str(root))])
    for rel in ("link/sb", "../outside/sb", "a/../../outside"):
        with pytest.raises(CgroupError):
            v1.make(rel)
        with pytest.raises(CgroupError):
            v1.join(rel, os.getpid())
    assert not list((tmp_path / "outside").iterdir())
    assert [p.name for p in root.iterdir()] == ["link"]  # what a refused walk made is taken back


def test_a_root_that_is_not_its_mounts_root_is_refused(tmp_path: Path) -> None:
    v1 = CgroupsV1([Hierarchy("memory", str(tmp_path), mount_id=1)])  # no directory has mount id 1 here
    with pytest.raises(CgroupError, match="not the root of its cgroup mount"):
        v1.make("sb")


# ---- this host's cgroups ---------------------------------------------------------------------------
@pytest.fixture
def name() -> str:
    return f"kata-unit-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _real_v2() -> HostCgroups:
    info = Path("/proc/self/mountinfo").read_bytes()
    root = {"v2": "/sys/fs/cgroup", "hybrid": "/sys/fs/cgroup/unified"}.get(layout(info))
    if root is None:
        pytest.skip("no cgroup2 mount")
    return CgroupsV2(Hierarchy("unified", root, _mount_id_of(root, info)))


def _cleanup(driver: HostCgroups, name: str) -> None:
    for h in driver.hierarchies.values():
        for d, _, _ in sorted(os.walk(f"{h.root}/{name}"), key=lambda w: -w[0].count("/")):
            os.rmdir(d)


@needs_root
def test_real_hierarchies_make_join_limit_and_remove(name: str, sleeper: subprocess.Popen[bytes]) -> None:
    driver = host_cgroups()
    os.mkdir(f"{driver.path(next(iter(driver.hierarchies)), '')}/{name}")  # a parent that was there before
    try:
        made = driver.make(f"{name}/pod/sb")
        first = next(iter(driver.hierarchies))
        assert made[first] == [f"{name}/pod", f"{name}/pod/sb"]  # not the parent that was there
        driver.join(f"{name}/pod/sb", sleeper.pid)
        assert driver.processes(f"{name}/pod/sb") == {sleeper.pid}
        assert set(driver.cgroups_of(sleeper.pid).values()) == {f"{name}/pod/sb"}
        if driver.version == 1:
            driver.set_limits(f"{name}/pod/sb", Limits(memory=256 * MiB, cpu_shares=512, cpu_quota=50000,
                                                       cpu_period=100000, cpus="0"))
            read = {f: Path(f"/sys/fs/cgroup/{c}/{name}/pod/sb/{f}").read_text().strip() for c, f in (
                ("memory", "memory.limit_in_bytes"), ("cpu", "cpu.shares"), ("cpu", "cpu.cfs_quota_us"),
                ("cpuset", "cpuset.cpus"))}
            assert read == {"memory.limit_in_bytes": str(256 * MiB), "cpu.shares": "512",
                            "cpu.cfs_quota_us": "50000", "cpuset.cpus": "0"}
        # The process stays: it is moved out (above what we made) when the time is half over.
        assert driver.remove(made, timeout=0.6) == []
        assert set(driver.cgroups_of(sleeper.pid).values()) <= {name, ""}
        assert not os.path.exists(driver.path(first, f"{name}/pod"))
        assert os.path.isdir(driver.path(first, name))
    finally:
        driver.move_back(sleeper.pid, dict.fromkeys(driver.hierarchies, ""))
        _cleanup(driver, name)


@needs_root
def test_real_v1_an_empty_cpuset_another_pod_just_made_is_filled(name: str,
                                                                  sleeper: subprocess.Popen[bytes]) -> None:
    """A shared parent (kata_overhead) another pod's create has made but not filled yet: this pod's
    child would copy its empty CPUs, and joining it would fail (ENOSPC)."""
    driver = host_cgroups()
    if driver.version != 1 or not os.path.isdir("/sys/fs/cgroup/cpuset"):
        pytest.skip("cgroup v1 with a cpuset hierarchy only")
    os.mkdir(f"/sys/fs/cgroup/cpuset/{name}")  # made, not filled (a new cpuset starts empty)
    assert Path(f"/sys/fs/cgroup/cpuset/{name}/cpuset.cpus").read_text().strip() == ""
    try:
        made = driver.make(f"{name}/sb")
        driver.join(f"{name}/sb", sleeper.pid)
        assert driver.processes(f"{name}/sb") == {sleeper.pid}
        root = Path("/sys/fs/cgroup/cpuset/cpuset.cpus").read_text().strip()
        assert Path(f"/sys/fs/cgroup/cpuset/{name}/cpuset.cpus").read_text().strip() == root
        driver.move_back(sleeper.pid, dict.fromkeys(driver.hierarchies, ""))
        assert driver.remove(made, timeout=1.0) == []
    finally:
        driver.move_back(sleeper.pid, dict.fromkeys(driver.hierarchies, ""))
        _cleanup(driver, name)


@needs_root
def test_a_pod_record_written_before_make_lets_a_teardown_remove_what_it_made(name: str) -> None:
    """A shim killed while its pod's cgroups were being made: the record written before make()
    names the pod's own cgroups, and a teardown from it removes them."""
    from kata.config import load_config
    from kata.sandbox.host_cgroups import PodCgroups

    sid = f"{name}-sb"
    planned = PodCgroups.plan(sid, {"linux": {"cgroupsPath": f"/{name}/{sid}"}}, load_config(None))
    assert planned is not None
    driver = planned.driver
    first = next(iter(driver.hierarchies))
    try:
        before_make = planned.as_dict()  # what the pod record holds before make()
        assert before_make["made"][first] == [f"{name}/{sid}", *([overhead_cgroup(sid)]
                                                                 if before_make["overhead"] else [])]
        planned.make()
        assert os.path.isdir(driver.path(first, f"{name}/{sid}"))
        torn = PodCgroups.of(before_make)  # the process died here: containerd's `shim delete`
        assert torn is not None and torn.remove() == []
        assert not os.path.exists(driver.path(first, f"{name}/{sid}"))
        assert not os.path.exists(driver.path(first, overhead_cgroup(sid)))
    finally:
        planned.remove()
        _cleanup(driver, name)


@needs_root
def test_real_v1_threads_join_alone(name: str) -> None:
    driver = host_cgroups()
    if driver.version != 1:
        pytest.skip("cgroup v1 only")
    made = driver.make(name)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert thread.native_id is not None
        driver.join_threads(name, [thread.native_id])
        here = Path(f"/sys/fs/cgroup/memory/{name}/tasks").read_text().split()
        assert here == [str(thread.native_id)]
        assert driver.cgroups_of(os.getpid()).get("memory", "") != name  # the process stays where it was
    finally:
        stop.set()
        thread.join()
        assert driver.remove(made, timeout=2.0) == []


@needs_root
def test_real_v2_make_join_refuse_threads_and_remove(name: str, sleeper: subprocess.Popen[bytes]) -> None:
    v2 = _real_v2()
    try:
        made = v2.make(f"{name}/sb")
        assert made == {"unified": [name, f"{name}/sb"]}
        v2.join(f"{name}/sb", sleeper.pid)
        assert v2.cgroups_of(sleeper.pid) == {"unified": f"{name}/sb"}
        with pytest.raises(CgroupError, match="single threads"):
            v2.join_threads(f"{name}/sb", [sleeper.pid])
        assert v2.remove(made, timeout=0.6) == []
        assert v2.cgroups_of(sleeper.pid) == {"unified": ""}
        assert not os.path.exists(v2.path("unified", name))
    finally:
        if os.path.isdir(v2.path("unified", name)):
            v2.move_back(sleeper.pid, {"unified": ""})
            _cleanup(v2, name)
