"""Container records under --root: claiming ids, status from the monitor's life, locking, listing."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kata.hypervisor.daemon import ProcessId
from kata.runtime.records import ContainerExists, ContainerNotFound, ContainerRecord, ContainerStore


def record(cid: str, pid: int = 0, start: int = 0, status: str = "created") -> ContainerRecord:
    return ContainerRecord(id=cid, bundle="/b", rootfs="/b/rootfs", created="2026-01-01T00:00:00Z",
                           config="/etc/kata.toml", status=status, pid=pid, pid_start=start)


def test_an_id_is_claimed_once(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path / "root")
    store.reserve("c1")
    with pytest.raises(ContainerExists, match="container with id exists: c1"):
        store.reserve("c1")


def test_status_follows_the_monitor(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        ident = ProcessId.of(sleeper.pid)
        assert ident is not None
        store.reserve("c1")
        store.save(record("c1", ident.pid, ident.start_time, "running"))
        rec = store.load("c1")
        assert rec.current_status() == "running" and rec.oci_state()["pid"] == sleeper.pid
        # The same pid with another start time is another process: the container has stopped.
        assert record("c1", ident.pid, ident.start_time + 1, "running").current_status() == "stopped"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert rec.current_status() == "stopped" and rec.oci_state()["pid"] == 0
    assert [r.id for r in store.list()] == ["c1"]


def test_a_waiting_command_sees_the_delete_that_went_first(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path)
    store.reserve("c1")
    store.save(record("c1"))
    seen: list[str] = []

    def second() -> None:
        try:
            with store.locked("c1"):
                seen.append("found")
        except ContainerNotFound as exc:
            seen.append(str(exc))

    with store.locked("c1"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)  # the second command now waits for the lock
        assert seen == []
        store.remove("c1")
    t.join(5)
    assert seen == ["container c1 does not exist"]
    with pytest.raises(ContainerNotFound):
        store.load("c1")
    assert not os.path.exists(tmp_path / "c1")
