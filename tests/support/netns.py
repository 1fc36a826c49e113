"""Named network namespaces (`ip netns`) for tests and benchmarks: made, used, always removed."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

NETNS_DIR = "/run/netns"


@contextlib.contextmanager
def temporary_netns(prefix: str) -> Iterator[str]:
    """A fresh namespace named PREFIX-<random>, its loopback up; deleted on exit."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        in_netns(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, *cmd: str, check: bool = True,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the namespace (an `ip netns` name, or the path of one, such as a CRI pod's):
    nsenter rather than `ip netns exec`, which remounts /sys and hides the cgroup mounts (FACTS.md)."""
    path = name if name.startswith("/") else f"{NETNS_DIR}/{name}"
    return subprocess.run(["nsenter", f"--net={path}", *cmd], capture_output=True, text=True,
                          check=check, timeout=timeout)


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread that joined the namespace (kata.utils.netns.call_in), re-raising what it
    raises: the caller's own thread stays where it is."""
    from kata.utils import netns

    return netns.call_in(f"{NETNS_DIR}/{name}", fn)
