"""The rule for container, sandbox, task and exec ids, shared by the host and the guest agent.

Ids name directories and files (and, for a sandbox, parts of unix socket paths), so an id is checked
before any path is built from it. The rule is runc's (`^[\\w+-\\.]+$`, Go's ``\\w`` being ASCII
``[0-9A-Za-z_]``; not "." or ".."), with two deliberate differences:

- no comma: in Go's class ``+-\\.`` is a range that also admits ",", but QEMU and virtiofsd read a
  comma in an option value (``-chardev socket,path=/run/vc/vm/ID/...``) as the next option; no real
  client uses one (containerd's identifiers, Docker's, podman's and the CRI's ids never have one);
- a length cap: an id becomes a file name with our prefixes and suffixes around it, and messages
  quote it; containerd's ids have at most 76 characters, Docker's, podman's and the CRI's 64.

This module imports nothing: the guest agent uses it, and pays for every import at boot.
"""

from __future__ import annotations

ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_+-.")
MAX_ID_LENGTH = 128
# How much of a rejected id a message shows: enough to recognise it, never a screenful.
_SHOWN = 80


def id_problem(id_: str, max_length: int = MAX_ID_LENGTH) -> str | None:
    """Why ``id_`` cannot be an id (a one-line message), or None when it can."""
    if not id_:
        return "container id cannot be empty"  # runc's words
    if len(id_) > max_length:
        return f"invalid id format: {shown(id_)}: longer than {max_length} characters"
    if id_ in (".", "..") or not ID_CHARS.issuperset(id_):
        return f"invalid id format: {shown(id_)}"
    return None


def shown(text: str, limit: int = _SHOWN) -> str:
    """``text`` fit for a one-line message: anything outside printable ASCII escaped (a newline, or a
    character some terminals or ``str.splitlines`` take for one, must not start a second line), and
    cut after ``limit`` characters."""
    cut = text[:limit]
    if not all(" " <= c <= "~" for c in cut):
        cut = cut.encode("ascii", "backslashreplace").decode("ascii")
        cut = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in cut)
    return cut + ("..." if len(text) > limit else "")
