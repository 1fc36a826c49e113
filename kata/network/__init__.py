"""The container's network namespace mirrored into its VM (Kata's tcfilter model).

`endpoints.discover` reads what the guest must reproduce; `tcfilter` wires each veth to a tap that
QEMU serves as the guest's NIC. Both talk netlink through pyroute2 inside the namespace.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _pyroute2_without_its_init() -> None:
    """pyroute2's package __init__ only imports every family it supports (NDB, IPDB, conntrack,
    ethtool, wireless, IPVS, ...), which cost each shim that mirrors a network 12.4 MB and 0.11 s,
    kept for the pod's life. The package registered without running it, the modules used here import
    alone: 6.6 MB and 0.06 s. (A package that is already imported is left as it is.)"""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)


_pyroute2_without_its_init()

from pyroute2.iproute.linux import IPRoute  # noqa: E402

from kata.utils.netns import path_of  # noqa: E402


def rtnl(ns: str | None) -> IPRoute:
    """An rtnetlink socket in `ns`: a name under /run/netns, a path (/proc/PID/ns/net), or None.

    flags=0: pyroute2 would otherwise create a missing named namespace (O_CREAT is its default),
    and a namespace that vanished must be an error, not a fresh empty one.
    """
    if ns is None:
        return IPRoute()
    if not os.path.exists(path_of(ns)):
        raise FileNotFoundError(f"network namespace {ns} does not exist")
    return IPRoute(netns=ns, flags=0)
