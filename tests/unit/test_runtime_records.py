"""Container records under --root: claiming ids, status from the monitor's life, locking, listing."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from kata.errors import KataError
from kata.runc.state import ContainerExists, ContainerNotFound, ContainerRecord, ContainerStore
from kata.sandbox.paths import InvalidIdError
from kata.utils.process import ProcessId


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


@pytest.mark.parametrize("cid", ["../x", "..", "a/b", "", "caf\u00e9"])
def test_no_path_is_built_from_an_invalid_id(tmp_path: Path, cid: str) -> None:
    store = ContainerStore(tmp_path / "root")
    for call in (store.dir, store.reserve, store.load, store.remove):
        with pytest.raises(InvalidIdError):
            call(cid)
    with pytest.raises(InvalidIdError), store.locked(cid):
        pass
    assert not (tmp_path / "root").exists()


def _plant(store: ContainerStore, cid: str, data: dict[str, Any]) -> None:
    store.reserve(cid)
    (store.dir(cid) / "state.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change,reason", [
    ({"id": "other"}, "names container other"),
    ({"id": None}, "names container None"),
    ({"pid": "1"}, "field pid has the wrong type"),
    ({"pid": True}, "field pid has the wrong type"),
    ({"annotations": {"a": 1}}, "field annotations has the wrong type"),
    ({"execs": {"e": [1]}}, "field execs has the wrong shape"),
    ({"execs": {"e": ["1", 2]}}, "field execs has the wrong type"),
    ({"execs": {"e1": "x"}}, "field execs has the wrong type"),
    ({"surprise": 1}, "unknown field surprise"),
])
def test_a_record_that_is_not_ours_is_not_trusted(tmp_path: Path, change: dict[str, Any],
                                                  reason: str) -> None:
    store = ContainerStore(tmp_path)
    _plant(store, "c1", {**asdict(record("c1")), **change})
    with pytest.raises(KataError, match=f"container c1: unreadable state: .*{reason}"):
        store.load("c1")
    assert store.list() == []


def test_a_record_missing_a_field_is_not_trusted(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path)
    data = asdict(record("c1"))
    del data["bundle"]
    _plant(store, "c1", data)
    with pytest.raises(KataError, match="field bundle is missing"):
        store.load("c1")
