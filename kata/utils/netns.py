"""Network namespaces for the calling thread: join one by path, or make a new one.

The VMM and the container's monitor run in the container's network namespace, as Kata's do: a
prestart hook (Docker's libnetwork-setkey) finds it through the monitor's pid, and the network
mirroring later finds the endpoints to mirror there. Python 3.11 has no os.setns/os.unshare.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from kata.errors import KataError
from kata.utils import nsfiles
from kata.utils.mount import MS_BIND, MountError, libc, mount, unmount

CLONE_NEWNET = 0x40000000
# Where `ip netns` keeps its named namespaces.
RUN_DIR = "/run/netns"
T = TypeVar("T")


class NetnsError(KataError):
    pass


def path_of(ns: str) -> str:
    """A namespace as pods name it: a path, or a name under RUN_DIR."""
    return ns if "/" in ns else os.path.join(RUN_DIR, ns)


def in_netns(ns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in network namespace `ns` (a name under RUN_DIR, a path such as /proc/PID/ns/net,
    or None: this thread's). A namespace that is gone, or goes before it is joined, is
    FileNotFoundError."""
    if ns is None:
        return fn()
    path = path_of(ns)
    try:
        if os.path.exists(path):
            return call_in(path, fn)
    except NetnsError:
        if os.path.exists(path):
            raise
    raise FileNotFoundError(f"network namespace {ns} does not exist")


def delete_link(ns: str | None, name: str) -> None:
    """Delete link ``name`` in namespace ``ns`` (a name or path; None: this thread's), with our own
    rtnetlink request; nothing to do when it, or the namespace, is gone."""
    from kata.utils.rtnetlink import Rtnl

    def delete() -> None:
        with Rtnl() as r:
            r.delete_link(name)

    try:
        in_netns(ns, delete)
    except FileNotFoundError:
        pass


def is_ours(path: str) -> bool:
    """Whether ``path`` is the network namespace we run in (how Docker's --net=host names the
    host's). NamespacePathError when it names no network namespace: found before anything tries to
    join it."""
    return nsfiles.identify("network", path) == os.stat("/proc/self/ns/net").st_ino


def enter(path: str) -> None:
    """Join the network namespace at ``path`` (a /proc/PID/ns/net or a bind-mounted netns)."""
    try:
        # O_NONBLOCK: a FIFO put at the path must not block us (setns then refuses its fd).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise NetnsError(f"network namespace {path}: {exc.strerror}") from exc
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"joining network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def unshare() -> None:
    """Move the calling thread (and the processes it starts from now on) into a new network namespace."""
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"creating a network namespace: {os.strerror(err)}")


def pin(path: str) -> None:
    """Keep the calling thread's network namespace alive at ``path`` (a bind mount, as `ip netns`
    makes), so that later commands can enter it after the processes in it have gone."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    try:
        mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, None, MS_BIND)
    except MountError as exc:
        os.unlink(path)
        raise NetnsError(f"pinning the network namespace at {path}: {exc.strerror}") from exc


def unpin(path: str) -> None:
    """Undo pin(); the namespace ends once nothing else holds it."""
    unmount(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def call_in(path: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own that joined the network namespace at ``path``, re-raising
    what it raises: setns moves only the calling thread, and the caller's must stay where it is.
    Sockets ``fn`` makes, and processes it starts, belong to that namespace."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            enter(path)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=body, name="in-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
