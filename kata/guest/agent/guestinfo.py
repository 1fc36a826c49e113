"""Guest resources: online hot-added CPUs and memory, and the details the host asks for."""

from __future__ import annotations

import glob
import os
import time

import kata
from kata.protocols import agent_pb2 as pb

SYS_CPU = "/sys/devices/system/cpu"
SYS_MEM = "/sys/devices/system/memory"
STORAGE_HANDLERS = ["virtio-fs", "9p", "local", "bind", "tmpfs"]


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


def online_cpus(sys_cpu: str = SYS_CPU) -> int:
    n = 0
    for path in sorted(glob.glob(os.path.join(sys_cpu, "cpu[0-9]*", "online"))):
        with open(path) as f:
            if f.read().strip() == "0" and _write(path, "1"):
                n += 1
    return n


def online_memory(sys_mem: str = SYS_MEM) -> int:
    n = 0
    for path in sorted(glob.glob(os.path.join(sys_mem, "memory[0-9]*", "state"))):
        with open(path) as f:
            if f.read().strip() == "offline" and _write(path, "online"):
                n += 1
    return n


def online_cpu_mem(req: pb.OnlineCPUMemRequest, sys_cpu: str = SYS_CPU, sys_mem: str = SYS_MEM) -> None:
    # Hot-plugged CPUs may show up in sysfs a little after the host's hotplug: `wait` retries.
    deadline = time.monotonic() + (5.0 if req.wait else 0.0)
    done = online_cpus(sys_cpu)
    while req.wait and req.nb_cpus and done < req.nb_cpus and time.monotonic() < deadline:
        time.sleep(0.05)
        done += online_cpus(sys_cpu)
    if not req.cpu_only:
        online_memory(sys_mem)
        while req.wait and req.mem_mib and _short_of(sys_mem, req.mem_mib) and time.monotonic() < deadline:
            time.sleep(0.05)
            online_memory(sys_mem)


def _short_of(sys_mem: str, want_mib: int) -> bool:
    """Less than want_mib online, give or take a block (sizes need not be multiples of one)."""
    try:
        with open(os.path.join(sys_mem, "block_size_bytes")) as f:
            block = int(f.read().strip(), 16)
    except (OSError, ValueError):
        return False
    count = 0
    for path in glob.glob(os.path.join(sys_mem, "memory[0-9]*", "state")):
        with open(path) as f:
            count += f.read().strip() == "online"
    return (count + 1) * block < want_mib << 20


def guest_details(
    req: pb.GetGuestDetailsRequest, sys_mem: str = SYS_MEM, warm: bool = True
) -> pb.GuestDetailsResponse:
    resp = pb.GuestDetailsResponse(
        agent_details=pb.AgentDetails(
            version=kata.__version__,
            init_daemon=os.getpid() == 1,
            storage_handlers=STORAGE_HANDLERS,
            warm=warm,
        )
    )
    if req.mem_block_size:
        try:
            with open(os.path.join(sys_mem, "block_size_bytes")) as f:
                resp.mem_block_size_bytes = int(f.read().strip(), 16)
        except (OSError, ValueError):
            resp.mem_block_size_bytes = 0
    if req.mem_hotplug_probe:
        resp.support_mem_hotplug_probe = os.path.exists(os.path.join(sys_mem, "probe"))
    return resp


# <linux/random.h>: _IOW('R', 0x03, int[2]) — add entropy to the pool and credit it;
# _IO('R', 0x07) — reseed the CRNG from the pool now.
_RNDADDENTROPY = 0x40085203
_RNDRESEEDCRNG = 0x5207


def set_date_time(sec: int, usec: int) -> None:
    """Set the guest's wall clock (CLOCK_REALTIME); a restored clone still has its template's."""
    time.clock_settime(time.CLOCK_REALTIME, sec + usec / 1_000_000)


def reseed_random(data: bytes) -> None:
    """Mix host randomness into the pool and credit it, so clones of one template diverge."""
    import fcntl
    import struct

    with open("/dev/urandom", "wb", buffering=0) as f:
        fcntl.ioctl(f, _RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
        # Once initialised, the CRNG reseeds from the pool only every so often: without this, clones
        # restored within that interval still draw the same numbers.
        fcntl.ioctl(f, _RNDRESEEDCRNG)
