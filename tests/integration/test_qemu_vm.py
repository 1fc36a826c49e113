"""The QEMU driver against real QEMU: a busybox initramfs guest that talks over the agent port.

Boot tests need the guest kernel (/usr/share/kata-containers/vmlinux.container); failures that happen
before the guest runs do not.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.fs_share import Virtiofsd
from kata.hypervisor.base import HypervisorError, SharedFs, VMConfig
from kata.hypervisor.host import find_virtiofsd, host_capabilities
from kata.hypervisor.qemu import Qemu
from kata.hypervisor.qemu_argv import RunPaths
from tests.conftest import process_gone as gone

QEMU = Path("/usr/bin/qemu-system-x86_64")
KERNEL = Path("/usr/share/kata-containers/vmlinux.container")
BUSYBOX = Path("/bin/busybox")
PARAMS = (
    "quiet", "panic=-1", "reboot=t", "no_timer_check", "tsc=reliable", "cryptomgr.notests",
    "random.trust_cpu=on", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd", "rdinit=/init",
)  # fmt: skip
BOOT_TIMEOUT = 30.0


def _tsc_khz() -> str:
    """microvm under TCG has no HPET/PM timer: PIT calibration of the TSC fails in most boots and the
    kernel then hangs after "Marking TSC unstable". Telling it the TSC rate avoids the calibration."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return f"tsc_early_khz={int(float(line.split(':')[1]) * 1000)}"
    return "tsc_early_khz=2000000"


BOOT_PARAMS = (*PARAMS, _tsc_khz())

needs_kernel = pytest.mark.skipif(not KERNEL.exists(), reason=f"guest kernel {KERNEL} not built yet")
pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

# The guest: find the agent port by name, mount the share, then keep writing a line to the port.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /mnt
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
port=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name)" = agent.channel.0 ] && port=/dev/${p##*/}
done
mount -t virtiofs kataShared /mnt 2>/dev/null || mount -t 9p -o trans=virtio kataShared /mnt 2>/dev/null
while :; do
  echo "kata-test $(cat /mnt/hello.txt 2>/dev/null || echo NOFS)" > $port 2>/dev/null
  sleep 0.1
done
"""


def accel() -> str:
    return "kvm" if host_capabilities().hardware_virt else "tcg"


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("initramfs")
    (root / "bin").mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    out = root.parent / "initrd.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=f, check=True)
    return out


def vm_config(run_dir: Path, initrd: Path, machine: str = "microvm", **over: object) -> VMConfig:
    values: dict[str, object] = dict(
        id=run_dir.name,
        hypervisor_path=QEMU,
        kernel=KERNEL,
        image=None,
        initrd=initrd,
        kernel_params=BOOT_PARAMS,
        vcpus=1,
        max_vcpus=2,
        memory_mib=256,
        max_memory_mib=512,
        machine_type=machine,
        accel=accel(),
        agent_channel="virtio-serial",
        run_dir=run_dir,
    )
    values.update(over)
    return VMConfig(**values)  # type: ignore[arg-type]


def read_until(sock_path: Path, marker: bytes, timeout: float) -> tuple[bytes, float]:
    """Connect to the agent port and read until ``marker``; returns the data and the first byte's time."""
    deadline = time.monotonic() + timeout
    first = 0.0
    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock_path))
        while marker not in data:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            if not data:
                first = time.monotonic()
            data += chunk
    if marker not in data:
        raise AssertionError(f"no {marker!r} from the guest within {timeout}s; got {data[-200:]!r}")
    return data, first


# -- failures before the guest runs (no kernel needed) -------------------------------------------


def test_unknown_hypervisor_path_is_one_line(tmp_path: Path) -> None:
    cfg = vm_config(tmp_path / "vm", tmp_path / "initrd", hypervisor_path=Path("/nonexistent/qemu"))
    with pytest.raises(HypervisorError, match="cannot execute /nonexistent/qemu") as info:
        Qemu().start(cfg, timeout=5)
    assert "\n" not in str(info.value)


def test_qemu_error_exit_reports_stderr_tail(tmp_path: Path) -> None:
    cfg = vm_config(tmp_path / "vm", tmp_path / "initrd", kernel=tmp_path / "no-such-kernel")
    with pytest.raises(HypervisorError, match="QEMU exited during start: .*no-such-kernel") as info:
        Qemu().start(cfg, timeout=10)
    assert "\n" not in str(info.value)
    assert not RunPaths(cfg.run_dir).qmp_socket.exists()


