"""One virtiofsd per VM: it serves one host directory over a vhost-user socket that QEMU connects to.

Launched detached like QEMU (it must outlive a short CLI process) and found again through its pid file.
Arguments are those of QEMU's C virtiofsd (Debian's /usr/lib/qemu/virtiofsd). When QEMU exits it logs
"Unexpected poll revents 11" and exits too: harmless.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from kata.fs_share.shared_dir import ShareError
from kata.hypervisor import daemon
from kata.utils import process
from kata.utils.files import write_private

if TYPE_CHECKING:
    from kata.config import HypervisorConfig

CacheMode = Literal["auto", "always", "never"]
# The C virtiofsd calls "never" "none".
_CACHE_ARG = {"auto": "auto", "always": "always", "never": "none"}


class VirtiofsdError(ShareError):
    """virtiofsd failed to start; the message is one line (shown to the user as a ShareError)."""


class Virtiofsd:
    def __init__(
        self,
        binary: Path,
        socket_path: Path,
        shared_dir: Path,
        cache: CacheMode = "auto",
        extra_args: Sequence[str] = (),
        pid_file: Path | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.binary = binary
        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.cache = cache
        self.extra_args = tuple(extra_args)
        self.pid_file = pid_file or socket_path.with_name(socket_path.name + ".pid")
        self.log_file = log_file or socket_path.with_name(socket_path.name + ".log")
        self._proc: process.ProcessId | None = None

    @classmethod
    def configured(cls, hv: HypervisorConfig, socket_path: Path, shared_dir: Path) -> Virtiofsd:
        """The virtiofsd configuration.toml asks for, serving ``shared_dir`` on ``socket_path`` (its
        pid file and log beside it, in the VM's directory, where Sandbox.attach finds them)."""
        return cls(binary=Path(hv.virtio_fs_daemon), socket_path=socket_path, shared_dir=shared_dir,
                   cache=cast(CacheMode, hv.virtio_fs_cache), extra_args=tuple(hv.virtio_fs_extra_args),
                   log_file=socket_path.with_name("virtiofsd.log"))

    def options(self) -> list[str]:
        """Its options beyond the socket and the directory."""
        return [
            "-o", f"cache={_CACHE_ARG[self.cache]}",
            # Its own mount, pid and network namespaces, pivoted into the shared directory: a
            # compromised virtiofsd sees only what the guest may see (chroot alone keeps the host's
            # mounts and network). Mounts made later below the share still reach it (slave propagation).
            "-o", "sandbox=namespace",
            # Submounts (a volume's own mounts) stay mounts of their own in the guest, with their flags.
            "-o", "announce_submounts",
            *self.extra_args,
        ]  # fmt: skip

    def settings(self) -> list[str]:
        """The program and its options: two with equal settings serve their directories alike."""
        return [str(self.binary), *self.options()]

    def argv(self) -> list[str]:
        return [str(self.binary), f"--socket-path={self.socket_path}", "-o", f"source={self.shared_dir}",
                *self.options()]

    def start(self, timeout: float = 5.0) -> None:
        if self._proc is not None and self._proc.is_alive():
            raise VirtiofsdError(f"virtiofsd for {self.socket_path} is already running")
        if not self.shared_dir.is_dir():
            raise VirtiofsdError(f"shared directory {self.shared_dir} does not exist")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        try:
            proc = daemon.launch(self.argv(), self.log_file)
        except daemon.DaemonError as exc:
            raise VirtiofsdError(str(exc)) from exc
        self._proc = proc
        write_private(self.pid_file, f"{proc.pid} {proc.start_time}\n")
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if not proc.is_alive():
                why = daemon.log_tail(self.log_file) or "no output"
                self._cleanup()
                raise VirtiofsdError(f"virtiofsd exited during start: {why}")
            if time.monotonic() > deadline:
                process.terminate(proc, 1.0)
                why = daemon.log_tail(self.log_file) or "no output"
                self._cleanup()
                raise VirtiofsdError(f"virtiofsd socket missing after {timeout:g}s, killed: {why}")
            time.sleep(0.002)

    @classmethod
    def attach(
        cls, binary: Path, socket_path: Path, shared_dir: Path, pid_file: Path | None = None
    ) -> Virtiofsd:
        """The instance a (possibly other) process started; a missing pid file means it is gone."""
        fsd = cls(binary, socket_path, shared_dir, pid_file=pid_file)
        try:
            pid, start_time = (int(x) for x in fsd.pid_file.read_text().split())
            fsd._proc = process.ProcessId(pid, start_time)
        except (OSError, ValueError):
            fsd._proc = None
        return fsd

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    @property
    def process_id(self) -> process.ProcessId | None:
        """The process we started, alive or not (its namespace sandbox forks more, which die with it)."""
        return self._proc

    def is_running(self) -> bool:
        return self.pid is not None

    def stop(self, timeout: float = 2.0) -> None:
        if self._proc is not None:
            process.terminate(self._proc, timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        self._proc = None
        for path in (self.socket_path, self.pid_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
