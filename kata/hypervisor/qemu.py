"""The QEMU driver: launch a VM detached, reattach to it from another process, drive it over QMP."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kata.protocols import debug_console
from kata.protocols.agent_api import AgentEndpoint
from kata.utils import process
from kata.utils.files import write_private

from . import daemon
from .base import Hypervisor, HypervisorError, SharedFs, VMConfig
from .qemu_argv import (
    CONSOLE_CHARDEV,
    CONSOLE_RING_BYTES,
    DEFAULT_SECCOMP,
    FS_ROOT_PORT,
    NIC_ROOT_PORTS,
    Restore,
    RunPaths,
    Vsock,
    build_argv,
    file_backed_ram,
    hotplug_capable,
    ignores_shared,
    image_on_pmem,
)
from .qmp import Qmp, main_loop_ready
from .vsock import reserve_cid

SAVE_TIMEOUT = 120.0


@dataclass(frozen=True)
class QemuState:
    """What ``start`` leaves in run_dir so that another process can ``attach``."""

    id: str
    pid: int
    start_time: int
    machine_type: str
    agent_channel: str
    vsock_cid: int
    memory_mib: int
    max_memory_mib: int
    shared_memory: bool  # guest RAM is on a shared memfd (virtio-fs): hotplugged RAM must be too
    memory_file: str = ""  # guest RAM is this file's shared mapping: snapshots leave it out
    # A snapshot leaves out its shared file mappings (x-ignore-shared): RAM in a file, the image.
    ignores_shared: bool = False
    vcpus: int = 1  # at launch (hot-added ones are not counted)
    debug_console: bool = False  # the guest offers a debug console (its port, or a vsock port)

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> QemuState:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise HypervisorError(f"no usable QEMU state in {path}: {exc}") from exc


class Qemu(Hypervisor):
    def __init__(self, seccomp: str = DEFAULT_SECCOMP, vhost_net: bool = True) -> None:
        """``vhost_net``: hot-added NICs may use the host kernel's vhost-net (where it exists);
        the configuration's disable_vhost_net turns it off."""
        self._seccomp = seccomp
        self._vhost_net = vhost_net
        self._paths: RunPaths | None = None
        self._state: QemuState | None = None
        self._qmp: Qmp | None = None

    @classmethod
    def attach(cls, run_dir: Path, vhost_net: bool = True) -> Qemu:
        """The VM that ``start`` launched with this run_dir, possibly from another process."""
        paths = RunPaths(run_dir)
        vm = cls(vhost_net=vhost_net)
        vm._paths = paths
        vm._state = QemuState.load(paths.state_file)
        return vm

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, config: VMConfig, timeout: float) -> None:
        self._launch(config, timeout, restore=None)

    def restore(self, config: VMConfig, state_file: Path, timeout: float,
                memory_fd: int | None = None, memory_path: Path | None = None) -> None:
        """Start the VM that ``save`` wrote to ``state_file`` (same config) and let it run on.

        QEMU reads the state from a descriptor it inherits (its seccomp filter forbids the exec:
        transport). QEMU 7.2 refuses to save a VM with vhost-user-fs, or with a 9p share the guest
        has mounted: attach shared directories after the restore.
        """
        try:
            state_fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise HypervisorError(f"no saved VM state at {state_file}: {exc.strerror}") from None
        restore = Restore(state_fd, memory_fd, memory_path)
        deadline = time.monotonic() + timeout
        try:
            self._launch(config, timeout, restore=restore)
            if ignores_shared(config, restore):
                # What QEMU maps from files (RAM, the image) is not in the state: x-ignore-shared
                # before it is read.
                self._ignore_shared_ram()
                self._monitor().run("migrate-incoming", uri=f"fd:{state_fd}")
            # The incoming migration runs after the main loop starts; the VM comes up paused.
            while (status := self.status()) == "inmigrate":
                if time.monotonic() > deadline:
                    raise HypervisorError(f"restore from {state_file} not done after {timeout:g}s")
                time.sleep(0.005)
            if status not in ("paused", "postmigrate", "prelaunch", "running"):
                raise HypervisorError(f"restore from {state_file} failed (status {status})")
            if status != "running":
                self._monitor().run("cont")
        except HypervisorError as exc:
            why = self.log_tail()
            self.stop(timeout=1)
            raise HypervisorError(f"{exc}: {why}" if why else str(exc)) from exc
        finally:
            os.close(state_fd)

    def _launch(self, config: VMConfig, timeout: float, restore: Restore | None) -> None:
        if self._state is not None:
            raise HypervisorError(f"VM {self._state.id} was already started")
        paths = RunPaths(config.run_dir)
        paths.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if paths.state_file.exists():
            try:
                old = QemuState.load(paths.state_file)
            except HypervisorError:
                pass  # unreadable leftovers: overwritten below
            else:
                if process.ProcessId(old.pid, old.start_time).is_alive():
                    raise HypervisorError(f"a VM (pid {old.pid}) is already running in {paths.run_dir}")
        for stale in (paths.qmp_socket, paths.agent_socket, paths.console_socket, paths.pid_file,
                      paths.log_file):
            stale.unlink(missing_ok=True)

        image_fd = open_image(config) if config.image is not None else None
        vsock: Vsock | None = None
        try:
            vsock = reserve_cid() if config.agent_channel == "vsock" else None
            argv = build_argv(config, vsock, restore, seccomp=self._seccomp, image_fd=image_fd)
            fds = [vsock.vhostfd] if vsock is not None and vsock.vhostfd is not None else []
            if restore is not None:
                fds += [fd for fd in (restore.state_fd, restore.memory_fd) if fd is not None]
            if image_fd is not None:
                fds.append(image_fd)
            try:
                proc = daemon.launch(argv, paths.log_file, pass_fds=fds)
            except daemon.DaemonError as exc:
                raise HypervisorError(str(exc)) from exc
        finally:
            if vsock is not None and vsock.vhostfd is not None:
                os.close(vsock.vhostfd)  # QEMU holds its own copy, and with it the cid
            if image_fd is not None:
                os.close(image_fd)  # QEMU opened the file itself, through its inherited copy

        fs = config.shared_fs
        self._paths = paths
        self._state = QemuState(
            id=config.id,
            pid=proc.pid,
            start_time=proc.start_time,
            machine_type=config.machine_type,
            agent_channel=config.agent_channel,
            vsock_cid=vsock.cid if vsock is not None else 0,
            memory_mib=config.memory_mib,
            max_memory_mib=config.max_memory_mib,
            shared_memory=fs is not None and fs.kind == "virtio-fs",
            memory_file=_memory_file(config, restore),
            ignores_shared=ignores_shared(config, restore),
            vcpus=config.vcpus,
            debug_console=config.debug_console,
        )
        # Written before waiting, so that a crashed caller still leaves enough to clean up.
        self._state.save(paths.state_file)
        self._wait_ready(proc, timeout)

    def _wait_ready(self, proc: process.ProcessId, timeout: float) -> None:
        assert self._paths is not None
        deadline = time.monotonic() + timeout
        while True:
            if not proc.is_alive():
                why = daemon.log_tail(self._paths.log_file) or "no output"
                self._cleanup()
                raise HypervisorError(f"QEMU exited during start: {why}")
            left = deadline - time.monotonic()
            if self._paths.qmp_socket.exists() and main_loop_ready(self._paths.qmp_socket, left):
                return
            if time.monotonic() > deadline:
                process.terminate(proc, 1.0)
                why = daemon.log_tail(self._paths.log_file) or "no output"
                self._cleanup()
                raise HypervisorError(f"QEMU not ready after {timeout:g}s, killed: {why}")
            time.sleep(0.002)

    def stop(self, timeout: float = 5.0) -> None:
        if self._state is None or self._paths is None:
            return
        proc = self._proc()
        if proc.is_alive():
            # SIGTERM is QEMU's orderly exit, and needs no QMP session.
            process.terminate(proc, timeout)
        self._cleanup()

    def release(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def _cleanup(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._paths is not None:
            for path in (self._paths.qmp_socket, self._paths.agent_socket, self._paths.console_socket,
                         self._paths.pid_file, self._paths.state_file):  # fmt: skip
                path.unlink(missing_ok=True)
        self._state = None

    def _proc(self) -> process.ProcessId:
        state = self._require()
        return process.ProcessId(state.pid, state.start_time)

    def _require(self) -> QemuState:
        if self._state is None:
            raise HypervisorError("VM is not running (never started, or stopped)")
        return self._state

    def _monitor(self) -> Qmp:
        self._require()
        assert self._paths is not None
        if self._qmp is None:
            self._qmp = Qmp(self._paths.qmp_socket)
        return self._qmp

    def is_running(self) -> bool:
        return self._state is not None and self._proc().is_alive()

    def pids(self) -> list[int]:
        return [self._require().pid] if self.is_running() else []

    def process_ids(self) -> list[process.ProcessId]:
        """The QEMU process started, alive or not (a watcher must see a dead one at once)."""
        return [self._proc()] if self._state is not None else []

    def agent_endpoint(self) -> AgentEndpoint:
        state = self._require()
        assert self._paths is not None
        if state.agent_channel == "vsock":
            return AgentEndpoint(kind="vsock", cid=state.vsock_cid)
        return AgentEndpoint(kind="serial", path=str(self._paths.agent_socket))

    def debug_console_endpoint(self) -> AgentEndpoint | None:
        state = self._require()
        assert self._paths is not None
        if not state.debug_console:
            return None
        if state.agent_channel == "vsock":
            return AgentEndpoint(kind="vsock", cid=state.vsock_cid, port=debug_console.VSOCK_PORT)
        return AgentEndpoint(kind="serial", path=str(self._paths.console_socket))

    def log_tail(self) -> str:
        """QEMU's own stderr, for error reports by the caller."""
        return daemon.log_tail(self._paths.log_file) if self._paths is not None else ""

    def console_output(self) -> str:
        """The guest console's ring, emptied (QMP ringbuf-read); "" when QEMU cannot be asked."""
        if not self.is_running():
            return ""
        try:
            data = self._monitor().run("ringbuf-read", device=CONSOLE_CHARDEV, size=CONSOLE_RING_BYTES,
                                       format="base64")
            return base64.b64decode(str(data)).decode(errors="replace")
        except (HypervisorError, ValueError):
            return ""

    # -- QMP operations ------------------------------------------------------------------------

    def attach_shared_fs(self, fs: SharedFs) -> None:
        if fs.kind != "virtio-fs" or not fs.hotplug or fs.vhost_user_socket is None:
            raise HypervisorError("only a hot-pluggable virtio-fs share can be attached")
        qmp = self._monitor()
        qmp.run("chardev-add", id="vfs", backend={"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": str(fs.vhost_user_socket)}}, "server": False}})
        qmp.run("device_add", driver="vhost-user-fs-pci", id="vfs0", chardev="vfs", tag=fs.tag,
                bus=FS_ROOT_PORT)

    def nic_queues(self) -> int:
        """Queue pairs a hot-added NIC gets: one per vCPU, as Kata does (the guest's virtio-net uses
        as many as it has CPUs)."""
        return max(1, self._require().vcpus)

    def hotplug_nic(self, index: int, tap: str, mac: str, mtu: int, queues: int = 1,
                    tap_fds: Sequence[int] = ()) -> None:
        """Add virtio-net device ``index`` on the existing tap device ``tap`` (in QEMU's network
        namespace), with the guest-side MAC ``mac``; vhost where /dev/vhost-net exists and the
        configuration allows it (disable_vhost_net). ``tap_fds``: one descriptor per queue of that
        tap, opened in the pod's namespace, for a QEMU that runs elsewhere (a pooled VM): passed
        over QMP (getfd), QEMU opens nothing by name."""
        if index >= len(NIC_ROOT_PORTS):
            raise HypervisorError(f"no free root port for network interface {index}")
        qmp = self._monitor()
        vhost = self._vhost_net and os.path.exists("/dev/vhost-net")
        netdev: dict[str, object] = {"type": "tap", "id": f"net{index}", "vhost": vhost}
        if tap_fds:
            names = [f"tap{index}q{n}" for n in range(len(tap_fds))]
            for name, fd in zip(names, tap_fds, strict=True):
                qmp.run_with_fd("getfd", fd, fdname=name)
            netdev["fds" if len(names) > 1 else "fd"] = ":".join(names)
        else:
            netdev.update(ifname=tap, script="no", downscript="no")
        if queues > 1:
            netdev["queues"] = queues
        qmp.run("netdev_add", **netdev)
        device: dict[str, object] = {"driver": "virtio-net-pci", "id": f"nic{index}", "netdev": f"net{index}",
                                     "mac": mac, "bus": NIC_ROOT_PORTS[index], "host_mtu": mtu}
        if queues > 1:
            device.update(mq=True, vectors=2 * queues + 2)
        try:
            qmp.run("device_add", **device)
        except HypervisorError:
            qmp.run("netdev_del", id=f"net{index}")
            raise

    def unplug_nic(self, index: int) -> None:
        # PCIe native hotplug: the guest sees an attention button and lets go ~5 s later; QEMU then
        # drops the device (its netdev stays until the VM ends, unused).
        self._monitor().run("device_del", id=f"nic{index}")

    def pause(self) -> None:
        self._monitor().run("stop")

    def resume(self) -> None:
        self._monitor().run("cont")

    def status(self) -> str:
        """QEMU's run state: "running", "paused", "inmigrate", "postmigrate", …"""
        return str(self._monitor().run("query-status")["status"])

    def _ignore_shared_ram(self) -> None:
        self._monitor().run("migrate-set-capabilities",
                            capabilities=[{"capability": "x-ignore-shared", "state": True}])

    def save(self, path: Path) -> None:
        """Write the VM's state to ``path``; with a memory file, RAM stays in that file instead."""
        qmp = self._monitor()
        state = self._require()
        if state.ignores_shared and state.shared_memory and not state.memory_file:
            # x-ignore-shared would leave out the RAM of its anonymous memfd as well.
            raise HypervisorError("a VM with its image in persistent memory is saved only with a memory file")
        if state.ignores_shared:
            self._ignore_shared_ram()
        qmp.run("stop")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # Handed over the QMP socket (SCM_RIGHTS): QEMU writes the state itself, no exec needed.
            qmp.run_with_fd("getfd", fd, fdname="kata-save")
            qmp.run("migrate", uri="fd:kata-save")
            qmp.wait_migration(SAVE_TIMEOUT)
        finally:
            os.close(fd)

    def hotplug_vcpus(self, count: int) -> int:
        state = self._require()
        if not hotplug_capable(state.machine_type):
            raise HypervisorError(f"vCPU hotplug needs machine q35 or pc; {state.machine_type} has none")
        qmp = self._monitor()
        free = [c for c in qmp.run("query-hotpluggable-cpus") if "qom-path" not in c]
        added = 0
        for cpu in free[:count]:
            props = cpu["props"]
            ident = "cpu-" + "-".join(str(props[k]) for k in sorted(props))
            qmp.run("device_add", driver=cpu["type"], id=ident, **props)
            added += 1
        return added

    def vcpu_threads(self) -> list[int]:
        """From QMP; only ids that are threads of this QEMU count (a thread id is written to a cgroup)."""
        pid = self._require().pid
        found = []
        for cpu in self._monitor().run("query-cpus-fast"):
            tid = cpu.get("thread-id") if isinstance(cpu, dict) else None
            if isinstance(tid, int) and not isinstance(tid, bool) and tid > 0 \
                    and os.path.isdir(f"/proc/{pid}/task/{tid}"):
                found.append(tid)
        return found

    def memory_mib(self) -> int:
        state = self._require()
        if not hotplug_capable(state.machine_type):
            return state.memory_mib
        dimms = [d for d in self._monitor().run("query-memory-devices") if d.get("type") == "dimm"]
        return state.memory_mib + (sum(int(d["data"]["size"]) for d in dimms) >> 20)

    def hotplug_memory(self, size_mib: int) -> int:
        state = self._require()
        if not hotplug_capable(state.machine_type):
            raise HypervisorError(f"memory hotplug needs machine q35 or pc; {state.machine_type} has none")
        qmp = self._monitor()
        dimms = [d for d in qmp.run("query-memory-devices") if d.get("type") == "dimm"]
        plugged_mib = sum(int(d["data"]["size"]) for d in dimms) >> 20
        room = state.max_memory_mib - state.memory_mib - plugged_mib
        if size_mib > room:
            raise HypervisorError(f"cannot add {size_mib} MiB: {room} MiB left below max_memory_mib")
        n = len(dimms)
        backend = "memory-backend-memfd" if state.shared_memory else "memory-backend-ram"
        extra = {"share": True} if state.shared_memory else {}
        qmp.run("object-add", **{"qom-type": backend, "id": f"hotmem{n}", "size": size_mib << 20, **extra})
        try:
            qmp.run("device_add", driver="pc-dimm", id=f"dimm{n}", memdev=f"hotmem{n}")
        except HypervisorError:
            qmp.run("object-del", id=f"hotmem{n}")
            raise
        return size_mib


def open_image(config: VMConfig) -> int:
    """The guest image, opened once for QEMU to inherit: the file QEMU maps or reads is the one
    checked here (a regular file or a block device), and, mapped as persistent memory, of the size
    the VM was planned with (the guest is told where the image ends)."""
    assert config.image is not None
    try:
        # O_NONBLOCK: a FIFO put at the path must not hang the start.
        fd = os.open(config.image, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise HypervisorError(f"guest image {config.image}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise HypervisorError(f"guest image {config.image} is not a file or a block device")
        if image_on_pmem(config) and st.st_size != config.image_pmem_size:
            raise HypervisorError(f"guest image {config.image} changed while the VM was planned "
                                  f"({config.image_pmem_size} bytes, now {st.st_size}): start it again")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _memory_file(config: VMConfig, restore: Restore | None) -> str:
    """Where the VM's RAM lives, for QemuState ("" for QEMU's own anonymous memory)."""
    if config.memory_file is not None:
        return str(config.memory_file)
    if restore is not None and restore.memory_path is not None:
        return f"{restore.memory_path} (copy-on-write)"
    return "memfd" if file_backed_ram(config, restore) else ""
