"""VM templates (Kata's factory): boot a VM once per shape, snapshot it with the agent ready, and
start sandboxes by restoring the snapshot.

A template is keyed by everything that decides what the restored VM is: the VMM, kernel and image
files (by identity), machine, accelerator, vCPUs, memory, kernel command line and device set. What
differs per sandbox (its id, run directory, console log and the host directory behind its 9p share)
is left out of the key: those come from QEMU's command line at restore time. A virtio-fs share is
hot-added to each clone after the restore, since QEMU cannot snapshot a vhost-user-fs device.

A template keeps its guest RAM in a file beside its state (the snapshot leaves RAM out). A virtio-fs
clone needs RAM that virtiofsd can map as well, so it gets its own copy (a memfd); a 9p clone maps
the file itself copy-on-write, so clones share every page none of them has written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from kata.agent_client.client import AgentClient
from kata.agent_client.transport import connect
from kata.config import HypervisorConfig
from kata.errors import KataError
from kata.factory.sparse import punch_zero_pages, sparse_copy
from kata.hypervisor.base import VMConfig
from kata.sandbox.paths import TEMPLATE_VM_ROOT
from kata.utils.files import lock_held, locked
from kata.utils.safepath import remove_tree

# Bump when the way templates are made changes (e.g. the agent's state at snapshot time).
TEMPLATE_FORMAT = "8"  # 8: free page reporting (VMConfig gained a field: every shape digest changed)
_STATE = "state"
_META = "meta.json"
# A template's guest RAM (its VM maps it shared, so the snapshot leaves RAM out). A virtio-fs clone
# maps a sparse copy of it: only the ~60 MB the template wrote, where restoring RAM from the
# migration stream into shared memory would fill every page of the guest's size.
MEMORY = "memory"
# How long to wait, once the agent answers, for its warm-up (AgentDetails.warm) before snapshotting
# anyway: a cold template still works, its clones only pay for the warm-up themselves.
WARMUP_TIMEOUT = 15.0
_WARMUP_POLL = 0.05


log = logging.getLogger("kata.template")


class TemplateError(KataError):
    pass


# The guest zeroes all its free memory once (about 0.5 s per 400 MiB under TCG).
_RELEASE_TIMEOUT = 60.0


def _release_free_memory(client: AgentClient) -> None:
    """Have the guest zero its free pages before the snapshot, so that they can be left out of the
    RAM file. A failure costs memory per clone, never the template: logged, not raised."""
    try:
        zeroed = client.release_free_memory(timeout=_RELEASE_TIMEOUT).zeroed_bytes
        log.debug("template guest zeroed %d MiB of free memory", zeroed >> 20)
    except KataError as exc:
        log.warning("template guest did not release its free memory: %s", exc)


def _file_identity(path: Path | None) -> str:
    if path is None:
        return "-"
    real = path.resolve()
    st = real.stat()
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _asset_identities(config: VMConfig) -> dict[str, str]:
    files = (config.hypervisor_path, config.kernel, config.image, config.initrd)
    return {str(f): _file_identity(f) for f in files if f is not None}


def _shape(config: VMConfig) -> VMConfig:
    """The config without what differs between sandboxes of one shape."""
    return dataclasses.replace(
        config, id="", run_dir=Path("/"), memory_file=None,
        shared_fs=(dataclasses.replace(config.shared_fs, host_dir=Path("/"), vhost_user_socket=Path("/"))
                   if config.shared_fs else None),
    )


def shape_digest(config: VMConfig) -> str:
    """The VM's shape and assets, without the command line they give."""
    h = hashlib.sha256(TEMPLATE_FORMAT.encode())
    h.update(repr(_shape(config)).encode())
    for identity in _asset_identities(config).values():
        h.update(identity.encode())
    return h.hexdigest()[:16]


def template_key(config: VMConfig) -> str:
    """What makes two VMs interchangeable: their shape and assets, and the QEMU command line they
    give (a new device in the argv, which a snapshot would not have, means a new template)."""
    from kata.hypervisor.qemu_argv import build_argv

    h = hashlib.sha256(shape_digest(config).encode())
    shape = _shape(config)
    if shape.agent_channel != "vsock":  # vsock VMs are never templated (and need a cid for an argv)
        h.update("\0".join(build_argv(shape)).encode())
    return h.hexdigest()[:16]


def templatable(config: VMConfig) -> str | None:
    """Why ``config`` cannot come from a template, or None when it can."""
    fs = config.shared_fs
    if fs is not None and fs.kind == "virtio-fs" and not fs.hotplug:
        return "QEMU cannot snapshot a VM with a vhost-user-fs (virtio-fs) device: it must be hot-added"
    if config.agent_channel == "vsock":
        return "a restored VM would keep the template's vsock CID"
    return None


