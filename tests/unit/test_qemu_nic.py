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
