"""Out-of-memory kills in containers, for GetOOMEvent: each container's cgroup v2 `memory.events` is
watched with inotify (the kernel notifies a modification when a counter changes), and every rise of
its `oom_kill` count becomes one event naming the container."""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections import deque

from kata.utils.mount import libc

_IN_MODIFY = 0x2
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


def oom_kills(events_file: str) -> int:
    try:
        with open(events_file) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


class OomWatcher:
    def __init__(self) -> None:
        self._fd = -1
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._watches: dict[int, tuple[str, str, int]] = {}  # wd -> (container, file, kills seen)
        self._events: deque[str] = deque()

    def watch(self, cid: str, cgroup_dir: str) -> None:
        path = os.path.join(cgroup_dir, "memory.events")
        with self._lock:
            if self._fd < 0:
                self._fd = libc.inotify_init1(_IN_CLOEXEC)
                if self._fd < 0:
                    raise OSError(ctypes.get_errno(), "inotify_init1")
                threading.Thread(target=self._read, name="oom", daemon=True).start()
            wd = libc.inotify_add_watch(self._fd, path.encode(), _IN_MODIFY)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self._watches[wd] = (cid, path, oom_kills(path))

    def unwatch(self, cid: str) -> None:
        with self._lock:
            for wd, (owner, _, _) in list(self._watches.items()):
                if owner == cid:
                    del self._watches[wd]
                    libc.inotify_rm_watch(self._fd, wd)

    def next_event(self) -> str:
        """The next container with a new OOM kill; blocks until there is one."""
        with self._ready:
            while not self._events:
                self._ready.wait()
            return self._events.popleft()

    def take(self, cid: str) -> bool:
        """Whether ``cid`` has an OOM kill not yet handed out; it is then not handed out by
        next_event (the caller reports it, with the exit of the container's init)."""
        with self._lock:
            if cid in self._events:
                self._events.remove(cid)
                return True
            for wd, (owner, path, seen) in self._watches.items():
                if owner == cid:
                    kills = oom_kills(path)
                    if kills > seen:
                        self._watches[wd] = (owner, path, kills)
                        return True
            return False

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 4096)
            except OSError:
                return
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size + length
                self._check(wd)

    def _check(self, wd: int) -> None:
        with self._lock:
            entry = self._watches.get(wd)
            if entry is None:
                return
            cid, path, seen = entry
            kills = oom_kills(path)
            if kills <= seen:
                return
            self._watches[wd] = (cid, path, kills)
            self._events.append(cid)
            self._ready.notify()
