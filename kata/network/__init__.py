"""The container's network namespace mirrored into its VM (Kata's tcfilter model).

`endpoints.discover` reads what the guest must reproduce; `tcfilter` wires each veth to a tap that
QEMU serves as the guest's NIC. Both talk rtnetlink (kata.utils.rtnetlink) inside the namespace.
"""

from __future__ import annotations

import os

from kata.utils.netns import call_in, path_of
from kata.utils.rtnetlink import Rtnl


def rtnl(ns: str | None) -> Rtnl:
    """An rtnetlink socket in `ns`: a name under /run/netns, a path (/proc/PID/ns/net), or None.

    A netlink socket speaks for the namespace it was made in, whichever thread later uses it: it is
    made by a thread that joined `ns`. A namespace that vanished is an error (FileNotFoundError),
    never a fresh empty one.
    """
    if ns is None:
        return Rtnl()
    path = path_of(ns)
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {ns} does not exist")
    return call_in(path, Rtnl)
