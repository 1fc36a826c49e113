"""kata.utils.nsfiles and the sandbox service's check of namespace paths: a path given for a type
must name a namespace of that type, refused in one line before anything is made for the container."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kata.oci.spec import Bundle
from kata.sandbox import pod as pods
from kata.utils import netns, nsfiles
from kata.utils.mount import MS_BIND, mount, unmount
from tests.conftest import minimal_spec

# The runtime-spec's types and the kernel's names for them, as /proc/self/ns has them (the guest
# kernel lacks time namespaces; this host may have them or not).
KERNEL_NAMES = {"network": "net", "mount": "mnt", "pid": "pid", "ipc": "ipc", "uts": "uts", "user": "user",
                "cgroup": "cgroup", "time": "time"}
TYPES = [(kind, kernel) for kind, kernel in KERNEL_NAMES.items() if os.path.exists(f"/proc/self/ns/{kernel}")]


@pytest.mark.parametrize(("kind", "kernel"), TYPES)
def test_a_namespace_of_the_right_type_is_identified(kind: str, kernel: str) -> None:
    path = f"/proc/self/ns/{kernel}"
    assert nsfiles.identify(kind, path) == os.stat(path).st_ino


@pytest.mark.parametrize(("kind", "other"), [("cgroup", "ipc"), ("network", "uts"), ("ipc", "network"),
                                             ("pid", "mount"), ("user", "pid"), ("mount", "cgroup")])
def test_a_namespace_of_another_type_is_refused_in_one_line(kind: str, other: str) -> None:
    path = f"/proc/{os.getpid()}/ns/{KERNEL_NAMES[other]}"
    with pytest.raises(nsfiles.NamespacePathError) as e:
        nsfiles.identify(kind, path)
    assert str(e.value) == f"{kind} namespace {path}: the path is a namespace of type {other}, not {kind}"


@pytest.mark.parametrize(("kind", "kernel"), [("network", "net"), ("ipc", "ipc"), ("uts", "uts")])
def test_a_namespace_bind_mounted_elsewhere_is_identified(tmp_path: Path, kind: str, kernel: str) -> None:
    # How `ip netns` and CNI pin a namespace (/run/netns/NAME): its file's link names the path, not
    # the type, so the type comes from the kernel (NS_GET_NSTYPE).
    pinned = tmp_path / "pinned"
    pinned.touch()
    mount(f"/proc/self/ns/{kernel}", str(pinned), "", MS_BIND, "")
    try:
        assert nsfiles.identify(kind, str(pinned)) == os.stat(f"/proc/self/ns/{kernel}").st_ino
        other = "uts" if kind != "uts" else "ipc"
        with pytest.raises(nsfiles.NamespacePathError, match=f"a namespace of type {kind}, not {other}$"):
            nsfiles.identify(other, str(pinned))
    finally:
        unmount(str(pinned))


def test_pid_for_children_is_a_pid_namespace() -> None:
    assert nsfiles.identify("pid", "/proc/self/ns/pid_for_children") > 0


def test_what_is_no_namespace_is_refused_without_being_opened_for_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opened for reading, it would block until a writer came
    plain = tmp_path / "plain"
    plain.write_text("ipc:[4026531839]")
    for path in (fifo, plain, Path("/dev/null"), tmp_path):
        with pytest.raises(nsfiles.NamespacePathError, match=f"^ipc namespace {path}: not a namespace$"):
            nsfiles.identify("ipc", str(path))
    with pytest.raises(nsfiles.NamespacePathError,
                       match=f"^uts namespace {tmp_path}/none: No such file or directory$"):
        nsfiles.identify("uts", str(tmp_path / "none"))


def test_a_path_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(nsfiles.NamespacePathError) as e:
        nsfiles.identify("ipc", f"{tmp_path}/a\nb")
    assert "\n" not in str(e.value) and "a\\x0ab" in str(e.value)


def test_our_own_network_namespace_is_told_from_another_type() -> None:
    assert netns.is_ours("/proc/self/ns/net")
    with pytest.raises(nsfiles.NamespacePathError, match="the path is a namespace of type ipc, not network"):
        netns.is_ours("/proc/self/ns/ipc")


def _bundle(tmp_path: Path, namespaces: list[dict[str, str]]) -> Bundle:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    return Bundle(path=tmp_path, spec=minimal_spec(linux={"namespaces": namespaces}))


def test_the_sandbox_service_refuses_a_mistyped_namespace_path(tmp_path: Path) -> None:
    ipc = f"/proc/{os.getpid()}/ns/ipc"
    bundle = _bundle(tmp_path, [{"type": "network"}, {"type": "ipc"}, {"type": "cgroup", "path": ipc}])
    with pytest.raises(nsfiles.NamespacePathError,
                       match=f"^cgroup namespace {ipc}: the path is a namespace of type ipc, not cgroup$"):
        pods.check("c1", bundle, None)


def test_the_sandbox_service_takes_namespace_paths_of_their_types(tmp_path: Path) -> None:
    # A Kubernetes container's: the pod's ipc and uts by path (the guest's stand for them).
    pid = os.getpid()
    pods.check("c1", _bundle(tmp_path, [{"type": "network"}, {"type": "ipc", "path": f"/proc/{pid}/ns/ipc"},
                                        {"type": "uts", "path": f"/proc/{pid}/ns/uts"}]), None)
