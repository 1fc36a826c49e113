"""The base of every error whose message is meant for the user.

Each layer defines its own error type (OCIError, ConfigError, HypervisorError, AgentError, ...)
as a subclass, so the CLI prints their one-line message as is and anything else as an internal error.
This module imports nothing, so every layer can use it.
"""

from __future__ import annotations


class KataError(Exception):
    """A failure explained in one line for the user."""


USER_ERRORS: tuple[type[BaseException], ...] = (KataError, TimeoutError)


def strerror(exc: OSError) -> str:
    """An OSError's reason as Go's errors print it, which runc's messages carry: "no such file or
    directory", not "No such file or directory"."""
    reason = exc.strerror or str(exc)
    return reason[:1].lower() + reason[1:]
