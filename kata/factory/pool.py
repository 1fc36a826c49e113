"""The warm VM pool (Kata's VMCache, on top of our templates): a long-lived daemon keeps
``vm_cache_number`` clones of the default VM shape restored from its template, their agent
connected and exercised, and hands one to a sandbox in a single call over a root-only socket.

Handing over is a rename: the clone runs in POOL_ROOT/<key>/<slot> (QEMU's sockets, pid file and
state record live there), and the daemon renames that directory to the sandbox's VM directory,
VM_ROOT/<sid>, after rewriting the record's id. From then on the VM is the sandbox's exactly as a
restored one would be (the sandbox attaches to it as `delete` attaches to any VM); the daemon
forgets it. QEMU's listening sockets move with the directory (a unix socket is found by its inode).
Each clone also has its virtio-fs share ready (kata.factory.pool_share), handed over the same way,
and its first NIC (kata.factory.pool_nic), whose tap moves into the pod's network namespace.

What guards it: the socket is in a 0700 directory and answers root alone (SO_PEERCRED); a request
is one bounded JSON line; a sandbox id is checked as every sandbox id is, and the rename goes from
and to directory descriptors opened without following links; only a clone of the shape the caller
asks for (its template key: shape, assets by identity, QEMU's command line), recomputed at each
take, with a virtiofsd set up as the caller's would be, and still running, is handed out; a tap
moves only into what the kernel says is a network namespace (opened without following links). The
pooled QEMUs run in an empty network namespace of the daemon's: the pod's taps are handed to them
as descriptors (kata.sandbox.network). They die with
the daemon: an orderly stop kills them, and a forked watcher kills whatever is left in POOL_ROOT
once the daemon is gone however it went (the next daemon sweeps it too, before it starts).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata.errors import KataError
from kata.factory import pool_nic, pool_share
from kata.factory.pool_client import PoolError, call, poolable, receive, send
from kata.factory.pool_nic import PooledNic
from kata.factory.pool_share import PooledShare
from kata.hypervisor.base import clone_maps_template
from kata.sandbox.paths import POOL_ROOT, POOL_SHARES_ROOT, VM_ROOT, InvalidIdError, validate_sandbox_id
from kata.utils.files import pid_lock
from kata.utils.process import ProcessId, terminate
from kata.utils.sockets import listen_private, peer_creds

if TYPE_CHECKING:
    from kata.agent_client.client import AgentClient
    from kata.config import RuntimeConfig
    from kata.hypervisor.base import Hypervisor, VMConfig

log = logging.getLogger("kata.pool")

# A client that has not sent its request in this long is dropped (the daemon serves one at a time).
REQUEST_TIMEOUT = 2.0
# After a take the refill waits this long, so the new clone does not compete for the CPU with the
# sandbox that just took one: a clone takes ~0.55 s (restore, share, NIC, warm-up), and on this
# 2-core TCG host a refill 0.5 s after the take cancelled the pool's gain for `docker run`
# (1.55 s against 1.54 s without a pool; 1.41 s with the refill 3 s later). A sandbox is up within
# ~1.5 s of its take.
REFILL_DELAY = 2.0
# How often the refill looks at the pool when nothing wakes it (a clone that died, changed assets).
_TICK = 2.0
PID_FILE = POOL_ROOT / "pool.pid"
LOG_FILE = POOL_ROOT / "pool.log"


# ---- the daemon ------------------------------------------------------------------------------------


@dataclass
class Slot:
    name: str
    key: str
    run_dir: Path
    vmm: Hypervisor
    ready_at: float = 0.0
    share: PooledShare | None = None  # its virtio-fs share, served and hot-added already
    nic: PooledNic | None = None  # its first NIC, hot-added on a tap of the daemon's
    warm: bool = False  # its guest ran the warm-up container after the restore


@dataclass
class Counters:
    made: int = 0
    taken: int = 0
    failed: int = 0
    last_error: str = ""
    times: list[float] = field(default_factory=list)  # seconds to make each of the last clones


def _warm_up(client: AgentClient, name: str, timeout: float) -> bool:
    """The clone's guest runs its warm-up container; False (logged) if the agent refused or failed it:
    such a clone is only as slow to start a container as a restored VM. A guest that does not answer
    in time, or whose connection is gone, raises: that clone is not kept."""
    from kata import ttrpc
    from kata.agent_client.client import AgentError

    try:
        client.warm_up(timeout=timeout)
    except AgentError as exc:
        if exc.code in (ttrpc.Code.DEADLINE_EXCEEDED, ttrpc.Code.UNAVAILABLE):
            raise
        log.warning(f"pool: warm-up of clone {name} failed: {exc}")
        return False
    return True


def default_vm_config(cfg: RuntimeConfig, sid: str = "factory") -> VMConfig:
    """The VM a container with no limits gets: the shape the template and the pool prepare."""
    from kata.sandbox.paths import SandboxPaths
    from kata.sandbox.sandbox import plan_vm

    config, _ = plan_vm(cfg, sid, {}, SandboxPaths(sid), False)
    return config


class PoolDaemon:
    def __init__(self, cfg: RuntimeConfig, config: VMConfig | None = None, root: Path = POOL_ROOT,
                 shares: Path = POOL_SHARES_ROOT) -> None:
        """``config``: the VM shape to keep (the default VM's when None)."""
        from kata.factory.template import TemplateStore

        self.cfg = cfg
        self.root = root
        self.shares = shares
        self.endpoint = Path(cfg.factory.vm_cache_endpoint)
        self.target = cfg.factory.vm_cache_number
        self.config = config if config is not None else default_vm_config(cfg)
        self.store = TemplateStore(Path(cfg.factory.template_path))
        self.ready: list[Slot] = []
        self.warming = 0
        self.counters = Counters()
        self._seq = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._refill_after = 0.0

    # -- the shape -----------------------------------------------------------------------------------

    def current_key(self) -> str:
        """The template key of the pool's shape now (a rebuilt image or kernel gives another, and
        a rebuilt image maybe another size, which its persistent memory has on QEMU's command line)."""
        from kata.factory.template import template_key
        from kata.utils.files import regular_file_size

        image = self.config.image
        if image is not None and self.config.image_pmem_size:
            self.config = dataclasses.replace(self.config, image_pmem_size=regular_file_size(image))
        return template_key(self.config)

    # -- making clones -----------------------------------------------------------------------------

    def _make_clone(self, key: str) -> Slot:
        from kata import hypervisor
        from kata.agent_client.client import AgentClient
        from kata.agent_client.transport import connect

        hv = self.cfg.hypervisor
        state, _ = self.store.ensure(self.config, hv)
        self._seq += 1
        # Never a slot name used before: a clone handed over and later stopped unlinks its sockets
        # by the paths it was started with, which must not be a newer clone's.
        name = f"{os.getpid()}-{self._seq}"
        run_dir = self.root / key / name
        config = dataclasses.replace(self.config, id=f"pool-{name}", run_dir=run_dir)
        fs = config.shared_fs
        cow = clone_maps_template(fs)
        memory_fd = None if cow else self.store.clone_memory(state, f"kata-pool-{name}")
        memory_path = self.store.memory_file(state) if cow else None
        vmm = hypervisor.new(hv)
        share = nic = None
        try:
            try:
                vmm.restore(config, state, timeout=hv.boot_timeout, memory_fd=memory_fd,
                            memory_path=memory_path)
            finally:
                if memory_fd is not None:
                    os.close(memory_fd)
            if fs is not None and fs.kind == "virtio-fs" and fs.hotplug:
                share = pool_share.prepare(hv, config, vmm, run_dir, self.shares / key / name)
            nic = pool_nic.prepare(vmm, self._seq)
            # The agent connected, its calls and a container start-up run once: TCG has translated
            # the paths a sandbox's first calls take, in this QEMU (translations are not in the
            # snapshot). A failed warm-up only leaves the clone as slow as a restored one.
            client = AgentClient(connect(vmm.agent_endpoint(), hv.boot_timeout))
            try:
                client.wait_ready(hv.boot_timeout)
                for _ in range(3):
                    client.get_guest_details(mem_block_size=True, mem_hotplug_probe=False)
                warm = _warm_up(client, name, hv.boot_timeout)
            finally:
                client.close()
            vmm.release()
        except BaseException:
            vmm.stop(timeout=1.0)
            if share is not None:
                pool_share.remove(share)
            if nic is not None:
                pool_nic.remove(nic)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return Slot(name, key, run_dir, vmm, time.monotonic(), share, nic, warm)

    def _refill(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                dropped = self._drop_dead_or_stale()
            for slot in dropped:  # stopped outside the lock: a take must not wait for it
                _kill(slot)
            with self._lock:
                wait = self._refill_after - time.monotonic()
                if len(self.ready) >= self.target or wait > 0:
                    self._wake.wait(timeout=max(0.05, wait) if wait > 0 else _TICK)
                    continue
                self.warming = 1
            began = time.monotonic()
            try:
                key = self.current_key()
                slot = self._make_clone(key)
            except Exception as exc:  # noqa: BLE001 - counted, shown in status, retried after a pause
                log.warning(f"pool: making a clone failed: {exc}")
                with self._lock:
                    self.warming = 0
                    self.counters.failed += 1
                    self.counters.last_error = str(exc)[:300]
                self._stop.wait(_TICK)
                continue
            with self._lock:
                self.warming = 0
                if self._stop.is_set():
                    _kill(slot)
                    return
                self.ready.append(slot)
                self.counters.made += 1
                self.counters.times = [*self.counters.times[-9:], round(time.monotonic() - began, 3)]
            log.info(f"pool: clone {slot.name} ready in {time.monotonic() - began:.2f}s "
                     f"({len(self.ready)}/{self.target})")

    def _drop_dead_or_stale(self) -> list[Slot]:
        """With the lock held: clones whose QEMU died, or of a shape no longer current, leave the
        pool; returned for the caller to stop once it has let go of the lock."""
        try:
            key = self.current_key()
        except (OSError, KataError) as exc:
            key = ""
            self.counters.last_error = f"the pool's shape: {exc}"[:300]
        dropped = []
        for slot in list(self.ready):
            if slot.key != key or not slot.vmm.is_running():
                log.info(f"pool: dropping clone {slot.name} ({'stale shape' if slot.key != key else 'died'})")
                self.ready.remove(slot)
                dropped.append(slot)
        return dropped

    # -- requests ----------------------------------------------------------------------------------

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "status":
            return self.status()
        if op == "take":
            key, sid, share, netns = msg.get("key"), msg.get("sid"), msg.get("share"), msg.get("netns")
            if not isinstance(key, str) or not isinstance(sid, str):
                return {"error": "take needs a key and a sid (strings)"}
            if share is not None and not (isinstance(share, list) and all(isinstance(x, str) for x in share)):
                return {"error": "take: share must be a list of virtiofsd options"}
            if netns is not None and not (isinstance(netns, str) and netns.startswith("/")):
                return {"error": "take: netns must be an absolute path"}
            return self.take(key, sid, share, netns)
        if op == "stop":
            self._stop.set()
            return {"pid": os.getpid()}
        return {"error": f"unknown op {str(op)[:40]!r}"}

    def take(self, key: str, sid: str, share: list[str] | None = None,
             netns: str | None = None) -> dict[str, Any]:
        """``share``: the options of the virtiofsd the sandbox would start (None: it starts none); a
        clone whose own virtiofsd serves otherwise, or that has none, is not handed out (the sandbox
        restores one instead). ``netns``:
        the pod's network namespace, where the clone's first NIC's tap goes."""
        try:
            validate_sandbox_id(sid)
        except (InvalidIdError, KataError) as exc:
            return {"error": str(exc)}
        with self._lock:
            if key != self.current_key():
                return {"vm_dir": None, "why": "another shape"}
            slot = next((s for s in self.ready if s.key == key and s.vmm.is_running()), None)
            if slot is None:
                return {"vm_dir": None, "why": "empty"}
            # The sandbox attaches to the clone's virtiofsd as its own: the same, or none on both sides.
            if (slot.share.virtiofsd.settings() if slot.share is not None else None) != share:
                return {"vm_dir": None, "why": "another virtiofsd"}
            try:
                _hand_over(slot, self.root / key, sid)
            except OSError as exc:
                # The clone stays ours (nothing moved): a directory in the way is the caller's problem.
                return {"error": f"handing a VM to sandbox {sid}: {exc.strerror or exc}"}
            self.ready.remove(slot)
            slot.vmm.release()
            self.counters.taken += 1
            self._refill_after = time.monotonic() + REFILL_DELAY
            self._wake.notify_all()
        log.info(f"pool: clone {slot.name} handed to sandbox {sid}")
        nic = None
        if slot.nic is not None:
            nic = {"mac": slot.nic.mac, "tap": ""}
            if netns is not None:
                try:
                    nic["tap"] = pool_nic.move(slot.nic, netns)
                except (OSError, ValueError, KataError) as exc:  # the pod hot-adds its own instead
                    log.warning(f"pool: moving the tap of clone {slot.name} to {netns}: {exc}")
            if not nic["tap"]:
                pool_nic.remove(slot.nic)  # unused (the pod unplugs the NIC): it must not pile up here
        return {"vm_dir": str(VM_ROOT / sid), "pid": slot.vmm.pids()[0] if slot.vmm.pids() else 0,
                "nic": nic}

    def status(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            return {
                "pid": os.getpid(), "target": self.target, "key": self.ready[0].key if self.ready else "",
                "ready": [{"name": s.name, "pid": s.vmm.pids()[0] if s.vmm.pids() else 0,
                           "virtiofsd": (s.share.virtiofsd.pid or 0) if s.share else 0, "warm": s.warm,
                           "idle_s": round(now - s.ready_at, 1)} for s in self.ready],
                "warming": self.warming, **dataclasses.asdict(self.counters),
            }

    # -- running -----------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run until SIGTERM, SIGINT, SIGHUP or a stop request; the pool's VMs go with it."""
        from kata.utils import netns

        if os.geteuid() != 0:
            raise PoolError("the VM pool runs as root only")
        if self.target <= 0:
            raise PoolError(f"vm_cache_number is 0 in {self.cfg.source}: no pool to keep")
        why = poolable(self.config)
        if why is not None:
            raise PoolError(f"the default VM cannot be pooled: {why}")
        _private_dir(self.root)
        _private_dir(self.shares)
        _private_dir(self.endpoint.parent)
        lock_fd = pid_lock(PID_FILE)
        if lock_fd is None:
            other = PID_FILE.read_text(errors="replace").strip()
            raise PoolError(f"a VM pool daemon is running already (pid {other or '?'})")
        try:
            sweep(self.root, self.shares)
            _start_watcher(self.root, self.shares)  # before any thread: it forks
            # The pooled QEMUs need no network until a pod's taps are handed to them.
            netns.unshare()
            # (a dead daemon's socket there is replaced: we hold the pool's lock)
            listener = listen_private(str(self.endpoint), 16)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, lambda *_: self._stop.set())
            refill = threading.Thread(target=self._refill, name="refill", daemon=True)
            refill.start()
            log.info(f"pool: serving {self.endpoint}, keeping {self.target} VM(s) of {self.current_key()}")
            try:
                self._accept(listener)
            finally:
                listener.close()
                self.endpoint.unlink(missing_ok=True)
                with self._lock:
                    self._wake.notify_all()
                refill.join(timeout=self.cfg.hypervisor.boot_timeout + 5)
                with self._lock:
                    for slot in self.ready:
                        _kill(slot)
                    self.ready.clear()
                sweep(self.root, self.shares)
        finally:
            PID_FILE.unlink(missing_ok=True)
            os.close(lock_fd)

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            _reap_children()
            ready, _, _ = select.select([listener], [], [], 0.5)
            if not ready:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            _pid, uid, _gid = peer_creds(conn)
            if uid != 0:
                send(conn, {"error": "the VM pool answers root alone"})
                return
            answer = self.handle(receive(conn))
            send(conn, answer)
        except (OSError, ValueError, PoolError) as exc:
            log.info(f"pool: a request failed: {exc}")
            try:
                send(conn, {"error": str(exc)[:200]})
            except (OSError, PoolError):
                pass


def _hand_over(slot: Slot, key_dir: Path, sid: str) -> None:
    """Rename the clone's directory to VM_ROOT/<sid> (absent, or empty: the sandbox made it), its
    record naming the sandbox. Both ends through directory descriptors opened without following
    links, so no component can be swapped for a link on the way."""
    from kata.hypervisor.qemu import QemuState
    from kata.hypervisor.qemu_argv import RunPaths

    state_path = RunPaths(slot.run_dir).state_file
    QemuState.load(state_path)  # a clone whose record is unreadable is not handed out
    VM_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    if slot.share is not None:
        pool_share.hand_over(slot.share, sid)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        src = os.open(key_dir, flags)
        try:
            dst = os.open(VM_ROOT, flags)
            try:
                state = dataclasses.replace(QemuState.load(state_path), id=sid)
                state.save(state_path)
                os.rename(slot.name, sid, src_dir_fd=src, dst_dir_fd=dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    except BaseException:
        if slot.share is not None:
            pool_share.take_back(slot.share, sid)
        raise


def _kill(slot: Slot) -> None:
    slot.vmm.stop(timeout=1.0)
    if slot.share is not None:
        pool_share.remove(slot.share)
    if slot.nic is not None:
        pool_nic.remove(slot.nic)
    shutil.rmtree(slot.run_dir, ignore_errors=True)


def sweep(root: Path, shares: Path = POOL_SHARES_ROOT) -> int:
    """Kill every QEMU a pool left in ``root`` (its record names it) and remove its directories, and
    the clones' shares in ``shares`` (their virtiofsd, mounts and directories).
    Returns how many QEMUs were running. Called with the pool's lock held, or by its watcher."""
    from kata.hypervisor.qemu import QemuState
    from kata.hypervisor.qemu_argv import RunPaths

    killed = 0
    key_dirs = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()] if root.is_dir() else []
    for key_dir in key_dirs:
        for slot_dir in key_dir.iterdir():
            try:
                state = QemuState.load(RunPaths(slot_dir).state_file)
            except KataError:
                pass
            else:
                proc = ProcessId(state.pid, state.start_time)
                if proc.is_alive():
                    terminate(proc, 1.0)
                    killed += 1
    pool_share.sweep(root, shares)
    for key_dir in key_dirs:
        shutil.rmtree(key_dir, ignore_errors=True)
    return killed


def _start_watcher(root: Path, shares: Path) -> None:
    """Fork a process that sweeps ``root`` once this one is gone, however it went (SIGKILL
    included): it waits for EOF on a pipe only we hold the write end of."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the watcher
        try:
            os.close(wfd)
            # A terminal's ^C reaches the whole group: the watcher must outlive the daemon, not die with it.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            while os.read(rfd, 1):
                pass
            sweep(root, shares)
        finally:
            os._exit(0)
    os.close(rfd)
    _WATCHER_PIPE.append(wfd)  # held, never written, until this process ends


_WATCHER_PIPE: list[int] = []


def _reap_children() -> None:
    """Pooled QEMUs are our children until they die, also once handed over: collect them, so a
    sandbox's VM that exits is gone, not a zombie of ours."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != 0 or st.st_mode & 0o077 or not os.path.isdir(path) or path.is_symlink():
        raise PoolError(f"{path} must be a directory of root's that no one else may enter (mode 0700)")


def stop(endpoint: Path, timeout: float = 30.0) -> int | None:
    """Ask the daemon at ``endpoint`` to stop, and wait until it has (its VMs gone with it). Returns
    its pid, or None when none answers."""
    if not endpoint.exists():
        return None
    try:
        pid = int(call(endpoint, {"op": "stop"}, REQUEST_TIMEOUT)["pid"])
    except (PoolError, KeyError, ValueError, TypeError):
        return None
    proc = ProcessId.of(pid)
    if proc is not None:
        from kata.utils.process import wait_exit

        if not wait_exit(proc, timeout):
            raise PoolError(f"the VM pool daemon (pid {pid}) did not stop within {timeout:g}s")
    return pid


def main(argv: list[str] | None = None) -> int:
    """`python -m kata.factory.pool [--config FILE]`: the daemon in the foreground."""
    import argparse
    import sys

    from kata.config import load_config

    p = argparse.ArgumentParser(prog="kata-pool", description="keep warm VMs for sandboxes to take")
    p.add_argument("--config", help="configuration.toml (default: as kata-runtime finds it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        PoolDaemon(load_config(Path(args.config) if args.config else None)).serve()
    except KataError as exc:
        print(f"kata-pool: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
