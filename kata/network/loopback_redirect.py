"""Send every TCP connection made to a network namespace's loopback to one local port (nftables).

The CRI's port-forward dials ``localhost:PORT`` inside a pod's network namespace, where nothing
listens when the pod runs in a VM. One nat rule per family, in that namespace only, redirects each
such connection to the forwarder's port; the forwarder learns the port that was dialled from the
connection's original destination (SO_ORIGINAL_DST). The table lives in the namespace, so it ends
with it; remove() takes it away sooner. Both run in the calling thread's network namespace.
"""

from __future__ import annotations

import shutil
import subprocess

from kata.errors import KataError
from kata.utils.text import one_line

TABLE = "kata_portforward"  # in family inet: one table for both IPv4 and IPv6
_NFT_TIMEOUT = 10.0


class RedirectError(KataError):
    pass


def ruleset(port4: int, port6: int | None) -> str:
    """The table, for ``nft -f``: TCP to 127.0.0.1 (and to ::1 when ``port6``) leaving through
    loopback goes to the forwarder's port instead. Creating it first makes loading it again (after a
    failure halfway) replace what was there rather than add to it."""
    for port in (port4, port6):
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
    rules = [f'oif "lo" ip daddr 127.0.0.1 meta l4proto tcp redirect to :{port4}']
    if port6 is not None:
        rules.append(f'oif "lo" ip6 daddr ::1 meta l4proto tcp redirect to :{port6}')
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return (f"table inet {TABLE} {{}}\n"
            f"delete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            "\tchain output {\n"
            "\t\ttype nat hook output priority -100; policy accept;\n"
            f"{body}"
            "\t}\n"
            "}\n")


def nft() -> str | None:
    """The nft command (Debian's nftables), or None where it is not installed."""
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


def install(port4: int, port6: int | None) -> None:
    _run(["-f", "-"], ruleset(port4, port6))


def remove() -> None:
    """The table goes; a namespace without it is no error."""
    _run(["delete", "table", "inet", TABLE], None, missing_ok=True)


def _run(args: list[str], script: str | None, missing_ok: bool = False) -> None:
    command = nft()
    if command is None:
        raise RedirectError("nft is not installed (Debian's nftables package)")
    try:
        proc = subprocess.run([command, *args], input=script, capture_output=True, text=True,
                              timeout=_NFT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedirectError(f"nft {args[0]}: {one_line(exc)}") from None
    if proc.returncode != 0 and not (missing_ok and "No such file or directory" in proc.stderr):
        why = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise RedirectError(f"nft {' '.join(args[:2])}: {one_line(why)}")
