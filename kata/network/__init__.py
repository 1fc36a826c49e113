"""The container's network namespace mirrored into its VM (Kata's tcfilter model).

`endpoints.discover` reads what the guest must reproduce; `tcfilter` wires each veth to a tap that
QEMU serves as the guest's NIC. Both talk rtnetlink (kata.utils.rtnetlink) inside the namespace.
"""

from __future__ import annotations

from kata.utils.netns import in_netns
from kata.utils.rtnetlink import Rtnl


def rtnl(ns: str | None) -> Rtnl:
    """An rtnetlink socket in `ns` (kata.utils.netns.in_netns: FileNotFoundError when it is gone).
    A netlink socket speaks for the namespace it was made in, whichever thread later uses it: it is
    made by a thread that joined `ns`."""
    return in_netns(ns, Rtnl)
