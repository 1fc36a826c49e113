"""kata.utils.pidwatch: told when a watched process ends, unless the watch was stopped first."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading
import time

import pytest

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


def test_kill_all_returns_once_the_processes_have_ended() -> None:
    # The process takes a moment to go after the signal (as a killed QEMU does): kill_all waits.
    script = "trap 'sleep 0.3; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    start = pidwatch.start_time(proc.pid)
    assert start is not None
    pidwatch.kill_all([(proc.pid, start)], signal.SIGTERM)
    assert pidwatch.start_time(proc.pid) is None  # a zombie now: ended, not yet reaped
    proc.wait()


def test_kill_all_gives_up_after_its_timeout_and_spares_a_reused_pid() -> None:
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; echo ready; sleep 30"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    try:
        start = pidwatch.start_time(proc.pid)
        assert start is not None
        began = time.monotonic()
        pidwatch.kill_all([(proc.pid, start)], signal.SIGTERM, timeout=0.3)
        assert 0.25 < time.monotonic() - began < 5
        pidwatch.kill_all([(proc.pid, start + 1)], signal.SIGKILL)  # another start time: not ours
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


# The leader thread leaves at once (the raw exit system call, 60 on x86_64, ends only the calling
# thread), the other thread a second later: the leader shows as a zombie all the while, as the leader
# of a killed QEMU does while its other threads exit.
_LEADER_FIRST = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(1.0,)).start()
print("ready", flush=True)
ctypes.CDLL(None).syscall(60, 0)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the exit system call's number is x86_64's")
def test_an_end_is_the_last_threads_not_the_leaders() -> None:
    from kata.utils.process import ProcessId, wait_exit

    proc = subprocess.Popen([sys.executable, "-c", _LEADER_FIRST], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        ident = ProcessId.of(proc.pid)
        assert ident is not None
        began = time.monotonic()
        while pidwatch.start_time(proc.pid) is not None:  # the leader's gone: a zombie
            assert time.monotonic() - began < 5
            time.sleep(0.01)
        assert wait_exit(ident, 10)
        assert time.monotonic() - began > 0.5  # it waited for the other thread
        assert not os.path.exists(f"/proc/{proc.pid}")  # and reaped it (our child)
    finally:
        proc.kill()
        proc.wait()


def test_a_zombie_is_not_reaped_until_its_parent_waits() -> None:
    # An init monitor waits for its exec monitors to be reaped: then containerd's runc shim has seen
    # their exits before its own (kata.runc.monitor.Monitor.stop_proxy).
    proc = subprocess.Popen(["true"])
    fd = os.pidfd_open(proc.pid)
    try:
        assert pidwatch.wait_ended([fd], 10)
        assert not pidwatch.reaped(fd)  # a zombie: its parent (us) has not waited
        assert not pidwatch.wait_reaped([fd], 0.05)
        reaper = threading.Timer(0.2, proc.wait)
        reaper.start()
        started = time.monotonic()
        assert pidwatch.wait_reaped([fd], 10)
        assert time.monotonic() - started >= 0.15
        assert pidwatch.reaped(fd)
    finally:
        os.close(fd)
