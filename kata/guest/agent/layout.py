"""Fixed address layout for the agent's helpers under TCG; containers keep their randomised one.

QEMU's TCG keeps a translated block for one virtual address, so a process whose libraries load at
new random addresses is translated all over again. crun is a new process for every create, start,
exec, kill and delete: `crun --version` took 33 ms in a guest with randomised addresses and 8 ms
without. Under TCG the host asks for a fixed layout (PARAM=off on the kernel command line): the
agent turns randomisation off for itself, which every process it starts inherits, and each
container's spec asks crun for the default personality, which turns it back on for the container's
own processes (crun sets linux.personality in the container's init and in each exec before it
execs the container's program).
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
    if value < 0:
        raise OSError(ctypes.get_errno(), "personality")
    return value


def fix_helper_layout() -> None:
    """Processes this one starts from now on load at fixed addresses."""
    _personality(ctypes.c_ulong(_personality(_QUERY) | ADDR_NO_RANDOMIZE))


def helpers_fixed() -> bool:
    return bool(_personality(_QUERY) & ADDR_NO_RANDOMIZE)


def keep_container_randomised(spec: dict[str, Any], fixed: bool) -> bool:
    """With ``fixed`` helpers, give a spec that names no personality the default one (in place);
    True when the spec changed. A spec's own personality is left as it is: crun sets it whatever
    it is, which clears the inherited flag too."""
    if not fixed:
        return False
    linux = spec.setdefault("linux", {})
    if not isinstance(linux, dict) or "personality" in linux:
        return False
    linux["personality"] = {"domain": "LINUX"}
    return True
