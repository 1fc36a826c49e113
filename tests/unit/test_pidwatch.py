"""kata.utils.pidwatch: told when a watched process ends, unless the watch was stopped first."""

from __future__ import annotations

import subprocess
import threading

from kata.utils import pidwatch


def _sleeper() -> tuple[subprocess.Popen[bytes], tuple[int, int]]:
    proc = subprocess.Popen(["sleep", "30"])
    start = pidwatch.start_time(proc.pid)
    assert start is not None
    return proc, (proc.pid, start)


def test_the_end_of_a_watched_process_is_reported() -> None:
    proc, ident = _sleeper()
    ended = threading.Event()
    thread = pidwatch.watch([ident], ended.set, threading.Event())
    assert thread is not None
    proc.kill()
    proc.wait()
    assert ended.wait(10)


def test_a_stopped_watch_is_not_told_of_an_end_its_owner_caused() -> None:
    # A pod's teardown stops its watch, then stops the VMM: the VMM's end is no failure to report.
    proc, ident = _sleeper()
    ended = threading.Event()
    stop = threading.Event()
    thread = pidwatch.watch([ident], ended.set, stop)
    assert thread is not None
    stop.set()
    proc.kill()
    proc.wait()
    thread.join(10)
    assert not thread.is_alive()
    assert not ended.is_set()


def test_a_process_already_gone_is_reported_at_once() -> None:
    proc, ident = _sleeper()
    proc.kill()
    proc.wait()
    ended = threading.Event()
    pidwatch.watch([ident], ended.set)
    assert ended.wait(10)