def wait_warm(client: AgentClient, timeout: float) -> bool:
    """Poll GetGuestDetails until the agent reports its warm-up done; False if it did not in time."""
    deadline = time.monotonic() + timeout
    while not client.get_guest_details(mem_block_size=False, mem_hotplug_probe=False).agent_details.warm:
        if time.monotonic() >= deadline:
            return False
        time.sleep(_WARMUP_POLL)
    return True


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def state_file(self, config: VMConfig) -> Path:
        return self.root / template_key(config) / _STATE

    def ensure(self, config: VMConfig, hv: HypervisorConfig) -> tuple[Path, bool]:
        """The snapshot for ``config``'s shape, made now if missing. Returns (path, made_now)."""
        why = templatable(config)
        if why:
            raise TemplateError(f"VM cannot come from a template: {why}")
        key = template_key(config)
        tdir = self.root / key
        state = tdir / _STATE
        if state.is_file():
            return state, False
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Concurrent first runs of one shape: one boots the template, the others wait for it.
        with locked(self.root / f"{key}.lock"):
            if state.is_file():
                return state, False
            self._make(config, tdir, hv)
        self.prune(replacing=(shape_digest(config), key))
        return state, True

    def _make(self, config: VMConfig, tdir: Path, hv: HypervisorConfig) -> None:
        from kata import hypervisor

        work = tdir / "work"
        shutil.rmtree(work, ignore_errors=True)
        share = work / "share"
        share.mkdir(parents=True)
        # Sockets go under the state root, as every VM's do (a unix socket path has 108 bytes at
        # most, and template_path may be long), but not beside the sandboxes' run dirs, where a
        # sandbox id could name this one.
        run_dir = TEMPLATE_VM_ROOT / tdir.name
        tconfig = dataclasses.replace(
            config, id=f"template-{tdir.name}", run_dir=run_dir, memory_file=tdir / MEMORY,
            shared_fs=(dataclasses.replace(config.shared_fs, host_dir=share,
                                           vhost_user_socket=work / "vfs.sock")
                       if config.shared_fs else None),
        )
        boot_timeout = hv.boot_timeout
        qemu = hypervisor.new(hv)
        made = False
        try:
            deadline = time.monotonic() + boot_timeout
            qemu.start(tconfig, timeout=boot_timeout)
            try:
                client = AgentClient(connect(qemu.agent_endpoint(), max(0.1, deadline - time.monotonic())))
                try:
                    client.wait_ready(max(0.1, deadline - time.monotonic()))
                    if wait_warm(client, WARMUP_TIMEOUT):
                        _release_free_memory(client)
                finally:
                    client.close()
            except KataError as exc:
                lines = [ln for ln in qemu.console_output().splitlines() if ln.strip()]
                tail = ascii(lines[-1][-200:])[1:-1] if lines else qemu.log_tail()
                raise TemplateError(f"guest agent did not answer within {boot_timeout:g}s: {exc}"
                                    + (f" (guest console: {tail})" if tail else "")) from exc
            tmp = tdir / f".{_STATE}.{os.getpid()}"
            qemu.save(tmp)
            # What the template was made from, so prune() can tell when a rebuilt asset orphans it.
            (tdir / _META).write_text(json.dumps({"assets": _asset_identities(config),
                                                  "format": TEMPLATE_FORMAT,
                                                  "shape": shape_digest(config)}))
            made = True
        finally:
            qemu.stop(timeout=2.0)
            shutil.rmtree(run_dir, ignore_errors=True)
            # A failed make leaves nothing behind; a good one keeps only its state and record.
            shutil.rmtree(work if made else tdir, ignore_errors=True)
        # QEMU is gone, so nothing writes the RAM file any more; the state is published only after,
        # so that no clone maps the file while its zero pages are cut out.
        try:
            memory = tdir / MEMORY
            freed = punch_zero_pages(memory) if memory.is_file() else 0
        except OSError as exc:
            shutil.rmtree(tdir, ignore_errors=True)
            raise TemplateError(f"template RAM file: {exc}") from exc
        log.debug("template %s: %d MiB of zero pages left out of its RAM file", tdir.name, freed >> 20)
        os.replace(tmp, tdir / _STATE)

    @staticmethod
    def memory_file(state: Path) -> Path | None:
        """The template's RAM file, for clones that map it copy-on-write (None: RAM is in the state)."""
        src = state.parent / MEMORY
        return src if src.is_file() else None

    @staticmethod
    def clone_memory(state: Path, name: str) -> int | None:
        """A clone's own copy of the template's RAM, as a memfd the caller owns (QEMU maps it, and
        it is freed with the last holder); None when the template keeps its RAM in the state."""
        src = state.parent / MEMORY
        if not src.exists():
            return None
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            sparse_copy(src, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def prune(self, replacing: tuple[str, str] | None = None) -> int:
        """Remove templates whose kernel, image or VMM has since been replaced (each holds ~60-80 MB),
        or whose layout is older than this runtime's, or that ``replacing`` (shape digest, key: the
        template just made) supersedes because the command line for that shape changed,
        and what failed or older makes left: directories without a state or record, stray locks.
        Called with the lock of the template just made held; other makes hold their own lock."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for tdir in self.root.iterdir():
            if not tdir.is_dir():
                continue
            try:
                meta = json.loads((tdir / _META).read_text())
                assets = meta["assets"]
                current = {path: _file_identity(Path(path)) for path in assets}
                # A template of an older layout (the runtime was upgraded) is never used again.
                stale = (current != assets or meta.get("format") != TEMPLATE_FORMAT
                         or not (tdir / _STATE).is_file()
                         # The same shape made again under another key: its command line changed.
                         or (replacing is not None and meta.get("shape") == replacing[0]
                             and tdir.name != replacing[1]))
            except (OSError, ValueError, KeyError):
                # No record, unreadable, or an asset is gone; a make in progress has its work dir.
                stale = not (tdir / "work").exists()
            if stale:
                shutil.rmtree(tdir, ignore_errors=True)
                removed += 1
        for lock in self.root.glob("*.lock"):
            if not (self.root / lock.stem).exists() and not lock_held(lock):
                lock.unlink(missing_ok=True)
        return removed

    def list(self) -> list[tuple[str, int]]:
        """(key, size in bytes) of each template."""
        if not self.root.is_dir():
            return []
        return sorted((p.parent.name, p.stat().st_size) for p in self.root.glob(f"*/{_STATE}"))

    def destroy(self) -> int:
        n = len(self.list())
        remove_tree(str(self.root))  # never into a mount, wherever template_path points
        return n


__all__ = ["TemplateError", "TemplateStore", "template_key", "templatable"]
