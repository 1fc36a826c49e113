"""Pod.update against an in-process VM and agent: the VM grows by what a new limit adds over the
recorded one, once, and the record (pod.json) says so for the next process. And what Pod.destroy
leaves to the pod's network namespace."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kata.sandbox.pod import Limits, Pod, PodRecord
from kata.sandbox.sandbox import Sandbox

MiB = 2**20


class FakeSandbox:
    """What Pod.update touches of a Sandbox: the VM's size, its growth, the agent, the state dir."""

    def __init__(self, state_dir: Path, memory_mib: int) -> None:
        self.id = "pod1"
        self.paths = SimpleNamespace(state_dir=state_dir, pod_record=state_dir / "pod.json")
        self.memory_mib = memory_mib
        self.grown: list[int] = []
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.hypervisor = SimpleNamespace(memory_mib=lambda: self.memory_mib, release=lambda: None,
                                          hotplug_vcpus=lambda n: n)
        self.agent = SimpleNamespace(update_container=self._update, online_cpu_mem=lambda **kw: None)

    def _update(self, container_id: str, resources_json: bytes) -> None:
        self.updates.append((container_id, json.loads(resources_json)))

    def require_agent(self) -> Any:
        return self.agent

    def grow_memory(self, agent: Any, want_mib: int) -> int:
        self.grown.append(want_mib - self.memory_mib)
        self.memory_mib = want_mib
        return want_mib


def make_pod(tmp_path: Path, sized_as_pod: bool = False) -> tuple[Pod, FakeSandbox]:
    sandbox = FakeSandbox(tmp_path, memory_mib=2048 + 64)
    record = PodRecord(config="", annotations={}, sized_as_pod=sized_as_pod,
                       limits={"c1": Limits(0, 64)})
    return Pod(cast(Sandbox, sandbox), record), sandbox


def memory(mib: int) -> dict[str, Any]:
    return {"memory": {"limit": mib * MiB}}


def test_the_same_update_twice_grows_the_vm_once(tmp_path: Path) -> None:
    pod, sandbox = make_pod(tmp_path)
    pod.update("c1", memory(512))
    pod.update("c1", memory(512))
    assert sandbox.grown == [512 - 64]
    assert [cid for cid, _ in sandbox.updates] == ["c1", "c1"]  # the guest applies both
    saved = PodRecord.load(tmp_path / "pod.json")
    assert saved.limits["c1"] == Limits(0, 512)


def test_a_lower_limit_then_the_old_one_does_not_grow_again(tmp_path: Path) -> None:
    pod, sandbox = make_pod(tmp_path)
    pod.update("c1", memory(512))
    pod.update("c1", memory(128))
    pod.update("c1", memory(512))
    pod.update("c1", memory(768))
    assert sandbox.grown == [448, 256]
    assert sandbox.updates[1][1] == memory(128)


def test_a_pod_sized_as_a_whole_never_grows(tmp_path: Path) -> None:
    pod, sandbox = make_pod(tmp_path, sized_as_pod=True)
    pod.update("c1", memory(1024))
    assert sandbox.grown == [] and len(sandbox.updates) == 1


@pytest.mark.parametrize("resources", [{}, {"memory": {"limit": -1}}, {"cpu": {"shares": 2}}])
def test_no_memory_limit_grows_nothing(tmp_path: Path, resources: dict[str, Any]) -> None:
    pod, sandbox = make_pod(tmp_path)
    pod.update("c1", resources)
    assert sandbox.grown == [] and sandbox.updates == [("c1", resources)]


def test_the_record_is_read_back_by_the_next_process(tmp_path: Path) -> None:
    pod, sandbox = make_pod(tmp_path)
    pod.update("c1", memory(512))
    # Another process (the next `kata-runtime update`) starts from pod.json, not from create's limit.
    again = Pod(cast(Sandbox, sandbox), PodRecord.load(tmp_path / "pod.json"))
    again.update("c1", memory(512))
    assert sandbox.grown == [448]


def test_a_record_that_cannot_be_written_leaves_the_id_free(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kata.sandbox import paths as sandbox_paths
    from kata.sandbox import pod as pods
    from kata.utils.files import write_json

    monkeypatch.setattr(sandbox_paths, "STATE_ROOT", tmp_path)
    monkeypatch.setattr(pods, "load_pod_config", lambda path, annotations: SimpleNamespace(source="c.toml"))
    monkeypatch.setattr(pods, "check", lambda *a: None)
    monkeypatch.setattr(pods, "enter_network_namespace", lambda bundle, pin: ("", False))

    def full(path: Path, data: Any) -> None:
        write_json(path, data)  # the file is there, half-made, when the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pods, "write_json", full)
    bundle = SimpleNamespace(annotations={}, spec={})
    with pytest.raises(OSError, match="No space"):
        Pod.create("pod1", cast(Any, bundle), None)
    assert not (tmp_path / "sbs" / "pod1").exists()


@pytest.mark.parametrize("pinned,unpinned,annotations,unmirrored", [
    (True, True, {}, False),  # our own namespace: its taps and filters go with it
    (True, False, {}, True),  # ours, but the pin stays: so would they
    (False, False, {"io.kubernetes.cri.container-type": "sandbox"}, False),  # a CRI pod's, removed after it
    (False, False, {}, True),  # someone else's (a path in the spec): left as it was found
    (False, False, {"io.kubernetes.cri-o.ContainerType": "sandbox"}, True),  # podman's pods keep theirs
])
def test_taps_are_removed_only_from_a_namespace_that_outlives_the_pod(
        monkeypatch: pytest.MonkeyPatch, pinned: bool, unpinned: bool, annotations: dict[str, str],
        unmirrored: bool) -> None:
    from kata.sandbox import network, pod

    calls: list[str] = []
    monkeypatch.setattr(network, "unmirror", lambda netns, made: calls.append(netns))
    monkeypatch.setattr(pod, "_unpin", lambda netns: unpinned)
    monkeypatch.setattr(pod.os.path, "ismount", lambda path: path == "/run/netns/n1")  # the pin, kept
    sandbox = SimpleNamespace(destroy=lambda hook: hook())
    record = PodRecord(config="", annotations=annotations, netns="/run/netns/n1", netns_pinned=pinned,
                       network=[["eth0", "tap0_kata"]])
    problems = Pod(cast(Sandbox, sandbox), record).destroy()
    assert problems == ([] if unpinned or not pinned else ["network namespace /run/netns/n1: not unpinned"])
    assert calls == (["/run/netns/n1"] if unmirrored else [])
