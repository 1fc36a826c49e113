"""Text from elsewhere (a peer's error, a guest's listing, an exception) made fit for one line of a
message or a log: nothing in it can end the line, move the cursor or forge what follows.

Imports nothing: the guest agent loads this with kata.ttrpc, and every layer may use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading

# The longest message a peer may put in front of a user (or a log) through us.
MESSAGE_LIMIT = 512
_MORE = "..."


def printable(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` with each non-printable character escaped as Python writes it (\\n, \\x1b, \\u202e:
    newlines, control and bidi characters, lone surrogates) and cut to at most ``limit`` characters.

    Idempotent, so text that passes through several hops (guest, monitor proxy, CLI) is escaped once.
    """
    if len(text) <= limit and text.isprintable():
        return text
    # Only the first `limit` characters can show; escaping each makes it at most 10 long.
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    if len(text) <= limit and len(escaped) <= limit:
        return escaped
    return escaped[: limit - len(_MORE)] + _MORE


def one_line(what: str | BaseException) -> str:
    """Text, or an exception's message, as one printable line for the user: its first line (an
    exception without a message reads as its type's name), escaped and bounded as printable() does."""
    lines = str(what).splitlines()
    if lines and lines[0].strip():
        return printable(lines[0])
    return type(what).__name__ if isinstance(what, BaseException) else ""


def thread_failure(args: threading.ExceptHookArgs) -> str | None:
    """What a threading.excepthook reports, as one line ("name: message"); None for a SystemExit."""
    if args.exc_type is SystemExit:
        return None
    name = args.thread.name if args.thread is not None else "a thread"
    return f"{name}: {one_line(args.exc_value) if args.exc_value is not None else args.exc_type.__name__}"


def logfmt_value(text: str, limit: int = 4096) -> str:
    """``text`` for a logfmt ``key="value"`` (logrus's text format): quotes and backslashes escaped,
    then everything printable() escapes, so that a value never ends its line or its quotes early."""
    return printable(text.replace("\\", "\\\\").replace('"', '\\"'), limit)
