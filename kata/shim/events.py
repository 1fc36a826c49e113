"""Task events to containerd, over ttrpc to its TTRPC_ADDRESS, in the order they happened.

containerd matches events to tasks by order (an exit before its task's start would be lost), so
one thread forwards them one at a time; flush() lets a caller wait until an event has gone out,
e.g. the exit before the Delete that follows it.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time

from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from kata import ttrpc
from kata.protocols.containerd.api.services.ttrpc.events.v1 import events_pb2

SERVICE = "containerd.services.events.ttrpc.v1.Events"
# Topics, as containerd's runtime package names them.
TASK_CREATE = "/tasks/create"
TASK_START = "/tasks/start"
TASK_EXEC_ADDED = "/tasks/exec-added"
TASK_EXEC_STARTED = "/tasks/exec-started"
TASK_EXIT = "/tasks/exit"
TASK_DELETE = "/tasks/delete"
TASK_OOM = "/tasks/oom"
TASK_PAUSED = "/tasks/paused"
TASK_RESUMED = "/tasks/resumed"

_CALL_TIMEOUT = 5.0
# Events the guest causes at its own pace (OOM kills) that may wait for containerd at once; beyond
# this they are dropped. The shim's own lifecycle events (create, start, exit, delete...) never are.
GUEST_BACKLOG = 64
log = logging.getLogger("kata.shim")


def pack(message: Message) -> Any:
    """An Any as containerd's typeurl makes it: the bare message name is the type URL."""
    return Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        # (topic, event, time, from the guest), a flush marker, or the end.
        self._queue: queue.Queue[tuple[str, Message, float, bool] | threading.Event | None] = queue.Queue()
        self._lock = threading.Lock()
        self._from_guest = 0  # guest-caused events in the queue
        self._dropped = 0
        self._client: ttrpc.Client | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def publish(self, topic: str, event: Message, from_guest: bool = False) -> None:
        """Queue an event for containerd. ``from_guest``: one the guest causes at a pace it chooses,
        dropped (with a warning) while GUEST_BACKLOG of them wait already."""
        if from_guest:
            with self._lock:
                if self._from_guest >= GUEST_BACKLOG:
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning(f"event {topic}: dropped: {GUEST_BACKLOG} from the guest wait already")
                    return
                self._from_guest += 1
        self._queue.put((topic, event, time.time(), from_guest))

    def flush(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(_CALL_TIMEOUT * 2)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            topic, event, at, from_guest = item
            try:
                self._forward(topic, event, at)
            except Exception as exc:  # noqa: BLE001 - a lost event is logged; the shim goes on
                log.warning(f"event {topic}: not delivered to containerd: {exc}")
            if from_guest:
                with self._lock:
                    self._from_guest -= 1
                    if not self._from_guest and self._dropped:
                        log.warning(f"{self._dropped} guest events were dropped while containerd was slow")
                        self._dropped = 0

    def _forward(self, topic: str, event: Message, at: float) -> None:
        envelope = events_pb2.Envelope(namespace=self.namespace, topic=topic, event=pack(event))
        envelope.timestamp.FromNanoseconds(int(at * 1e9))
        for attempt in (1, 2):  # containerd may have restarted: one reconnect
            if self._client is None or self._client.closed:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(_CALL_TIMEOUT)
                sock.connect(self.address)
                sock.settimeout(None)
                self._client = ttrpc.Client(ttrpc.socket_stream(sock))
            try:
                self._client.call(SERVICE, "Forward", events_pb2.ForwardRequest(envelope=envelope), Empty,
                                  timeout=_CALL_TIMEOUT)
                return
            except ttrpc.ConnectionClosed:
                self._client = None
                if attempt == 2:
                    raise
