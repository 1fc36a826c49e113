"""Sets the sysctls of the pod's namespaces, which in the VM are the guest's own."""

from __future__ import annotations

import os
from collections.abc import Mapping

from kata.guest.agent.sandbox import InvalidArgument
from kata.oci import sysctls

PROC_SYS = "/proc/sys"


def set_sysctls(wanted: Mapping[str, str], proc_sys: str = PROC_SYS) -> None:
    for name, value in wanted.items():
        try:
            sysctls.namespace_of(name)  # the host checked too; the name becomes a path here
        except sysctls.SysctlError as e:
            raise InvalidArgument(str(e)) from None
        path = os.path.join(proc_sys, sysctls.proc_path(name))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"sysctl {name}: the guest kernel has no such sysctl") from None
        try:
            os.write(fd, value.encode())
        except OSError as e:
            raise InvalidArgument(f"sysctl {name}={value}: {e.strerror}") from None
        finally:
            os.close(fd)
