"""The life of a container and of each of its processes, as both front ends report it: one status
type, one transition table, and one rule for exit statuses.

runc's words (created, running, paused, stopped, and creating while `create` runs) are containerd's
too, so both front ends map these directly onto their own protocol.
"""

from __future__ import annotations

import enum

from kata.errors import KataError


class Status(enum.StrEnum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


# Where each status may go. A paused container resumes to the status it was paused from (runc
# pauses a created container as well as a running one); anything may stop (a VM that dies ends all).
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CREATING: frozenset({Status.CREATED, Status.STOPPED}),
    Status.CREATED: frozenset({Status.RUNNING, Status.PAUSED, Status.STOPPED}),
    Status.RUNNING: frozenset({Status.PAUSED, Status.STOPPED}),
    Status.PAUSED: frozenset({Status.RUNNING, Status.CREATED, Status.STOPPED}),
    Status.STOPPED: frozenset(),
}
# What is alive in the guest: it may be signalled, and must be stopped before it is deleted.
LIVE = frozenset({Status.RUNNING, Status.PAUSED})


class TransitionError(KataError):
    """A process cannot go from its status to the one asked for; the front end words it its way."""

    def __init__(self, current: Status, wanted: Status) -> None:
        super().__init__(f"cannot go from {current} to {wanted}")
        self.current = current
        self.wanted = wanted


def transition(current: Status, wanted: Status) -> Status:
    """``wanted``, if the table allows it from ``current``; else TransitionError."""
    if wanted not in TRANSITIONS[current]:
        raise TransitionError(current, wanted)
    return wanted


# What a process's exit reads when its VM (or the connection to its agent) is gone: Kata's choice.
VM_GONE_STATUS = 255


def exit_status(status: int) -> int:
    """A process's exit status for the host: the guest's 0..255 (128+N for a death by signal N),
    and VM_GONE_STATUS for anything that is no status (a negative one: unknown)."""
    return status & 0xFF if status >= 0 else VM_GONE_STATUS
