"""The guest agent's OOM watcher on files shaped like cgroup v2 memory.events (inotify sees their
modification as it sees the kernel's)."""

from __future__ import annotations

import threading
from pathlib import Path

from kata.guest.agent.oom import OomWatcher, oom_kills


def events_file(cgroup: Path, kills: int) -> None:
    text = f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {kills}\noom_group_kill 0\n"
    (cgroup / "memory.events").write_text(text)


def next_event(watcher: OomWatcher, timeout: float = 5.0) -> str | None:
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(watcher.next_event()), daemon=True)
    t.start()
    t.join(timeout)
    return got[0] if got else None


def test_each_new_kill_is_one_event(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    events_file(a, 2)  # kills before the watch are not news
    events_file(b, 0)
    watcher = OomWatcher()
    watcher.watch("ca", str(a))
    watcher.watch("cb", str(b))
    assert oom_kills(str(a / "memory.events")) == 2
    events_file(b, 1)
    assert next_event(watcher) == "cb"
    events_file(a, 3)
    assert next_event(watcher) == "ca"
    events_file(a, 3)  # modified, no new kill
    watcher.unwatch("ca")
    events_file(a, 4)  # no longer watched
    assert next_event(watcher, timeout=0.5) is None


def test_take_hands_the_kill_to_the_exit_instead(tmp_path: Path) -> None:
    events_file(tmp_path, 0)
    watcher = OomWatcher()
    watcher.watch("c", str(tmp_path))
    assert not watcher.take("c")
    events_file(tmp_path, 1)
    # Whether the watcher's thread queued it already or not, take() has it, and only once.
    assert watcher.take("c")
    assert not watcher.take("c")
    assert next_event(watcher, timeout=0.5) is None
