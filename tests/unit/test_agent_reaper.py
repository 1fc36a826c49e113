"""The reaper's registration logic, and stdio plumbing on a plain subprocess spawned through it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from kata.guest.agent.reaper import Reaper, exit_code


def test_exit_code_of_signal_deaths() -> None:
    assert exit_code(7 << 8) == 7
    assert exit_code(signal.SIGKILL) == 128 + 9


def test_exit_before_registration_is_kept() -> None:
    r = Reaper()
    r._deliver(4242, 3)  # e.g. a container init that died before its --pid-file was read
    fut = r.register(4242)
    assert fut.done() and fut.wait(0) == 3


def test_registration_before_exit() -> None:
    r = Reaper()
    fut = r.register(4243)
    assert r.register(4243) is fut  # one future per pid
    assert fut.wait(0) is None
    r._deliver(4243, 0)
    assert fut.wait(0) == 0


def test_unclaimed_exits_are_bounded() -> None:
    r = Reaper()
    for pid in range(10000, 20000):
        r._deliver(pid, 0)
    assert len(r._unclaimed) <= 4096
    assert not r.register(10000).done()  # the oldest were dropped


def _run_isolated(code: str) -> None:
    """Run code in a fresh interpreter: a running reaper calls waitpid(-1) and would steal the
    children of anything else in the pytest process."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_spawn_through_reaper_with_pipes() -> None:
    _run_isolated("""
        import os, shutil
        from kata.guest.agent.reaper import Reaper
        from kata.guest.agent.stdio import Stdio, EndOfStream
        r = Reaper(); r.start()
        io = Stdio.pipes()
        cat = shutil.which("cat")
        fut = r.spawn([cat], stdin=io.child_fds()[0], stdout=io.child_fds()[1], stderr=io.child_fds()[2])
        io.close_child_fds()
        io.write_stdin(b"ping")
        io.close_stdin()
        out = b""
        try:
            while True:
                out += io.read_stdout(100)
        except EndOfStream:
            pass
        assert out == b"ping", out
        assert fut.wait(10) == 0
        sh = shutil.which("sh")
        null = os.open("/dev/null", os.O_RDWR)
        assert r.spawn([sh, "-c", "exit 7"], stdin=null, stdout=null, stderr=null).wait(10) == 7
        assert r.spawn([sh, "-c", "kill -TERM $$"], stdin=null, stdout=null, stderr=null).wait(10) == 143
    """)


def test_orphan_reparented_to_subreaper_is_collected() -> None:
    # The agent is PID 1; here a subreaper stands in, so an orphan (like a container init whose crun
    # parent exited) comes back to us and can be registered by its pid afterwards.
    _run_isolated("""
        import ctypes, os, shutil
        from kata.guest.agent.reaper import Reaper
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        r = Reaper(); r.start()
        sh = shutil.which("sh")
        rd, wr = os.pipe()
        null = os.open("/dev/null", os.O_RDWR)
        parent = r.spawn([sh, "-c", "sleep 0.3 & echo $!; exit 0"], stdin=null, stdout=wr, stderr=null)
        os.close(wr)
        orphan = int(os.read(rd, 100))
        assert parent.wait(10) == 0
        assert r.register(orphan).wait(10) == 0
    """)
