"""The QEMU driver's NIC hotplug as QMP sees it: vhost-net only where the configuration allows it."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

from kata import hypervisor
from kata.config import load_config
from kata.hypervisor.qemu import Qemu, QemuState


class RecordingQmp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def run(self, command: str, **args: Any) -> dict[str, Any]:
        self.calls.append((command, args))
        return {}


def recorded(vm: Qemu) -> RecordingQmp:
    """``vm`` as if it ran: its QMP calls are recorded instead of sent."""
    qmp = RecordingQmp()
    vm._state = QemuState(id="p", pid=os.getpid(), start_time=0, machine_type="q35",
                          agent_channel="virtio-serial", vsock_cid=0, memory_mib=512, max_memory_mib=1024,
                          shared_memory=True)
    vm._monitor = lambda: qmp  # type: ignore[method-assign]
    return qmp


@pytest.mark.parametrize("disabled", [True, False])
def test_disable_vhost_net_is_honoured(disabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/vhost-net" or real_exists(p))
    hv = dataclasses.replace(load_config().hypervisor, disable_vhost_net=disabled)
    vm = hypervisor.new(hv)
    assert isinstance(vm, Qemu)
    qmp = recorded(vm)
    vm.hotplug_nic(0, "tap0_kata", "02:00:00:00:00:01", 1500)
    netdev = next(args for command, args in qmp.calls if command == "netdev_add")
    assert netdev["vhost"] is (not disabled)


def test_a_vmm_outside_the_pods_namespace_gets_the_taps_descriptors() -> None:
    """A pooled VMM runs in another network namespace: it is handed each queue's descriptor (getfd)
    and opens nothing by name."""
    vm = hypervisor.new(load_config().hypervisor)
    assert isinstance(vm, Qemu)
    qmp = recorded(vm)
    sent: list[tuple[str, int, dict[str, Any]]] = []
    qmp.run_with_fd = lambda command, fd, **args: sent.append((command, fd, args))  # type: ignore[attr-defined]
    vm.hotplug_nic(1, "tap1_kata", "02:00:00:00:00:01", 1500, queues=2, tap_fds=[7, 8])
    assert sent == [("getfd", 7, {"fdname": "tap1q0"}), ("getfd", 8, {"fdname": "tap1q1"})]
    netdev = next(args for command, args in qmp.calls if command == "netdev_add")
    assert netdev["fds"] == "tap1q0:tap1q1" and netdev["queues"] == 2
    assert "ifname" not in netdev and "script" not in netdev
    vm.hotplug_nic(2, "tap2_kata", "02:00:00:00:00:02", 1500, tap_fds=[9])
    netdev = [args for command, args in qmp.calls if command == "netdev_add"][-1]
    assert netdev["fd"] == "tap2q0" and "fds" not in netdev
