"""kata-agent entry point: PID 1 of the guest. Mount the basics, start the reaper, serve the agent API.

Imports are kept to what the first Health.Check needs: under TCG every module costs milliseconds.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from kata.guest.agent import layout, log

if TYPE_CHECKING:
    from kata.guest.agent.reaper import Reaper
    from kata.protocols.agent_pb2 import Storage


def kernel_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return {}
    return dict((w.split("=", 1) + [""])[:2] for w in words if w.startswith("agent."))  # type: ignore[misc]


def _ensure_stdio() -> None:
    # Without /dev/console in the image the kernel starts init with fds 0-2 closed, and the first
    # pipe we make would land on them.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            for dev in ("/dev/console", "/dev/null"):
                try:
                    new = os.open(dev, os.O_RDWR)
                except OSError:
                    continue
                if new != fd:
                    os.dup2(new, fd)
                    os.close(new)
                break


def process_start_time() -> float:
    """When this process started, in seconds since boot (the clock of time.monotonic())."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def power_off() -> None:
    from kata.utils.mount import libc

    log.info("powering off")
    os.sync()
    libc.reboot(0x4321FEDC)  # RB_POWER_OFF: ACPI power-off makes QEMU exit
    os._exit(0)  # reboot() only returns when we are not allowed to (not PID 1 of the VM)


def main() -> int:
    is_init = os.getpid() == 1
    if is_init:
        _ensure_stdio()
        from kata.guest.agent import mounts

        mounts.mount_early()
        os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    args = kernel_cmdline()
    log.set_debug(args.get("agent.log") == "debug")
    try:
        started = process_start_time()
    except (OSError, ValueError, IndexError):
        started = 0.0
    log.info(f"kata-agent starting (process started at {started:.3f}s after boot)")
    if args.get(layout.PARAM) == "off":  # before any thread starts: a personality is per thread
        try:
            layout.fix_helper_layout()
        except OSError as exc:
            log.warn(f"helpers keep a randomised layout: {exc}")

    from kata import ttrpc
    from kata.guest.agent import channel, service
    from kata.guest.agent.crun import Crun
    from kata.guest.agent.network import Network, loopback_up
    from kata.guest.agent.reaper import Reaper
    from kata.guest.agent.sandbox import Sandbox
    from kata.guest.agent.warmup import Warmup

    if is_init:
        try:
            loopback_up()
        except OSError as exc:
            log.warn(f"loopback: {exc}")

    reaper = Reaper()
    reaper.start()
    sandbox = Sandbox(reaper, Crun(reaper))
    warmup = Warmup(sandbox)
    svc = service.AgentService(
        sandbox,
        network=Network(),
        power_off=power_off if is_init else None,
        mount_storage=_mount_storage if is_init else None,
        started_at=started,
        warmup=warmup,
    )
    server = ttrpc.Server()
    svc.register(server)
    warmup.start()
    if "agent.debug_console" in args:
        _start_debug_console(reaper, args, want_vsock=args.get("agent.channel") == "vsock")
    try:
        channel.serve(server, want_vsock=args.get("agent.channel") == "vsock")
    except Exception as e:
        log.warn(f"agent channel failed: {e}")
    if is_init:
        power_off()  # PID 1 must not return: the kernel would panic
    return 1


def _start_debug_console(reaper: Reaper, args: dict[str, str], want_vsock: bool) -> None:
    """The operator's root shell (Kata's agent.debug_console), on a vsock port when the channels
    are vsock (agent.debug_console_vport), else on a virtio-serial port of its own."""
    from kata.guest.agent import debug_console

    port: int | None = None
    if want_vsock:
        try:
            port = int(args.get("agent.debug_console_vport", ""))
        except ValueError:
            log.warn("agent.debug_console_vport is not a port number: debug console on virtio-serial")
    debug_console.start(reaper, port)


def _mount_storage(s: Storage) -> None:
    from kata.guest.agent.mounts import mount_storage

    mount_storage(s.driver, s.source, s.fstype, list(s.options), s.mount_point)


if __name__ == "__main__":
    sys.exit(main())
