"""Container state under `--root`, as runc keeps it: one directory per container, written atomically,
locked per container so that racing commands (containerd runs `delete` and `delete --force` from two
processes) each see a whole state and act once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from kata.errors import KataError, strerror
from kata.sandbox.paths import validate_id
from kata.sandbox.status import Status
from kata.utils.files import read_json, write_json
from kata.utils.ids import shown
from kata.utils.process import ProcessId
from kata.utils.safepath import remove_tree


class ContainerNotFound(KataError):
    """runc's wording, which containerd matches on."""

    def __init__(self, cid: str) -> None:
        super().__init__(f"container {cid} does not exist")


class ContainerExists(KataError):
    def __init__(self, cid: str) -> None:
        super().__init__(f"container with id exists: {cid}")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ContainerRecord:
    id: str
    bundle: str
    rootfs: str
    created: str
    config: str  # the configuration.toml in effect, so later commands use the same one
    annotations: dict[str, str] = field(default_factory=dict)
    status: str = Status.CREATED  # as last set: created, running or paused; "stopped" is derived
    pid: int = 0  # the monitor standing for the container's process
    pid_start: int = 0
    owner: str = ""
    execs: dict[str, list[int]] = field(default_factory=dict)  # exec id -> [pid, start time]
    paused_from: str = ""  # the status resume returns to (created or running)
    sandbox: str = ""  # the container whose VM this one joined (a pod's member), "" for its own VM
    pooled_tap: str = ""  # the tap of the NIC a pooled VM came with, in the container's namespace

    def sandbox_id(self) -> str:
        """The sandbox (VM) the container lives in: its own, or the one of the pod it joined."""
        return self.sandbox or self.id

    def monitor(self) -> ProcessId | None:
        return ProcessId(self.pid, self.pid_start) if self.pid else None

    def current_status(self) -> Status:
        """The status runc would report: a container whose process is gone is stopped."""
        mon = self.monitor()
        if self.status == Status.CREATING:
            return Status.CREATING
        if mon is None or not mon.is_alive():
            return Status.STOPPED
        return Status(self.status)

    def live_execs(self) -> dict[str, ProcessId]:
        found = {}
        for exec_id, (pid, start) in self.execs.items():
            proc = ProcessId(pid, start)
            if proc.is_alive():
                found[exec_id] = proc
        return found

    def oci_state(self) -> dict[str, Any]:
        """The state document hooks read on stdin and `state` prints (runc's field names)."""
        status = self.current_status()
        return {"ociVersion": "1.0.2", "id": self.id, "status": str(status),
                "pid": self.pid if status is not Status.STOPPED else 0, "bundle": self.bundle,
                "annotations": self.annotations}


@cache
def _field_types() -> dict[str, Any]:
    return get_type_hints(ContainerRecord)


def _conforms(value: Any, tp: Any) -> bool:
    """Whether JSON-decoded ``value`` has type ``tp`` (str, int, bool, list[...], dict[str, ...])."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1])
                                               for k, v in value.items())
    if tp is int:  # a JSON true is no pid
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def record_from(cid: str, data: dict[str, Any]) -> ContainerRecord:
    """The record in ``data``, read from ``cid``'s directory; ValueError when it is not one we wrote
    there: every later step acts on its pids, hooks and paths, so a record planted in (or copied to)
    the directory of another id, or of the wrong shape, is not trusted."""
    if data.get("id") != cid:
        raise ValueError(f"the record names container {shown(str(data.get('id')))}")
    known = _field_types()
    for name, value in data.items():
        if name not in known:
            raise ValueError(f"unknown field {shown(name)}")
        if not _conforms(value, known[name]):
            raise ValueError(f"field {name} has the wrong type")
    missing = [f.name for f in fields(ContainerRecord)
               if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"field {missing[0]} is missing")
    if any(len(v) != 2 for v in data.get("execs", {}).values()):
        raise ValueError("field execs has the wrong shape")
    return ContainerRecord(**data)


class ContainerStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, cid: str) -> Path:
        """The container's directory under the root; the id is checked here, so that no path is
        built from an unchecked one (``../x`` would name a directory outside the root)."""
        return self.root / validate_id(cid)

    def record_path(self, cid: str) -> Path:
        return self.dir(cid) / "state.json"

    def reserve(self, cid: str) -> None:
        """Claim the id: fails if a container (even a half-created one) has it."""
        target = self.dir(cid)  # an invalid id fails before the root is made
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            target.mkdir(mode=0o700)
        except FileExistsError:
            if not self.root.is_dir():
                raise KataError(f"mkdir {self.root}: not a directory") from None
            raise ContainerExists(cid) from None
        except OSError as exc:
            raise KataError(f"mkdir {target}: {strerror(exc)}") from None

    def save(self, rec: ContainerRecord) -> None:
        write_json(self.record_path(rec.id), asdict(rec))

    def load(self, cid: str) -> ContainerRecord:
        path = self.record_path(cid)  # an invalid id fails here, as itself
        try:
            return record_from(cid, read_json(path))
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: --root is a file
            raise ContainerNotFound(cid) from None
        except OSError as exc:
            raise KataError(f"container {cid}: unreadable state: {strerror(exc)}") from exc
        except (ValueError, TypeError) as exc:
            raise KataError(f"container {cid}: unreadable state: {exc}") from exc

    @contextmanager
    def locked(self, cid: str) -> Iterator[ContainerRecord]:
        """The record, read under the container's exclusive lock. The lock is on the directory
        itself, so that a delete that removed it makes a waiting command see "does not exist"."""
        try:
            fd = os.open(self.dir(cid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ContainerNotFound(cid) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.load(cid)  # after the wait: the state may have changed, or be gone
        finally:
            os.close(fd)

    def remove(self, cid: str) -> None:
        """Remove the record's directory; refused (KataError) while something is still mounted in
        it, e.g. a pinned network namespace that could not be unpinned: a later delete retries."""
        try:
            remove_tree(str(self.dir(cid)))
        except OSError as exc:
            raise KataError(f"removing the state of {cid}: {strerror(exc)}") from None

    def list(self) -> list[ContainerRecord]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            try:
                found.append(self.load(entry.name))
            except KataError:
                continue  # being created or deleted right now
        return found
