"""The agent's wait after `crun start`: until the workload has a signal handler, sleeps, or is gone."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kata.guest.agent.settle import exe_of, settled, wait_settled


@contextmanager
def running(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_sleeping_program_is_settled_but_not_while_it_is_still_the_launcher() -> None:
    with running("sleep", "30") as p:
        assert wait_settled(p.pid, "/usr/bin/crun", limit=5) < 5
        assert settled(p.pid, "/usr/bin/crun")
        # Still the program that was there before the start (crun's init): not yet exec'd.
        assert not settled(p.pid, str(exe_of(p.pid)))


def test_a_busy_program_without_handlers_is_waited_for_at_most_the_limit() -> None:
    yes = shutil.which("yes")
    assert yes
    with running(yes) as p:
        assert not settled(p.pid, "/usr/bin/crun")
        assert 0.2 <= wait_settled(p.pid, "/usr/bin/crun", limit=0.2) < 2


def test_a_program_with_a_sigterm_handler_is_settled_while_busy_but_not_one_for_another_signal() -> None:
    # bash traps TERM, then spins without sleeping: its handler is what makes it ready.
    with running("bash", "-c", "trap 'exit 0' TERM; while :; do :; done") as p:
        assert wait_settled(p.pid, "/usr/bin/crun", limit=5) < 5
    spin = "import signal; signal.signal(signal.SIGUSR1, print)\nwhile True: pass"
    with running("python3", "-c", spin) as p:
        time.sleep(1)  # past its start-up, which may sleep on I/O
        assert not settled(p.pid, "/usr/bin/crun")


def test_a_process_that_is_gone_is_settled() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert settled(p.pid, "/usr/bin/crun")
