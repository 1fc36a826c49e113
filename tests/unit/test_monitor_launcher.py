"""A detached monitor never exits before the command that started it (containerd 1.6's runc shim
drops an exit it reaps before it has read the pid file that command writes)."""

from __future__ import annotations

import socket
import threading
import time

from kata.runc.monitor import LauncherWatch


def test_outlive_waits_for_the_launcher_to_exit_and_then_the_grace() -> None:
    ours, launcher = socket.socketpair()
    watch = LauncherWatch(ours)
    closed_at: list[float] = []

    def launcher_exits() -> None:
        time.sleep(0.3)
        closed_at.append(time.monotonic())
        launcher.close()

    threading.Thread(target=launcher_exits).start()
    watch.outlive(0.2)
    assert closed_at and time.monotonic() >= closed_at[0] + 0.2


def test_a_launcher_gone_long_ago_costs_no_more_than_the_grace() -> None:
    ours, launcher = socket.socketpair()
    watch = LauncherWatch(ours)
    launcher.close()
    t0 = time.monotonic()
    watch.outlive(0.0)
    # Bounded by the grace (none), not by LauncherWatch's timeout.
    assert time.monotonic() - t0 < 5.0
    assert ours.fileno() == -1  # closed: nothing of it outlives the monitor's exit
