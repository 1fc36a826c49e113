"""The container's network namespace mirrored into its VM (Kata's tcfilter model).

`endpoints.discover` reads what the guest must reproduce; `tcfilter` wires each veth to a tap that
QEMU serves as the guest's NIC. Both talk netlink through pyroute2 inside the namespace.
"""

from __future__ import annotations

import os

from pyroute2 import IPRoute
from pyroute2.netns import NETNS_RUN_DIR


def rtnl(ns: str | None) -> IPRoute:
    """An rtnetlink socket in `ns`: a name under /run/netns, a path (/proc/PID/ns/net), or None.

    flags=0: pyroute2 would otherwise create a missing named namespace (O_CREAT is its default),
    and a namespace that vanished must be an error, not a fresh empty one.
    """
    if ns is None:
        return IPRoute()
    if not os.path.exists(ns if "/" in ns else os.path.join(NETNS_RUN_DIR, ns)):
        raise FileNotFoundError(f"network namespace {ns} does not exist")
    return IPRoute(netns=ns, flags=0)
