"""Whether a namespace has interfaces to mirror, read from /proc/net/dev before netlink is loaded
(kata.sandbox.network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kata.sandbox.network import _lists_endpoints

HEADER = ["Inter-|   Receive ...\n", " face |bytes    packets ...\n"]


def _dev(*names: str) -> list[str]:
    return HEADER + [f"{name}: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n" for name in names]


def test_only_the_kernels_own_links_and_ours_are_not_endpoints() -> None:
    assert not _lists_endpoints(_dev())
    assert not _lists_endpoints(_dev("lo", "sit0", "tunl0", "gre0", "ip6tnl0"))
    # a pooled VM's tap, moved into the pod's namespace, is ours: nothing to mirror beside it
    assert not _lists_endpoints(_dev("lo", "tap0_kata"), ours="tap0_kata")
    assert _lists_endpoints(_dev("lo", "tap0_kata"))
    assert _lists_endpoints(_dev("lo", "eth0", "tap0_kata"), ours="tap0_kata")


@pytest.mark.timeout(30)
def test_a_fifo_where_a_namespace_should_be_does_not_block(tmp_path: Path) -> None:
    """The pod's namespace path is opened without blocking: a FIFO put there is refused at once."""
    from kata.utils import netns

    fifo = tmp_path / "netns"
    os.mkfifo(fifo)
    with pytest.raises(netns.NetnsError):
        netns.call_in(str(fifo), lambda: None)
