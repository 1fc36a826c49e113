"""Events the guest causes at its own pace: OOM kills are filtered, coalesced and paced
(kata.shim.oom), and the publisher's queue holds only so many of them, never dropping the shim's own."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.empty_pb2 import Empty

from kata import ttrpc
from kata.errors import KataError
from kata.protocols.containerd.api.events import task_pb2
from kata.protocols.containerd.api.services.ttrpc.events.v1 import events_pb2
from kata.shim import events
from kata.shim.oom import BURST, QUIET, RATE, OomForwarder

pytestmark = pytest.mark.timeout(60)


class Clock:
    """Time that passes only when the forwarder sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept += seconds
        self.now += seconds


def run_forwarder(answers: list[str], tasks: set[str], clock: Clock) -> tuple[list[str], list[float]]:
    """Feed ``answers`` as the guest's GetOOMEvent replies; (what was published, when each call was made)."""
    published: list[str] = []
    calls: list[float] = []
    feed: Iterator[str] = iter(answers)

    def next_event() -> str:
        calls.append(clock.now)
        try:
            return next(feed)
        except StopIteration:
            raise KataError("agent connection closed") from None

    OomForwarder(next_event, tasks.__contains__, published.append, clock=clock, sleep=clock.sleep).run()
    return published, calls


def test_only_tasks_of_the_pod_and_once_per_quiet_period() -> None:
    clock = Clock()
    answers = ["c1", "nope", "", "c1", "../etc", "c2\nforged", "c2"]
    published, _ = run_forwarder(answers, {"c1", "c2"}, clock)
    assert published == ["c1", "c2"]  # the second c1 came within QUIET of the first


def test_a_guest_that_answers_in_a_loop_is_paced() -> None:
    clock = Clock()
    flood = 500
    published, calls = run_forwarder(["c1"] * flood, {"c1"}, clock)
    # At most BURST calls at once, then RATE a second: 500 answers take about (500 - BURST) / RATE s.
    assert clock.slept == pytest.approx((flood + 1 - BURST) / RATE, rel=0.01)
    for start in calls:
        assert sum(1 for t in calls if start <= t < start + 1.0) <= BURST + RATE
    # One event per quiet period of the forwarder's own time.
    assert len(published) <= (calls[-1] - calls[0]) / QUIET + 1
    assert published and set(published) == {"c1"}


def test_the_forwarder_ends_with_the_agent_connection() -> None:
    def gone() -> str:
        raise ttrpc.ConnectionClosed()

    t = threading.Thread(target=OomForwarder(gone, lambda cid: True, lambda cid: None).run)
    t.start()
    t.join(5)
    assert not t.is_alive()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[tuple[str, list[Any], threading.Event]]:
    """A stand-in for containerd's events service: records each Forward, but only once ``gate`` is set."""
    seen: list[Any] = []
    gate = threading.Event()

    def forward(ctx: ttrpc.Context, req: events_pb2.ForwardRequest) -> Empty:
        gate.wait(30)
        seen.append(req.envelope)
        return Empty()

    server = ttrpc.Server(max_workers=1)
    server.register_service(events.SERVICE, {"Forward": ttrpc.Method(events_pb2.ForwardRequest, forward)})
    path = str(tmp_path / "containerd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    accept = threading.Thread(target=server.serve_listener, args=(listener,), daemon=True)
    accept.start()
    try:
        yield path, seen, gate
    finally:
        gate.set()
        server.shutdown()
        accept.join(5)
        listener.close()


def test_guest_events_wait_in_a_bounded_queue_and_lifecycle_events_never_drop(
    containerd: tuple[str, list[Any], threading.Event],
) -> None:
    path, seen, gate = containerd
    publisher = events.Publisher(f"unix://{path}", "test")
    try:
        publisher.publish(events.TASK_START, task_pb2.TaskStart(container_id="c1", pid=1))
        for _ in range(10 * events.GUEST_BACKLOG):  # containerd is stuck: the guest's events pile up
            publisher.publish(events.TASK_OOM, task_pb2.TaskOOM(container_id="c1"), from_guest=True)
        for i in range(200):
            publisher.publish(events.TASK_EXIT, task_pb2.TaskExit(container_id="c1", id=f"e{i}"))
        gate.set()
        deadline = time.monotonic() + 20
        while len(seen) < 201 + events.GUEST_BACKLOG and time.monotonic() < deadline:
            time.sleep(0.02)
        publisher.flush()
    finally:
        publisher.close()
    topics = [e.topic for e in seen]
    assert topics.count(events.TASK_OOM) == events.GUEST_BACKLOG
    exits = [task_pb2.TaskExit.FromString(e.event.value).id for e in seen if e.topic == events.TASK_EXIT]
    assert exits == [f"e{i}" for i in range(200)]  # every one, in order
    assert topics[0] == events.TASK_START and topics[-1] == events.TASK_EXIT
