"""Discover the interfaces of a network namespace that the VM must mirror (Kata's endpoints)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from kata.network import rtnl
from kata.network.tcfilter import OWN_TAP_ALIAS

RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2  # connected-subnet routes: the guest kernel adds them itself with the address
RTN_UNICAST = 1
NUD_PERMANENT = 0x80
IFF_UP = 0x1

# Kinds whose frames a tc mirred redirect can carry to a tap (tun in L3 mode, tunnels, bridges: no).
MIRRORED_KINDS = frozenset({"veth", "macvlan", "ipvlan", "tap"})

_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}


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


def _kind(link: Any) -> str | None:
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind == "tun":
        # A tun device in tap mode carries Ethernet frames; one in tun mode has no L2 to mirror.
        tun_type = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_TUN_TYPE")
        return "tap" if tun_type == 2 else "tun"
    return str(kind) if kind is not None else None


def _addresses(ipr: Any, index: int) -> tuple[tuple[int, str, int], ...]:
    out = []
    for msg in ipr.get_addr(index=index):
        family = _FAMILY.get(msg["family"])
        # IFA_LOCAL is the interface's own address on point-to-point links (IFA_ADDRESS is the peer).
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if family is None or not addr:
            continue
        if family == 6 and ipaddress.IPv6Address(addr).is_link_local:
            continue  # fe80::/64: the guest kernel derives its own from the MAC
        out.append((family, str(addr), int(msg["prefixlen"])))
    return tuple(out)


def _routes(ipr: Any, names: dict[int, str]) -> dict[int, list[Route]]:
    by_index: dict[int, list[Route]] = {}
    for family in _FAMILY:
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            oif = msg.get("RTA_OIF")
            # Multipath routes (no single RTA_OIF) are not mirrored: Kata's agent has no such route.
            if msg["proto"] == RTPROT_KERNEL or msg["type"] != RTN_UNICAST or oif not in names:
                continue
            dst = msg.get("RTA_DST")
            by_index.setdefault(oif, []).append(
                Route(
                    dest=f"{dst}/{msg['dst_len']}" if dst else "default",
                    gateway=str(msg.get("RTA_GATEWAY") or ""),
                    device=names[oif],
                    scope=int(msg["scope"]),
                    family=_FAMILY[family],
                    source=str(msg.get("RTA_PREFSRC") or ""),
                )
            )
    for routes in by_index.values():
        routes.sort(key=lambda r: r.gateway != "")  # stable: a gateway must be reachable first
    return by_index


def _neighbours(ipr: Any, names: dict[int, str]) -> dict[int, list[Neighbour]]:
    by_index: dict[int, list[Neighbour]] = {}
    for msg in ipr.get_neighbours():
        family = _FAMILY.get(msg["family"])
        dst, mac, index = msg.get("NDA_DST"), msg.get("NDA_LLADDR"), msg["ifindex"]
        if not msg["state"] & NUD_PERMANENT or family is None or not dst or not mac or index not in names:
            continue
        by_index.setdefault(index, []).append(Neighbour(str(dst), str(mac), names[index], family))
    return by_index


def discover(netns_path: str | None = None) -> list[Endpoint]:
    """The interfaces of `netns_path` (a /run/netns name or a path; None: ours) to mirror into the VM.

    Every link but lo, whatever its state (as Kata), of a kind in MIRRORED_KINDS; taps this package
    created (marked with OWN_TAP_ALIAS) are skipped, so a rescan at start does not mirror them again.
    """
    with rtnl(netns_path) as ipr:
        chosen: dict[int, tuple[Any, str]] = {}
        for link in ipr.get_links():
            kind = _kind(link)
            name = link.get("IFLA_IFNAME")
            alias = link.get("IFLA_IFALIAS") or ""
            if name == "lo" or kind not in MIRRORED_KINDS or alias.startswith(OWN_TAP_ALIAS):
                continue
            chosen[link["index"]] = (link, str(kind))
        names = {index: str(link.get("IFLA_IFNAME")) for index, (link, _) in chosen.items()}
        routes = _routes(ipr, names)
        neighbours = _neighbours(ipr, names)
        return [
            Endpoint(
                name=names[index],
                index=index,
                kind=kind,
                mac=str(link.get("IFLA_ADDRESS")),
                mtu=int(link.get("IFLA_MTU")),
                up=bool(link["flags"] & IFF_UP),
                addresses=_addresses(ipr, index),
                routes=tuple(routes.get(index, ())),
                neighbours=tuple(neighbours.get(index, ())),
            )
            for index, (link, kind) in sorted(chosen.items())
        ]
