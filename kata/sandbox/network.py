"""A pod's network namespace mirrored into its VM (Kata's tcfilter model): for each interface there,
a tap with traffic mirrored both ways by tc, a network device hot-added on it with the interface's
MAC, and the guest interface configured like the original (addresses, MTU, routes). The runc front
end does it at `start` (Docker connects its network through a prestart hook, after create), the shim
when it brings the pod up (CNI has set the namespace up before).

Only the shape and order live here; netlink and tc are kata.network's, hotplug the hypervisor's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from kata.errors import KataError

if TYPE_CHECKING:
    from kata.agent_client.client import AgentClient
    from kata.hypervisor.base import Hypervisor
    from kata.network.endpoints import Endpoint

log = logging.getLogger("kata.runc")

# Interfaces every new namespace may have that are not the container's network: the kernel's
# fallback tunnel devices (present when their drivers are loaded).
_NOT_ENDPOINTS = frozenset({"lo", "sit0", "tunl0", "ip6tnl0", "ip6gre0", "gre0", "gretap0", "erspan0",
                            "ip_vti0", "ip6_vti0"})
_NIC_TIMEOUT = 10.0


def may_have_endpoints(pid: int, ours: str = "") -> bool:
    """Whether the network namespace of ``pid`` has an interface to mirror, link ``ours`` (a pooled
    VM's tap) aside: a read of /proc, so that a container without networking does not pay for
    netlink at start."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            return _lists_endpoints(f.readlines(), ours)
    except OSError:
        return False


def _netns_may_have_endpoints(netns: str, ours: str = "") -> bool:
    """may_have_endpoints() for a namespace by name or path, link ``ours`` (a pooled VM's tap, moved
    there) aside; True when it cannot be read (discovery then says why)."""
    from kata.utils import netns as nsutil

    def read() -> list[str]:
        with open("/proc/thread-self/net/dev") as f:  # the joined thread's namespace, not the process's
            return f.readlines()

    try:
        return _lists_endpoints(nsutil.call_in(nsutil.path_of(netns), read), ours)
    except (OSError, KataError):
        return True


def _lists_endpoints(net_dev: list[str], ours: str = "") -> bool:
    """Whether /proc/net/dev's lines name an interface other than the kernel's own and ``ours``."""
    names = (line.split(":", 1)[0].strip() for line in net_dev[2:])
    return any(name not in _NOT_ENDPOINTS and name != ours for name in names)


def mirror(netns: str, hyp: Hypervisor, agent: Callable[[], AgentClient],
           pooled: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Mirror every endpoint of ``netns`` into the VM; returns the (interface, tap) pairs made.
    ``agent`` gives the agent's connection, asked for only when there is an endpoint to configure.

    ``pooled``: the NIC a pooled VM came with (NIC 0, kata.factory.pool_nic): the first endpoint
    takes it when its tap is in ``netns`` (``tap``), the guest's link getting the endpoint's MAC in
    place of the pool's (``mac``); the endpoints' own NICs follow it."""
    made: list[tuple[str, str]] = []
    found: list[Endpoint] = []
    # Nothing to mirror (Docker's --network none, a pod without CNI): not a netlink request made.
    if _netns_may_have_endpoints(netns, ours=(pooled or {}).get("tap", "")):
        from kata.network import endpoints

        found = endpoints.discover(netns)
    if not found:
        if pooled:
            give_back(netns, hyp, pooled)
        return made
    from kata.network import tcfilter

    queues = hyp.nic_queues()
    by_fd = not _vmm_in(netns, hyp)
    offset = 1 if pooled else 0
    try:
        client = agent()
        for i, ep in enumerate(found):
            if i == 0 and pooled and pooled.get("tap"):
                tap = pooled["tap"]
                tcfilter.adopt_tap(netns, tap, ep.mtu)
                made.append((ep.name, tap))
                tcfilter.connect(netns, ep.name, tap)
                _configure(client, ep, current_mac=pooled["mac"])
                log.info(f"network: {ep.name} ({ep.mac}) mirrored into the VM through the pooled {tap}")
                continue
            index = i + offset
            tap = tcfilter.tap_name(index)
            tcfilter.create_tap(netns, tap, ep.mtu, multi_queue=queues > 1)
            made.append((ep.name, tap))
            tcfilter.connect(netns, ep.name, tap)
            fds = tcfilter.open_tap(netns, tap, queues) if by_fd else []
            try:
                hyp.hotplug_nic(index, tap, ep.mac, ep.mtu, queues=queues, tap_fds=fds)
            finally:
                for fd in fds:  # QEMU holds its own copies
                    os.close(fd)
            _configure(client, ep)
            log.info(f"network: {ep.name} ({ep.mac}) mirrored into the VM through {tap}")
        _routes(client, found)
    except BaseException:
        unmirror(netns, made)
        raise
    finally:
        hyp.release()
    return made


def give_back(netns: str, hyp: Hypervisor, pooled: Mapping[str, str]) -> None:
    """No interface to give a pooled VM's NIC: the guest gives it back, and its tap goes."""
    try:
        hyp.unplug_nic(0)
    except KataError as exc:  # e.g. asked already: the guest is letting go of it
        log.warning(f"network: unplugging the pooled VM's unused NIC: {exc}")
    finally:
        hyp.release()
    if pooled.get("tap"):
        from kata.utils.netns import delete_link

        try:
            delete_link(netns, pooled["tap"])
        except (OSError, KataError) as exc:
            log.warning(f"network: deleting {pooled['tap']} in {netns}: {exc}")


def _vmm_in(netns: str, hyp: Hypervisor) -> bool:
    """Whether the VMM runs in ``netns`` (it does unless it came from the warm pool): there it opens
    a tap by name; elsewhere it is handed descriptors opened in ``netns``."""
    from kata.utils.netns import path_of

    pids = hyp.pids()
    if not pids:
        return True  # nothing to hand descriptors to: hotplug fails on its own
    path = path_of(netns)
    try:
        return os.stat(f"/proc/{pids[0]}/ns/net").st_ino == os.stat(path).st_ino
    except OSError:
        return True


def _configure(agent: AgentClient, ep: Endpoint, current_mac: str = "") -> None:
    from kata.agent_client.client import AgentError
    from kata.protocols import agent_pb2 as pb

    iface = pb.Interface(name=ep.name, hw_addr=ep.mac, current_hw_addr=current_mac, mtu=ep.mtu, ip_addresses=[
        pb.IPAddress(family=pb.v6 if family == 6 else pb.v4, address=address, mask=str(prefix))
        for family, address, prefix in ep.addresses])
    deadline = time.monotonic() + _NIC_TIMEOUT
    while True:
        try:
            agent.update_interface(interface=iface)
            return
        except AgentError:
            # Until the guest has handled the PCIe hotplug, no link has that MAC.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _routes(agent: AgentClient, found: list[Endpoint]) -> None:
    from kata.protocols import agent_pb2 as pb

    routes = [pb.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
                       family=pb.v6 if r.family == 6 else pb.v4)
              for ep in found for r in ep.routes]
    if routes:
        agent.update_routes(routes=routes)


def unmirror(netns: str, made: list[tuple[str, str]] | list[list[str]]) -> None:
    """Remove the taps and tc filters (the namespace may already be gone: nothing to do then)."""
    from kata.network import tcfilter
    from kata.utils.netns import delete_link

    for name, tap in made:
        try:
            tcfilter.disconnect(netns, name, tap)
            delete_link(netns, tap)
        except Exception as exc:  # noqa: BLE001 - keep removing the others
            log.warning(f"network: removing {tap} for {name}: {exc}")
