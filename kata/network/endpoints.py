"""Discover the interfaces of a network namespace that the VM must mirror (Kata's endpoints)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from kata.network import rtnl
from kata.network.tcfilter import OWN_TAP_ALIAS
from kata.utils.rtnetlink import IFF_UP, RT_TABLE_MAIN, RTN_UNICAST, Link, Rtnl

RTPROT_KERNEL = 2  # connected-subnet routes: the guest kernel adds them itself with the address
NUD_PERMANENT = 0x80

# Kinds whose frames a tc mirred redirect can carry to a tap (tun in L3 mode, tunnels, bridges: no).
MIRRORED_KINDS = frozenset({"veth", "macvlan", "ipvlan", "tap"})

_FAMILY: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}


@dataclass(frozen=True)
class Route:
    dest: str  # "default" or a CIDR
    gateway: str  # "" when the destination is on-link
    device: str
    scope: int  # RT_SCOPE_*: 0 universe, 253 link
    family: int  # 4 or 6
    source: str = ""  # preferred source address (RTA_PREFSRC), "" when unset


@dataclass(frozen=True)
class Neighbour:
    address: str
    mac: str
    device: str
    family: int


@dataclass(frozen=True)
class Endpoint:
    name: str
    index: int
    kind: str  # one of MIRRORED_KINDS
    mac: str
    mtu: int
    up: bool
    addresses: tuple[tuple[int, str, int], ...]  # (family 4|6, address, prefix length)
    routes: tuple[Route, ...]  # on-link routes before gateway routes: the order the guest adds them
    neighbours: tuple[Neighbour, ...] = ()  # static (permanent) entries only, as Kata copies them


def _kind(link: Link) -> str | None:
    if link.kind == "tun":
        # A tun device in tap mode carries Ethernet frames; one in tun mode has no L2 to mirror.
        return "tap" if link.tun_type == 2 else "tun"
    return link.kind or None


def _addresses(r: Rtnl) -> dict[int, list[tuple[int, str, int]]]:
    by_index: dict[int, list[tuple[int, str, int]]] = {}
    for index, family, prefix, packed in r.all_addresses():
        version = _FAMILY.get(family)
        if version is None:
            continue
        address = ipaddress.ip_address(packed)
        if address.version == 6 and address.is_link_local:
            continue  # fe80::/64: the guest kernel derives its own from the MAC
        by_index.setdefault(index, []).append((version, str(address), prefix))
    return by_index


def _routes(r: Rtnl, names: dict[int, str]) -> dict[int, list[Route]]:
    by_index: dict[int, list[Route]] = {}
    for family in _FAMILY:
        for msg in r.routes(family):
            # Multipath routes (no single RTA_OIF) are not mirrored: Kata's agent has no such route.
            if (msg.table != RT_TABLE_MAIN or msg.protocol == RTPROT_KERNEL or msg.type != RTN_UNICAST
                    or msg.oif not in names):
                continue
            by_index.setdefault(msg.oif, []).append(
                Route(
                    dest=f"{msg.dst}/{msg.dst_len}" if msg.dst else "default",
                    gateway=msg.gateway,
                    device=names[msg.oif],
                    scope=msg.scope,
                    family=_FAMILY[family],
                    source=msg.source,
                )
            )
    for routes in by_index.values():
        routes.sort(key=lambda r: r.gateway != "")  # stable: a gateway must be reachable first
    return by_index


def _neighbours(r: Rtnl, names: dict[int, str]) -> dict[int, list[Neighbour]]:
    by_index: dict[int, list[Neighbour]] = {}
    for msg in r.neighbours():
        family = _FAMILY.get(msg.family)
        if (not msg.state & NUD_PERMANENT or family is None or not msg.dst or not msg.mac
                or msg.index not in names):
            continue
        by_index.setdefault(msg.index, []).append(Neighbour(msg.dst, msg.mac, names[msg.index], family))
    return by_index


def discover(netns_path: str | None = None) -> list[Endpoint]:
    """The interfaces of `netns_path` (a /run/netns name or a path; None: ours) to mirror into the VM.

    Every link but lo, whatever its state (as Kata), of a kind in MIRRORED_KINDS; taps this package
    created (marked with OWN_TAP_ALIAS) are skipped, so a rescan at start does not mirror them again.
    """
    with rtnl(netns_path) as r:
        chosen: dict[int, tuple[Link, str]] = {}
        for link in r.links():
            kind = _kind(link)
            if link.name == "lo" or kind not in MIRRORED_KINDS or link.alias.startswith(OWN_TAP_ALIAS):
                continue
            chosen[link.index] = (link, kind)
        names = {index: link.name for index, (link, _) in chosen.items()}
        routes = _routes(r, names)
        neighbours = _neighbours(r, names)
        addresses = _addresses(r)
        return [
            Endpoint(
                name=link.name,
                index=index,
                kind=kind,
                mac=link.mac,
                mtu=link.mtu,
                up=bool(link.flags & IFF_UP),
                addresses=tuple(addresses.get(index, ())),
                routes=tuple(routes.get(index, ())),
                neighbours=tuple(neighbours.get(index, ())),
            )
            for index, (link, kind) in sorted(chosen.items())
        ]
