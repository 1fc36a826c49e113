"""Fixed address layout for the agent's helpers under TCG; containers keep their randomised one.

QEMU's TCG keeps a translated block for one virtual address, so a process whose libraries load at
new random addresses is translated all over again. crun is a new process for every create, start,
exec and delete: `crun --version` took 33 ms in a guest with randomised addresses and 8 ms without.
Under TCG the host asks for a fixed layout (PARAM=off on the kernel command line): the agent turns
randomisation off for itself, which every process it starts inherits, and each container's spec
asks crun for a personality, which turns it back on for the container's own processes (crun sets
linux.personality in the container's init and in each exec before it execs the container's
program).
"""

from __future__ import annotations

import ctypes
from typing import Any

from kata.protocols.agent_api import HELPER_ASLR_PARAM

PARAM = HELPER_ASLR_PARAM

ADDR_NO_RANDOMIZE = 0x0040000
_QUERY = ctypes.c_ulong(0xFFFFFFFF)  # personality(0xffffffff) reads without changing


def _personality(persona: ctypes.c_ulong) -> int:
    from kata.utils.mount import libc

    value = int(libc.personality(persona))
    if value == -1:  # documented, though current kernels accept any value
        raise OSError(ctypes.get_errno(), "personality")
    return value


def fix_helper_layout() -> None:
    """Processes this one starts from now on load at fixed addresses. A personality is a thread's:
    the agent calls this before it starts any thread."""
    _personality(ctypes.c_ulong(_personality(_QUERY) | ADDR_NO_RANDOMIZE))


def helpers_fixed() -> bool:
    return bool(_personality(_QUERY) & ADDR_NO_RANDOMIZE)


def keep_container_randomised(spec: dict[str, Any]) -> None:
    """Make sure crun sets a personality for the container (in place), which clears the flag its
    processes would inherit from the agent. A spec's own personality with a domain stays as it is
    (crun sets it, whatever its flags); anything else that crun would skip (none, null, not an
    object, no domain) becomes the default one."""
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        linux = spec["linux"] = {}
    own = linux.get("personality")
    if not (isinstance(own, dict) and isinstance(own.get("domain"), str)):
        linux["personality"] = {"domain": "LINUX"}
