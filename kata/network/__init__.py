"""The container's network namespace mirrored into its VM (Kata's tcfilter model).

`endpoints.discover` reads what the guest must reproduce; `tcfilter` wires each veth to a tap that
QEMU serves as the guest's NIC. Both talk rtnetlink (kata.utils.rtnetlink) inside the namespace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from kata.utils.netns import NetnsError, call_in, path_of
from kata.utils.rtnetlink import Rtnl

T = TypeVar("T")


def in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in network namespace `ns` (a name under /run/netns, a path such as /proc/PID/ns/net,
    or None: here). A namespace that is gone, or goes before it is joined, is FileNotFoundError."""
    if ns is None:
        return fn()
    path = path_of(ns)
    try:
        if os.path.exists(path):
            return call_in(path, fn)
    except NetnsError:
        if os.path.exists(path):
            raise
    raise FileNotFoundError(f"network namespace {ns} does not exist")


def rtnl(ns: str | None) -> Rtnl:
    """An rtnetlink socket in `ns`. A netlink socket speaks for the namespace it was made in,
    whichever thread later uses it: it is made by a thread that joined `ns`."""
    return in_netns(ns, Rtnl)
