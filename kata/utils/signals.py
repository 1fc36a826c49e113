"""Signal names and numbers as runc's command line understands them (`kill ID [SIGNAL]`).

runc 1.1 (kill.go parseSignal) takes a decimal number as is, else upper-cases the name, adds a missing
"SIG" prefix and looks it up in golang.org/x/sys/unix's table for Linux. That table has only the 31
classic signals (no SIGRTMIN+n, no aliases such as SIGIOT or SIGPOLL), so neither do we.
"""

from __future__ import annotations

import json
import re

# (number, name, description): golang.org/x/sys/unix signalList for linux/amd64. The description is
# what Go prints for a process killed by that signal ("signal: killed"), which runc's hook errors show.
_SIGNALS: tuple[tuple[int, str, str], ...] = (
    (1, "SIGHUP", "hangup"),
    (2, "SIGINT", "interrupt"),
    (3, "SIGQUIT", "quit"),
    (4, "SIGILL", "illegal instruction"),
    (5, "SIGTRAP", "trace/breakpoint trap"),
    (6, "SIGABRT", "aborted"),
    (7, "SIGBUS", "bus error"),
    (8, "SIGFPE", "floating point exception"),
    (9, "SIGKILL", "killed"),
    (10, "SIGUSR1", "user defined signal 1"),
    (11, "SIGSEGV", "segmentation fault"),
    (12, "SIGUSR2", "user defined signal 2"),
    (13, "SIGPIPE", "broken pipe"),
    (14, "SIGALRM", "alarm clock"),
    (15, "SIGTERM", "terminated"),
    (16, "SIGSTKFLT", "stack fault"),
    (17, "SIGCHLD", "child exited"),
    (18, "SIGCONT", "continued"),
    (19, "SIGSTOP", "stopped (signal)"),
    (20, "SIGTSTP", "stopped"),
    (21, "SIGTTIN", "stopped (tty input)"),
    (22, "SIGTTOU", "stopped (tty output)"),
    (23, "SIGURG", "urgent I/O condition"),
    (24, "SIGXCPU", "CPU time limit exceeded"),
    (25, "SIGXFSZ", "file size limit exceeded"),
    (26, "SIGVTALRM", "virtual timer expired"),
    (27, "SIGPROF", "profiling timer expired"),
    (28, "SIGWINCH", "window changed"),
    (29, "SIGIO", "I/O possible"),
    (30, "SIGPWR", "power failure"),
    (31, "SIGSYS", "bad system call"),
)

SIGNAL_NUMBERS: dict[str, int] = {name: num for num, name, _ in _SIGNALS}
_DESCRIPTIONS: dict[int, str] = {num: desc for num, _, desc in _SIGNALS}

# Go's strconv.Atoi: optional sign, ASCII decimal digits only (no spaces, no underscores).
_ATOI = re.compile(r"[+-]?[0-9]+", re.ASCII)

# The kernel's last real-time signal: a bigger number can never be delivered.
SIGRTMAX = 64


def go_quote(s: str) -> str:
    """Go's %q for the strings users type (close enough: JSON escaping, non-ASCII kept)."""
    return json.dumps(s, ensure_ascii=False)


def parse_signal(raw: str) -> int:
    """The signal number for "9", "KILL", "SIGKILL" or "sigkill"; ValueError in runc's words if unknown.

    runc passes any integer through and lets kill(2) refuse it later; we refuse numbers outside
    0..64 here, with the same message as an unknown name, since nothing could deliver them anyway.
    """
    if _ATOI.fullmatch(raw):
        num = int(raw)
        if 0 <= num <= SIGRTMAX:
            return num
        raise ValueError(f"unknown signal {go_quote(raw)}")
    name = raw.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return SIGNAL_NUMBERS[name]
    except KeyError:
        raise ValueError(f"unknown signal {go_quote(raw)}") from None


def describe_signal(num: int) -> str:
    """Go's syscall.Signal.String(): "killed" for 9, "terminated" for 15, "signal 40" otherwise."""
    return _DESCRIPTIONS.get(num, f"signal {num}")
