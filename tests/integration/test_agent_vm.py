"""The guest agent end to end: boot the real guest with the QEMU driver (microvm, TCG, virtio-serial
agent channel, erofs root, 9p share) and drive containers through AgentClient."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.agent_client.client import AgentClient, StreamEOF
from kata.agent_client.transport import connect
from kata.hypervisor.base import SharedFs, VMConfig
from kata.hypervisor.qemu import Qemu
from kata.oci.default_spec import default_spec
from kata.protocols import agent_pb2 as pb
from kata.sandbox.vm import GUEST_KERNEL_PARAMS as KERNEL_PARAMS
from tests.support.bundles import make_rootfs

GUEST_DIR = Path("/usr/share/kata-containers")
KERNEL = GUEST_DIR / "vmlinux.container"
IMAGE = GUEST_DIR / "kata-containers.img"
QEMU = "/usr/bin/qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
SHARED = "/run/kata-containers/shared/containers"

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not KERNEL.exists(), reason=f"guest kernel {KERNEL} not built"),
    pytest.mark.skipif(not IMAGE.exists(), reason=f"guest image {IMAGE} not built"),
    pytest.mark.skipif(not os.path.exists(QEMU), reason=f"{QEMU} missing"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason=f"{BUSYBOX} (busybox-static) missing"),
]


def spec(cid: str, args: list[str], terminal: bool = False) -> bytes:
    """The guest spec the host would send: the default spec, root on the share, the VM's network."""
    doc = default_spec(args, terminal, hostname=cid)
    doc["process"]["env"] = ["PATH=/bin", "TERM=xterm"]
    doc["root"] = {"path": f"{SHARED}/{cid}/rootfs", "readonly": False}
    doc["linux"]["cgroupsPath"] = f"/kata/{cid}"
    doc["linux"]["namespaces"] = [ns for ns in doc["linux"]["namespaces"] if ns["type"] != "network"]
    return json.dumps(doc).encode()


class VM:
    """The real QEMU driver with a 9p share (the agent's other shared-fs path; `run` covers virtio-fs)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.share = tmp / "share"
        self.share.mkdir()
        self.qemu = Qemu()
        self.config = VMConfig(
            id=f"agent-test-{tmp.name}"[:40], hypervisor_path=Path(QEMU), kernel=KERNEL, image=IMAGE,
            initrd=None, kernel_params=(*KERNEL_PARAMS, "init=/usr/bin/kata-agent", "agent.log=debug"),
            vcpus=1, max_vcpus=1, memory_mib=512, max_memory_mib=512, machine_type="microvm",
            accel="tcg", agent_channel="virtio-serial", run_dir=tmp / "vm",
            shared_fs=SharedFs("virtio-9p", self.share, "kataShared"),
        )

    @property
    def sock(self) -> str:
        return self.qemu.agent_endpoint().path

    def start(self) -> None:
        self.qemu.start(self.config, timeout=20.0)

    def console_tail(self, n: int = 40) -> str:
        return "\n".join(self.qemu.console_output().splitlines()[-n:]) or "(console is empty)"

    def kill(self) -> None:
        self.qemu.stop(timeout=2.0)


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[tuple[VM, AgentClient]]:
    vm = VM(tmp_path)
    client: AgentClient | None = None
    try:
        for attempt in range(2):  # rare silent boots: one retry (FACTS)
            vm.start()
            try:
                client = AgentClient(connect(vm.qemu.agent_endpoint(), 20.0),
                                     timeout=60.0)
                client.wait_ready(60.0)
                break
            except Exception:
                if client is not None:
                    client.close()
                    client = None
                vm.kill()
                if attempt == 1:
                    raise
        assert client is not None
        client.create_sandbox(sandbox_id="sb1", hostname="sb1", storages=[pb.Storage(
            driver="9p", source="kataShared", fstype="9p", mount_point=SHARED,
            options=["trans=virtio", "version=9p2000.L", "msize=262144"],
        )])
        yield vm, client
    except Exception:
        print("guest console:\n" + vm.console_tail())
        raise
    finally:
        if client is not None:
            client.close()
        vm.kill()


def read_all(client: AgentClient, cid: str, exec_id: str = "", stderr: bool = False) -> bytes:
    out = b""
    read = client.read_stderr if stderr else client.read_stdout
    while True:
        try:
            out += read(container_id=cid, exec_id=exec_id).data
        except StreamEOF:
            return out


def run(client: AgentClient, vm: VM, cid: str, args: list[str], terminal: bool = False) -> None:
    make_rootfs(vm.share / cid / "rootfs")
    client.create_container(container_id=cid, oci_spec_json=spec(cid, args, terminal))


def test_containers_end_to_end(vm: tuple[VM, AgentClient]) -> None:
    v, client = vm
    details = client.get_guest_details()
    assert details.agent_details.init_daemon

    # output and exit code
    run(client, v, "c1", ["sh", "-c", "echo hello; echo err >&2; exit 7"])
    client.start_container(container_id="c1")
    assert read_all(client, "c1") == b"hello\n"
    assert read_all(client, "c1", stderr=True) == b"err\n"
    assert client.wait_process(container_id="c1").status == 7
    client.remove_container(container_id="c1")

    # stdin -> cat
    run(client, v, "c2", ["cat"])
    client.start_container(container_id="c2")
    client.write_stdin(container_id="c2", data=b"ping\n")
    client.close_stdin(container_id="c2")
    assert read_all(client, "c2") == b"ping\n"
    assert client.wait_process(container_id="c2").status == 0
    client.remove_container(container_id="c2")

    # a tty process, resized before it asks
    run(client, v, "c3", ["sh", "-c", "sleep 1; stty size; tty"], terminal=True)
    client.tty_win_resize(container_id="c3", row=33, column=99)
    client.start_container(container_id="c3")
    out = read_all(client, "c3")
    assert b"33 99" in out and b"/dev/pts/" in out, out
    assert client.wait_process(container_id="c3").status == 0
    client.remove_container(container_id="c3")

    # a long-running init: exec into it, stats, ps, then a signal
    run(client, v, "c4", ["sleep", "1000"])
    client.start_container(container_id="c4")
    proc = {"args": ["sh", "-c", "echo exec-out; exit 3"], "cwd": "/", "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}, "terminal": False}
    client.exec_process(container_id="c4", exec_id="e1", oci_process_json=json.dumps(proc).encode())
    assert read_all(client, "c4", "e1") == b"exec-out\n"
    assert client.wait_process(container_id="c4", exec_id="e1").status == 3
    pids = json.loads(client.list_processes(container_id="c4", format="json").process_list)
    assert len(pids) >= 1
    stats = client.stats_container(container_id="c4")
    assert stats.cgroup_stats.pids_stats.current >= 1
    waiter: list[int] = []
    t = threading.Thread(target=lambda: waiter.append(client.wait_process(container_id="c4").status))
    t.start()
    client.signal_process(container_id="c4", signal=9)
    t.join(30)
    assert waiter == [137]
    client.remove_container(container_id="c4")


def test_destroy_sandbox_powers_off(vm: tuple[VM, AgentClient]) -> None:
    v, client = vm
    client.destroy_sandbox()
    # The guest powers off by itself (ACPI on microvm), so QEMU exits without being stopped.
    deadline = time.monotonic() + 30
    while v.qemu.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not v.qemu.is_running()