def test_hung_vmm_is_killed_by_timeout(tmp_path: Path) -> None:
    fake = tmp_path / "fake-qemu"
    pid_file = tmp_path / "fake.pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\necho 'stuck in early init' >&2\nexec sleep 60\n")
    fake.chmod(0o755)
    cfg = vm_config(tmp_path / "vm", tmp_path / "initrd", hypervisor_path=fake)
    start = time.monotonic()
    with pytest.raises(HypervisorError, match=r"not ready after 1s, killed: stuck in early init") as info:
        Qemu().start(cfg, timeout=1)
    assert time.monotonic() - start < 4
    assert "\n" not in str(info.value)
    assert gone(int(pid_file.read_text()))


# -- one booted VM (microvm, virtio-fs, virtio-serial) for the lifecycle checks ------------------

STARTER = """
import pickle, sys
from kata.hypervisor.qemu import Qemu
Qemu().start(pickle.loads(bytes.fromhex(sys.argv[1])), timeout=30)
"""


@pytest.fixture(scope="module")
def booted(
    tmp_path_factory: pytest.TempPathFactory, initrd: Path
) -> Iterator[tuple[Qemu, VMConfig, Virtiofsd]]:
    if not KERNEL.exists():
        pytest.skip(f"guest kernel {KERNEL} not built yet")
    binary = find_virtiofsd()
    if binary is None:
        pytest.skip("no virtiofsd on this host")
    import pickle

    base = tmp_path_factory.mktemp("booted")
    share = base / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello-from-host")
    run_dir = base / "vm"
    fsd = Virtiofsd(binary, run_dir / "vfs.sock", share)
    fsd.start(timeout=5)
    fs = SharedFs(kind="virtio-fs", host_dir=share, vhost_user_socket=run_dir / "vfs.sock")
    cfg = vm_config(run_dir, initrd, shared_fs=fs)
    # Started by a process that exits at once, as the runc-style `create` will.
    subprocess.run([sys.executable, "-c", STARTER, pickle.dumps(cfg).hex()], check=True, timeout=60)
    vm = Qemu.attach(run_dir)
    try:
        yield vm, cfg, fsd
    finally:
        vm.stop()
        fsd.stop()


@needs_kernel
def test_vm_outlives_starter_and_reattaches(booted: tuple[Qemu, VMConfig, Virtiofsd]) -> None:
    vm, cfg, _ = booted
    assert vm.is_running()
    (pid,) = vm.pids()
    assert int(RunPaths(cfg.run_dir).pid_file.read_text()) == pid
    assert vm.status() == "running"


@needs_kernel
def test_agent_port_and_virtiofs(booted: tuple[Qemu, VMConfig, Virtiofsd]) -> None:
    vm, _, _ = booted
    endpoint = vm.agent_endpoint()
    assert endpoint.kind == "serial"
    read_until(Path(endpoint.path), b"kata-test hello-from-host", BOOT_TIMEOUT)


@needs_kernel
def test_pause_resume(booted: tuple[Qemu, VMConfig, Virtiofsd]) -> None:
    vm, _, _ = booted
    path = Path(vm.agent_endpoint().path)
    read_until(path, b"kata-test", BOOT_TIMEOUT)
    vm.pause()
    assert vm.status() == "paused"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.settimeout(0.8)
        stale = b""
        try:
            while True:  # drain what was queued before the pause; then nothing may come
                stale += s.recv(4096)
        except TimeoutError:
            pass
        s.settimeout(0.8)
        with pytest.raises(TimeoutError):
            s.recv(4096)
    vm.resume()
    assert vm.status() == "running"
    read_until(path, b"kata-test", 10)


@needs_kernel
def test_hotplug_refused_on_microvm(booted: tuple[Qemu, VMConfig, Virtiofsd]) -> None:
    vm, _, _ = booted
    with pytest.raises(HypervisorError, match="needs machine q35 or pc; microvm"):
        vm.hotplug_vcpus(1)
    with pytest.raises(HypervisorError, match="needs machine q35 or pc; microvm"):
        vm.hotplug_memory(128)


