"""What `kata-runtime` answers before its command line parser, logging and state store load.

containerd's runc shim runs `kata-runtime delete --force ID` after every container, once the shim
has exited (its cleanup), and waits for it: on the critical path of every `docker run`. When there
is nothing left of the container it has nothing to do, and loading the rest cost it 35 ms of its
55. Anything this does not recognise goes to the full command line, which says what is wrong. (The
--log file is not opened: there is nothing to write in it.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

DEFAULT_ROOT = "/run/kata-runtime"
# Global options that take a value (as a separate word), and those that take none.
VALUED_OPTIONS = frozenset({"--root", "--log", "--log-format", "--config", "--kata-config", "--criu"})
FLAG_OPTIONS = frozenset({"--debug", "--systemd-cgroup"})


def nothing_to_delete(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is `[global options] delete --force ID` for a valid ID of which nothing is
    left: no directory under the root (not even a half-made one), no sandbox state."""
    root = DEFAULT_ROOT
    words = list(argv)
    while words and words[0].startswith("-"):
        option = words.pop(0)
        if option in VALUED_OPTIONS and words and not words[0].startswith("-"):
            value = words.pop(0)
            if option == "--root":
                root = value
            elif option == "--log-format" and value not in ("text", "json"):
                return False
        elif option not in FLAG_OPTIONS:
            return False
    if len(words) != 3 or words[0] != "delete" or words[1] not in ("--force", "-f"):
        return False
    if words[2].startswith("-"):  # an option where the id goes: the parser's to refuse
        return False
    from kata.errors import KataError
    from kata.sandbox.paths import has_state, validate_sandbox_id

    cid = words[2]
    try:
        validate_sandbox_id(cid)  # the store's rule too (a sandbox's is the stricter)
        return _absent(os.path.join(root, cid)) and not has_state(cid)
    except (KataError, OSError):  # the full command line says what is wrong
        return False


def _absent(path: str) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    return False
