"""A small bounded thread pool, and threads of their own for calls that wait without bound.

concurrent.futures is avoided because importing it is slow in the guest.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class WorkerPool:
    """Runs tasks on at most max_workers daemon threads, started on demand and kept for reuse.

    Tasks beyond max_workers wait in FIFO order. A task must not raise (exceptions end only that task).
    """

    def __init__(self, max_workers: int, name: str = "ttrpc-worker") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max = max_workers
        self._name = name
        self._tasks: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._threads = 0
        self._idle = 0
        self._stopped = False

    def submit(self, task: Callable[[], None]) -> bool:
        """Queue a task; False when the pool is shut down."""
        with self._cond:
            if self._stopped:
                return False
            self._tasks.append(task)
            # Start a thread only when the idle ones cannot take every queued task.
            if self._idle >= len(self._tasks):
                self._cond.notify()
                return True
            if self._threads < self._max:
                self._threads += 1
                n = self._threads
            else:
                return True
        threading.Thread(target=self._run, name=f"{self._name}-{n}", daemon=True).start()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._stopped:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                if not self._tasks:
                    self._threads -= 1
                    return
                task = self._tasks.popleft()
            try:
                task()
            except BaseException:  # noqa: BLE001 - a failing task must not shrink the pool
                pass

    def shutdown(self) -> None:
        """Refuse new tasks; idle threads exit, running and queued tasks still finish."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


# A long-poll handler only waits (on an Event, a read, a lock): far less stack than the 8 MiB a thread
# gets by default, which adds up over hundreds of streams in a small guest. 512 KiB is still deep
# enough for anything the process may run, since a thread started elsewhere in the same instant gets it too.
SMALL_STACK = 512 * 1024
_stack_lock = threading.Lock()


def start_thread(task: Callable[[], None], name: str) -> None:
    """Run ``task`` on a new daemon thread with a SMALL_STACK stack.

    threading.stack_size() is process-wide and read when a thread starts: it is set around our own
    start only, under a lock, and put back at once.
    """
    with _stack_lock:
        try:
            old = threading.stack_size(SMALL_STACK)
        except (ValueError, RuntimeError):  # a platform without the setting: the default stack
            old = None
        try:
            threading.Thread(target=task, name=name, daemon=True).start()
        finally:
            if old is not None:
                threading.stack_size(old)