@needs_kernel
def test_zz_stop_leaves_nothing(booted: tuple[Qemu, VMConfig, Virtiofsd]) -> None:
    vm, cfg, fsd = booted
    (pid,) = vm.pids()
    paths = RunPaths(cfg.run_dir)
    Qemu.attach(cfg.run_dir).stop(timeout=5)  # from a fresh handle, as another process would
    assert gone(pid)
    for leftover in (paths.qmp_socket, paths.agent_socket, paths.pid_file, paths.state_file):
        assert not leftover.exists()
    vm.stop()  # idempotent, also on a stale handle
    assert not vm.is_running()
    fsd.stop()
    assert not fsd.is_running()
    assert not fsd.socket_path.exists()


# -- boot timing, q35 hotplug, save ---------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("machine", ["microvm", "q35"])
def test_boot_time(tmp_path: Path, initrd: Path, machine: str) -> None:
    """QEMU launch → QMP ready (start returns) → first byte on the agent port; printed for the report.

    microvm also saves and restores (no share: a mounted 9p or virtio-fs blocks migration);
    q35 also hotplugs.
    """
    fs = None
    marker = b"kata-test NOFS"
    if machine == "q35":
        share = tmp_path / "share"
        share.mkdir()
        (share / "hello.txt").write_text("nine-p")
        fs = SharedFs(kind="virtio-9p", host_dir=share)
        marker = b"kata-test nine-p"
    cfg = vm_config(tmp_path / "vm", initrd, machine=machine, shared_fs=fs)
    vm = Qemu()
    t0 = time.monotonic()
    try:
        vm.start(cfg, timeout=BOOT_TIMEOUT)
        t_qmp = time.monotonic()
        _, first = read_until(Path(vm.agent_endpoint().path), marker, BOOT_TIMEOUT)
        report = {"machine": machine, "accel": cfg.accel, "qmp_ready_s": round(t_qmp - t0, 3),
                  "first_byte_s": round(first - t0, 3)}  # fmt: skip
        print("BOOT", json.dumps(report))
        if machine == "q35":
            assert vm.hotplug_vcpus(1) == 1
            assert vm.hotplug_vcpus(1) == 0  # max_vcpus=2 reached
            assert vm.hotplug_memory(128) == 128
            with pytest.raises(HypervisorError, match="MiB left"):
                vm.hotplug_memory(256)
            return
        state = tmp_path / "state.bin"
        t1 = time.monotonic()
        vm.save(state)
        saved = {"save_s": round(time.monotonic() - t1, 3), "bytes": state.stat().st_size}
        assert vm.status() == "postmigrate"
        vm.stop()
        t2 = time.monotonic()
        vm.restore(cfg, state, timeout=BOOT_TIMEOUT)
        t_restored = time.monotonic()
        _, first = read_until(Path(vm.agent_endpoint().path), marker, BOOT_TIMEOUT)
        print("SNAPSHOT", json.dumps({**saved, "restore_qmp_s": round(t_restored - t2, 3),
                                      "restore_first_byte_s": round(first - t2, 3)}))  # fmt: skip
        assert vm.status() == "running"
    finally:
        vm.stop()
    assert not vm.is_running()


@needs_kernel
def test_silent_guest_is_stopped(tmp_path: Path, initrd: Path) -> None:
    """A guest that never answers (-S: vCPUs never run) is noticed by a read timeout and killed by stop."""
    cfg = vm_config(tmp_path / "vm", initrd, extra_args=("-S",))
    vm = Qemu()
    vm.start(cfg, timeout=BOOT_TIMEOUT)
    try:
        with pytest.raises(AssertionError, match="no b'kata-test'"):
            read_until(Path(vm.agent_endpoint().path), b"kata-test", 1.5)
        (pid,) = vm.pids()
    finally:
        vm.stop(timeout=2)
    assert gone(pid)


@needs_kernel
def test_accel_probe_on_this_host(tmp_path: Path) -> None:
    from kata.hypervisor.accel import choose_accel

    caps = host_capabilities()
    result = choose_accel(QEMU, KERNEL, cache_file=tmp_path / "accel.json")
    print("ACCEL", result)
    if caps.kvm_module == "pvm" and not (caps.cpu_vmx or caps.cpu_svm):
        assert result.accel == "tcg"
    again = choose_accel(QEMU, KERNEL, cache_file=tmp_path / "accel.json")
    assert again.cached and again.accel == result.accel

