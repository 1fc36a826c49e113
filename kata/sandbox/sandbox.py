"""A sandbox: one VM, its virtiofsd, its shared directory and the agent connection; it holds
the containers of one pod.

Lifecycle: create() brings everything up (and tears down whatever it had started when any step
fails); destroy() always runs to the end, step by step, also when QEMU or the agent is already dead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from kata.errors import KataError
from kata.fs_share.shared_dir import SharedDir
from kata.hypervisor.base import Hypervisor, HypervisorError, VMConfig, clone_maps_template
from kata.sandbox.paths import SandboxPaths
from kata.sandbox.timings import Timings
from kata.utils.files import write_json
from kata.utils.process import ProcessId
from kata.utils.safepath import remove_tree

if TYPE_CHECKING:
    from kata.agent_client.client import AgentClient
    from kata.config import RuntimeConfig
    from kata.specconv import VMSizing

# The bring-up's modules (the agent's protobuf API, VM planning) are imported where they are used:
# `delete` only attaches to the VM and tears it down, and should not pay for them.

AccelChoice = Literal["auto", "kvm", "tcg"]
CacheMode = Literal["auto", "always", "never"]

# Seconds the guest gets to power itself off after DestroySandbox before QEMU is stopped for it.
_POWEROFF_GRACE = 2.0


def plan_vm(cfg: RuntimeConfig, sid: str, spec: dict[str, Any], paths: SandboxPaths,
            debug: bool) -> tuple[VMConfig, bool]:
    """The VM for a sandbox, and whether it comes from a template: sized from ``spec``, with the
    accelerator and agent channel this host allows."""
    from kata.hypervisor.accel import choose_accel
    from kata.sandbox import vm

    hv = cfg.hypervisor
    sizing = size_vm(cfg, spec)
    # The probe warns once (when it is not cached) if it has to fall back to TCG.
    probe = choose_accel(Path(hv.path), Path(hv.kernel), force=cast(AccelChoice, hv.accel))
    try:
        channel = vm.agent_channel(cfg.agent.agent_channel, vm.vsock_available())
    except ValueError as exc:
        raise KataError(str(exc)) from exc
    # vsock clones would keep their template's CID: those VMs boot cold.
    use_template = cfg.factory.enable_template and channel == "virtio-serial"
    config = vm.build_vm_config(sid, hv, sizing, paths, probe.accel, channel, vm.GUEST_KERNEL_PARAMS,
                                debug or cfg.agent.enable_debug, from_template=use_template,
                                debug_console=cfg.agent.debug_console_enabled)
    return config, use_template


def size_vm(cfg: RuntimeConfig, spec: dict[str, Any]) -> VMSizing:
    """The VM's size for ``spec`` on this host. Front ends call it before they boot anything: it
    refuses limits and sizing annotations (the CRI's pod sizes) that make no sense."""
    from kata.specconv import vm_sizing

    return vm_sizing(spec, cfg.hypervisor, os.cpu_count() or 1, host_memory_mib())


def run_concurrently(calls: list[Callable[[], object]]) -> None:
    """Run independent RPCs at once; re-raise the first failure after all have ended."""
    errors: list[BaseException] = []

    def one(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in calls[1:]]
    for t in threads:
        t.start()
    one(calls[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# Linux's memory blocks are a power of two between these (x86: 128 MiB to 2 GiB; arm64 from 128 MiB;
# s390 1 MiB). The guest reports its own: a hostile one must not size our hotplug.
_BLOCK_MIB_RANGE = (1, 16 * 1024)


def memory_block_mib(reported_bytes: int) -> int | None:
    """The guest's memory block size in MiB, or None when the reported value is implausible."""
    mib = reported_bytes >> 20
    low, high = _BLOCK_MIB_RANGE
    if reported_bytes != mib << 20 or not low <= mib <= high or mib & (mib - 1):
        return None
    return mib


def host_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def claim_id(sid: str) -> SandboxPaths:
    """Make the sandbox's state directory, atomically: of two creates with one id, one fails."""
    paths = SandboxPaths(sid)
    paths.state_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        paths.state_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise KataError(f"container with id exists: {sid}") from None
    return paths


class Sandbox:
    def __init__(self, sid: str, cfg: RuntimeConfig, timings: Timings | None = None) -> None:
        self.id = sid
        self.cfg = cfg
        self.paths = SandboxPaths(sid)
        self.shared = SharedDir(self.paths.mounts_dir, self.paths.shared_dir)
        self.timings = timings or Timings()
        self.hypervisor: Hypervisor | None = None
        self.virtiofsd: Any = None
        self.agent: AgentClient | None = None
        self.containers: dict[str, Any] = {}
        self._fresh_clone = False
        # The VM came from the warm pool: its VMM was started by the pool's daemon, not by us, so
        # the pod moves it into its cgroups itself (it did not inherit them).
        self.adopted = False
        # A pooled VM's first NIC, hot-added already (pool_client.Taken.nic), until the pod uses it.
        self.pooled_nic: dict[str, str] | None = None
        self._netns = ""
        self._before_launch: Callable[[], None] | None = None
        self.log = logging.getLogger(__name__)  # a child of the CLI's "kata" logger

    # ---- bring-up -------------------------------------------------------------------------
    @classmethod
    def create(cls, sid: str, cfg: RuntimeConfig, spec: dict[str, Any], debug: bool = False,
               timings: Timings | None = None, claimed: bool = False,
               before_launch: Callable[[], None] | None = None, netns: str = "") -> Sandbox:
        """Bring the VM up. ``claimed``: the caller made the state directory itself (claim_id) and
        recorded there what tearing down needs; otherwise it is claimed here. ``before_launch`` runs
        once, right before the sandbox's own processes (virtiofsd, the VMM) are started, after a
        template VM that outlives it was made: what it does to this process (its cgroups) they inherit.
        ``netns``: the pod's network namespace (a path), where a pooled VM's NIC can go."""
        if not claimed:
            claim_id(sid)
        sb = cls(sid, cfg, timings)
        sb._before_launch = before_launch
        sb._netns = netns
        try:
            sb._bring_up(spec, debug)
        except BaseException:
            sb.destroy()
            raise
        return sb

    @classmethod
    def attach(cls, sid: str, cfg: RuntimeConfig) -> Sandbox:
        """The sandbox another process created, to inspect, resize or destroy it; no agent
        connection (the one who holds it, if any, is the container's monitor)."""
        from kata import hypervisor
        from kata.fs_share.virtiofsd import Virtiofsd

        sb = cls(sid, cfg)
        if not sb.paths.state_dir.exists():
            raise KataError(f"sandbox {sid} does not exist")
        try:
            sb.hypervisor = hypervisor.attach(cfg.hypervisor, sb.paths.vm_dir)
        except HypervisorError:
            sb.hypervisor = None  # never launched, or already stopped
        if sb.paths.virtiofsd_socket.with_name(sb.paths.virtiofsd_socket.name + ".pid").exists():
            sb.virtiofsd = Virtiofsd.attach(Path(cfg.hypervisor.virtio_fs_daemon), sb.paths.virtiofsd_socket,
                                            sb.paths.shared_dir)
        return sb

    def release(self) -> None:
        """Close our agent connection and VMM handles and leave the VM running: another process
        (the container's monitor) connects next, as the port takes one client at a time."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.hypervisor is not None:
            self.hypervisor.release()

    def _bring_up(self, spec: dict[str, Any], debug: bool) -> None:
        hv = self.cfg.hypervisor
        for d in self.paths.all_dirs():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._save_state("creating")
        self.shared.create()
        for what, path in (("hypervisor", hv.path), ("kernel", hv.kernel), ("image", hv.image)):
            if path and not Path(path).exists():
                raise KataError(f"{what} {path} does not exist (see {self.cfg.source})")

        config, use_template = plan_vm(self.cfg, self.id, spec, self.paths, debug)
        self.timings.mark("config")
        if use_template:
            self._restore_from_template(config)
        else:
            self._boot_cold(config)

        storages = []
        if config.shared_fs is not None:
            storages.append(self._shared_storage(config.shared_fs.kind))
        hostname = str(spec.get("hostname") or "")
        agent = self.require_agent()
        calls: list[Callable[[], object]] = [
            lambda: agent.create_sandbox(hostname=hostname, storages=storages, sandbox_id=self.id)]
        if self._fresh_clone:
            # A clone resumes with the template's clock and entropy pool. The three calls are
            # independent, so they go out together on the one connection.
            now = time.time()
            calls.append(lambda: agent.set_guest_date_time(sec=int(now), usec=int((now % 1) * 1e6)))
            calls.append(lambda: agent.reseed_random_dev(data=os.urandom(64)))
        run_concurrently(calls)
        self.timings.mark("sandbox_created")
        self._save_state("ready")

    def _start_virtiofsd(self, config: VMConfig) -> None:
        from kata.fs_share.virtiofsd import Virtiofsd

        if config.shared_fs is not None and config.shared_fs.kind == "virtio-fs":
            self.virtiofsd = Virtiofsd.configured(self.cfg.hypervisor, self.paths.virtiofsd_socket,
                                                 self.paths.shared_dir)
            self.virtiofsd.start(timeout=5.0)
            self.timings.mark("virtiofsd_ready")

    def _launching(self) -> None:
        hook, self._before_launch = self._before_launch, None
        if hook is not None:
            hook()

    def _boot_cold(self, config: VMConfig) -> None:
        self._launching()
        self._start_virtiofsd(config)
        # A rare boot hangs silently (FACTS.md): one more try is safe, nothing has run in the guest yet.
        for attempt in (1, 2):
            self._launch(config, restore_from=None)
            try:
                self._connect_agent(config)
                return
            except KataError:
                if attempt == 2:
                    raise
                self.log.warning(f"sandbox {self.id}: guest did not answer, booting it again")
                self._drop_vm()

    def _restore_from_template(self, config: VMConfig) -> None:
        from kata.factory.template import TemplateStore

        hv = self.cfg.hypervisor
        if self.cfg.factory.vm_cache_number > 0 and self._take_pooled(config):
            return
        store = TemplateStore(Path(self.cfg.factory.template_path))
        state, made = store.ensure(config, hv)
        self.timings.mark("template_made" if made else "template_found")
        # The clone's memory copy below is charged to the cgroup of whoever writes it: ours, from here.
        self._launching()
        memory_fd = memory_path = None
        if clone_maps_template(config.shared_fs):
            # The template's file, mapped copy-on-write: the clone's writes go to its own memory.
            memory_path = store.memory_file(state)
        else:
            # virtiofsd maps guest RAM too, so the clone gets its own copy of the template's, in a
            # memfd: charged to QEMU's memory, never to a filesystem the guest could fill (it lives
            # as long as QEMU holds it).
            memory_fd = store.clone_memory(state, f"kata-{self.id}")
            if memory_fd is not None:
                self.timings.mark("memory_copied")
        try:
            self._start_virtiofsd(config)
            hypervisor = self._launch(config, restore_from=state, memory_fd=memory_fd,
                                      memory_path=memory_path)
        finally:
            if memory_fd is not None:
                os.close(memory_fd)
        if config.shared_fs is not None and config.shared_fs.hotplug:
            hypervisor.attach_shared_fs(config.shared_fs)
            self.timings.mark("shared_fs_attached")
        self._connect_agent(config)
        self._fresh_clone = True

    def _take_pooled(self, config: VMConfig) -> bool:
        """Adopt a warm clone of this shape from the pool's daemon (kata.factory.pool), already
        restored and its agent exercised; False (nothing done) when none is to be had."""
        from kata import hypervisor
        from kata.factory import pool_client as pool
        from kata.factory.template import template_key
        from kata.fs_share.virtiofsd import Virtiofsd

        endpoint = Path(self.cfg.factory.vm_cache_endpoint)
        if pool.poolable(config) is not None or not endpoint.exists():
            return False
        fsd = None
        if config.shared_fs is not None and config.shared_fs.kind == "virtio-fs":
            fsd = Virtiofsd.configured(self.cfg.hypervisor, self.paths.virtiofsd_socket,
                                       self.paths.shared_dir)
            # A pooled VM brings its shared directory, served already: ours, still empty, makes room.
            self.shared.destroy()
        try:
            taken = pool.take(endpoint, template_key(config), self.id,
                              share=fsd.settings() if fsd is not None else None,
                              netns=self._netns if self._netns.startswith("/") else None)
        except pool.PoolError as exc:
            # A VM (and its share) was moved to this sandbox but no answer came: ours to stop, which
            # the caller's destroy() does once they are attached.
            self.hypervisor = hypervisor.attach(self.cfg.hypervisor, self.paths.vm_dir)
            if fsd is not None:
                self.virtiofsd = Virtiofsd.attach(fsd.binary, self.paths.virtiofsd_socket,
                                                  self.paths.shared_dir)
            raise KataError(str(exc)) from None
        if taken is None:
            if fsd is not None:
                self.shared.create()
            return False
        if fsd is not None:
            # Ours from here, whatever fails next: destroy() stops it. (The pool hands a clone over
            # only with a virtiofsd of these very settings, served and hot-added.)
            self.virtiofsd = Virtiofsd.attach(fsd.binary, self.paths.virtiofsd_socket, self.paths.shared_dir)
        self.hypervisor = hypervisor.attach(self.cfg.hypervisor, taken.vm_dir)
        self.adopted = True
        self.pooled_nic = taken.nic
        self.timings.mark("vm_taken")
        self._save_state("creating")
        self._launching()
        self.timings.mark("shared_fs_attached")
        self._connect_agent(config)
        self._fresh_clone = True
        return True

    def _launch(self, config: VMConfig, restore_from: Path | None,
                memory_fd: int | None = None, memory_path: Path | None = None) -> Hypervisor:
        from kata import hypervisor

        vmm = hypervisor.new(self.cfg.hypervisor)
        self.hypervisor = vmm
        self.timings.mark("vmm_launch")
        if restore_from is None:
            vmm.start(config, timeout=self.cfg.hypervisor.boot_timeout)
        else:
            vmm.restore(config, restore_from, timeout=self.cfg.hypervisor.boot_timeout, memory_fd=memory_fd,
                        memory_path=memory_path)
        self.timings.mark("vmm_running")
        self._save_state("creating")
        return vmm

    def _connect_agent(self, config: VMConfig) -> None:
        assert self.hypervisor is not None
        # boot_timeout bounds the whole boot: a guest that hangs silently fails here, not never.
        timeout = float(self.cfg.hypervisor.boot_timeout)
        deadline = time.monotonic() + timeout
        try:
            from kata.agent_client.client import AgentClient
            from kata.agent_client.transport import connect

            stream = connect(self.hypervisor.agent_endpoint(), timeout)
            self.agent = AgentClient(stream)
            self.agent.wait_ready(max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            if not self.hypervisor.is_running():
                why = self.hypervisor.log_tail() or "no output"
                raise KataError(f"the VM exited before its agent answered: {why}") from exc
            raise KataError(f"guest agent did not answer within {timeout:g}s: {exc}"
                            f"{self._console_tail()}") from exc
        self.timings.mark("agent_ready")

    def _drop_vm(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.hypervisor is not None:
            self.hypervisor.stop(timeout=1.0)
            self.hypervisor = None

    def _shared_storage(self, kind: str) -> Any:
        from kata.protocols import agent_pb2
        from kata.sandbox import vm
        from kata.specconv import GUEST_SHARED_DIR

        if kind == "virtio-fs":
            return agent_pb2.Storage(driver="virtio-fs", source=vm.SHARED_FS_TAG, fstype="virtiofs",
                                     mount_point=GUEST_SHARED_DIR)
        msize = self.cfg.hypervisor.msize_9p
        return agent_pb2.Storage(driver="9p", source=vm.SHARED_FS_TAG, fstype="9p",
                                 options=["trans=virtio", "version=9p2000.L", f"msize={msize}"],
                                 mount_point=GUEST_SHARED_DIR)

    def _console_tail(self) -> str:
        text = self.hypervisor.console_output() if self.hypervisor is not None else ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return f" (guest console: {ascii(lines[-1][-200:])[1:-1]})" if lines else " (guest console is empty)"

    def _save_state(self, state: str) -> None:
        data: dict[str, Any] = {"id": self.id, "state": state, "config": str(self.cfg.source),
                                "containers": sorted(self.containers)}
        if self.hypervisor is not None:
            data["vmm_pids"] = self.hypervisor.pids()
        write_json(self.paths.state_file, data)

    # ---- teardown -------------------------------------------------------------------------
    def destroy(self, before_state_goes: Callable[[], list[str]] | None = None) -> list[str]:
        """Tear everything down; every step runs even if an earlier one failed. Returns the failures.
        ``before_state_goes`` runs once the VM's processes are gone, while the state that names what
        else the sandbox holds is still there for whoever finishes a teardown killed half-way."""
        errors: list[str] = []

        def step(what: str, fn: Any) -> None:
            try:
                fn()
            except Exception as exc:  # keep going: the next resource must still be released
                errors.append(f"{what}: {exc}")
                self.log.warning(f"cleanup of sandbox {self.id}: {what}: {exc}")

        step("copy guest console to the log", self._log_console)
        # A closed connection means the VM (or its agent) is gone already: nothing to ask it.
        had_agent = self.agent is not None and not self.agent.client.closed
        if self.agent is not None:
            agent = self.agent
            if had_agent:
                step("destroy sandbox in guest", lambda: agent.destroy_sandbox(timeout=_POWEROFF_GRACE))
            step("close agent connection", agent.close)
            self.agent = None
        if self.hypervisor is not None:
            hyp = self.hypervisor
            # Without the agent (it powers the guest off) nothing in the guest needs a grace period:
            # the root is read-only and files live on the host, behind the shared filesystem.
            grace = _POWEROFF_GRACE if had_agent else 0.0
            step("stop VM", lambda: hyp.stop(timeout=grace))
        if self.virtiofsd is not None:
            step("stop virtiofsd", self.virtiofsd.stop)
        step("unmount shared directory", self.shared.destroy)
        if before_state_goes is not None:
            hook = before_state_goes
            step("release what the sandbox held", lambda: errors.extend(hook()))
        kept = ""
        for d in reversed(self.paths.all_dirs()):
            if d == self.paths.state_dir and kept:
                # What stays must stay findable: the state names it for the next teardown.
                errors.append(f"kept {d}: {kept} could not be removed")
                break
            # Never into a mount: a volume the steps above could not unmount keeps its files.
            failures = len(errors)
            step(f"remove {d}", lambda d=d: remove_tree(str(d)))
            if len(errors) > failures:
                kept = str(d)
        self.timings.mark("destroyed")
        return errors

    def _log_console(self) -> None:
        """With --debug, the guest's console (kernel and agent lines, its last part: a ring) outlives
        the VM in our log, each line escaped (the guest writes it)."""
        if self.log.isEnabledFor(logging.DEBUG) and self.hypervisor is not None:
            for line in self.hypervisor.console_output().splitlines():
                if line.strip():
                    self.log.debug(f"guest console: {ascii(line)[1:-1]}")

    # ---- resizing -------------------------------------------------------------------------
    def grow_memory(self, agent: AgentClient, want_mib: int) -> int:
        """Hot-add memory until the VM has ``want_mib``, in whole guest memory blocks, and wait for the
        guest to online it. Returns the VM's new size in MiB; 0 when it did not (or could not) grow:
        the container's limit still applies in the guest, the VM's own size caps it sooner."""
        if self.hypervisor is None:
            return 0
        have = self.hypervisor.memory_mib()
        if want_mib <= have:
            return 0
        # The guest adds memory in whole blocks (128 MiB on x86): a smaller DIMM would stay unused.
        reported = agent.get_guest_details(mem_hotplug_probe=False).mem_block_size_bytes
        block_mib = memory_block_mib(reported)
        if block_mib is None:
            self.log.warning(f"sandbox {self.id}: the guest reports a memory block of {reported} bytes, "
                             "which no kernel uses: the VM does not grow")
            return 0
        want_mib = have + -(-(want_mib - have) // block_mib) * block_mib
        try:
            self.hypervisor.hotplug_memory(want_mib - have)
        except HypervisorError as exc:
            self.log.warning(f"sandbox {self.id}: the VM cannot grow to {want_mib} MiB: {exc}")
            return 0
        self.log.info(f"sandbox {self.id}: VM memory grown from {have} to {want_mib} MiB")
        agent.online_cpu_mem(wait=True, mem_mib=want_mib)
        return want_mib

    def vm_processes(self) -> list[ProcessId]:
        """The host processes without which the VM is gone: the VMM, and virtiofsd (a guest whose
        shared filesystem died would hang on its next file access). One that has died already is
        listed too: whoever watches them must see the VM gone at once."""
        return [p for procs in self.vm_processes_by_kind().values() for p in procs]

    def vm_processes_by_kind(self) -> dict[str, list[ProcessId]]:
        """vm_processes() by what each is: "hypervisor" and "virtiofsd" (what the metrics report)."""
        found = {"hypervisor": self.hypervisor.process_ids() if self.hypervisor is not None else []}
        if self.virtiofsd is not None and self.virtiofsd.process_id is not None:
            found["virtiofsd"] = [self.virtiofsd.process_id]
        return found

    def require_hypervisor(self) -> Hypervisor:
        if self.hypervisor is None:
            raise KataError(f"sandbox {self.id} has no VM")
        return self.hypervisor

    def require_agent(self) -> AgentClient:
        if self.agent is None:
            raise KataError(f"sandbox {self.id} has no agent connection")
        return self.agent


__all__ = ["Sandbox", "HypervisorError"]
