"""200 processes with their output reads and their wait in flight (and some writes to a stdin nobody
reads) leave control calls answering: on the real agent service, through the monitor's proxy in front of
it, and on the shim's task service, whose Wait lasts as long as a process does.

Every control call has a generous 10 s deadline, so that the test is not a race against the clock; with
long-poll calls on the shared workers they would never be answered at all.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata import ttrpc
from kata.agent_client.client import AgentClient
from kata.agent_client.proxy import forwarding_server
from kata.guest.agent.sandbox import Process, Sandbox
from kata.protocols import agent_pb2 as pb
from kata.protocols.agent_api import AGENT_SERVICE
from kata.protocols.containerd.runtime.v2.task import shim_pb2 as spb
from kata.sandbox.status import Status
from kata.shim.process import Process as ShimProcess
from kata.shim.service import SERVICE as TASK_SERVICE
from kata.shim.service import TaskService
from kata.shim.stdio import StdioPaths
from kata.shim.tasks import PodTasks, Task
from tests.unit.guest_fakes import agent_server, close_processes, fake_process, serve_on_socketpair

pytestmark = pytest.mark.timeout(120)

N = 200
STUCK_STDIN = 20  # processes that never read their stdin, with a write to it in flight
CONTROL_TIMEOUT = 10.0
# More than a pipe holds: the agent's write blocks until the process reads (here: never).
BIG = b"x" * (256 * 1024)


class Guest:
    """The agent with N fake container processes c0..c{N-1}, and the results of the calls parked on it."""

    def __init__(self, server: ttrpc.Server, sandbox: Sandbox,
                 procs: list[tuple[Process, tuple[int, int, int]]]) -> None:
        self.server = server
        self.sandbox = sandbox
        self.procs = procs
        self.results: list[tuple[str, bytes | ttrpc.TTRPCError]] = []
        self._lock = threading.Lock()

    def collect(self, method: str) -> Callable[[bytes | ttrpc.TTRPCError], None]:
        def on_done(result: bytes | ttrpc.TTRPCError) -> None:
            with self._lock:
                self.results.append((method, result))
        return on_done

    def park(self, client: ttrpc.Client, i: int) -> None:
        """Process c{i}'s stdout and stderr reads and its wait (and a stuck write), without deadline."""
        cid = f"c{i}"
        calls: list[tuple[str, bytes]] = [
            ("ReadStdout", pb.ReadStreamRequest(container_id=cid, len=65536).SerializeToString()),
            ("ReadStderr", pb.ReadStreamRequest(container_id=cid, len=65536).SerializeToString()),
            ("WaitProcess", pb.WaitProcessRequest(container_id=cid).SerializeToString()),
        ]
        if i < STUCK_STDIN:
            write = pb.WriteStreamRequest(container_id=cid, data=BIG)
            calls.append(("WriteStdin", write.SerializeToString()))
        for method, payload in calls:
            client.call_async(AGENT_SERVICE, method, payload, self.collect(method))

    def expected(self) -> int:
        return 3 * N + STUCK_STDIN

    def end_processes(self) -> None:
        """Every process exits and closes its ends: each parked call gets its answer."""
        for proc, (in_r, out_w, err_w) in self.procs:
            for fd in (out_w, err_w, in_r):
                _close(fd)
            proc.exit.set(0)

    def wait_results(self) -> None:
        deadline = time.monotonic() + 30
        while len(self.results) < self.expected() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.results) == self.expected()
        by_method: dict[str, list[bytes | ttrpc.TTRPCError]] = {}
        for method, result in self.results:
            by_method.setdefault(method, []).append(result)
        for method in ("ReadStdout", "ReadStderr"):
            assert all(isinstance(r, ttrpc.TTRPCError) and r.code == ttrpc.Code.OUT_OF_RANGE
                       for r in by_method[method])  # end of stream
        assert all(isinstance(r, bytes) and pb.WaitProcessResponse.FromString(r).status == 0
                   for r in by_method["WaitProcess"])
        assert all(isinstance(r, ttrpc.TTRPCError) and r.code == ttrpc.Code.FAILED_PRECONDITION
                   for r in by_method["WriteStdin"])  # stdin closed under the blocked write


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _long_poll_threads() -> int:
    names = ("ttrpc-Read", "ttrpc-Wait", "ttrpc-Write")
    return sum(1 for t in threading.enumerate() if t.name.startswith(names))


def _wait_parked(count: int) -> None:
    """Until the agent serves ``count`` long-poll calls, each on its own thread."""
    deadline = time.monotonic() + 30
    while _long_poll_threads() < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _long_poll_threads() >= count


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    server, sandbox = agent_server(tmp_path)  # the agent's own pool: 32 workers
    g = Guest(server, sandbox, [fake_process(sandbox, f"c{i}") for i in range(N)])
    try:
        yield g
    finally:
        g.end_processes()
        server.shutdown()
    deadline = time.monotonic() + 10
    while _long_poll_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    close_processes(sandbox)
    assert _long_poll_threads() == 0


def control_calls(client: ttrpc.Client) -> None:
    agent = AgentClient(client, timeout=CONTROL_TIMEOUT)
    assert agent.check().status == 1  # SERVING
    agent.signal_process(container_id="c7", signal=0)
    with pytest.raises(Exception, match="NOT_FOUND"):
        agent.start_container(container_id="nope")


def test_agent_answers_control_calls_with_every_process_waited_on(guest: Guest) -> None:
    host, guest_sock = serve_on_socketpair(guest.server)
    client = ttrpc.Client(host)
    try:
        for i in range(N):
            guest.park(client, i)
        _wait_parked(guest.expected())
        control_calls(client)
        assert guest.results == []  # nothing parked was answered early
        guest.end_processes()
        guest.wait_results()
    finally:
        client.close()
        guest_sock.close()


def test_proxy_forwards_every_process_and_still_answers(guest: Guest, tmp_path: Path) -> None:
    """Each process's exec monitor has its own connection to the init monitor's proxy, as in the
    runtime; the proxy holds no thread per call in flight."""
    host, guest_sock = serve_on_socketpair(guest.server)
    upstream = ttrpc.Client(host)
    proxy = forwarding_server(upstream)
    path = str(tmp_path / "proxy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    accept = threading.Thread(target=proxy.serve_listener, args=(listener,), daemon=True)
    accept.start()
    clients: list[ttrpc.Client] = []

    def connect() -> ttrpc.Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        clients.append(ttrpc.Client(ttrpc.socket_stream(sock)))
        return clients[-1]

    try:
        for i in range(N):
            guest.park(connect(), i)
        _wait_parked(guest.expected())
        control_calls(connect())
        assert guest.results == []
        guest.end_processes()
        guest.wait_results()
    finally:
        for c in clients:
            c.close()
        proxy.shutdown()
        accept.join(5)
        listener.close()
        upstream.close()
        guest_sock.close()


def test_shim_answers_with_every_task_waited_on(tmp_path: Path) -> None:
    pod = PodTasks("test", publisher=None)
    for i in range(N):
        cid = f"t{i}"
        init = ShimProcess(cid, "", StdioPaths(), "test")
        init.status = Status.RUNNING
        pod.tasks[cid] = Task(cid, tmp_path, init)
    server = ttrpc.Server(max_workers=8)  # fewer workers than waits, by far
    server.register_service(TASK_SERVICE, TaskService(pod, lambda: None, None).methods())
    host, guest_sock = serve_on_socketpair(server)
    client = ttrpc.Client(host)
    waits: list[bytes | ttrpc.TTRPCError] = []
    try:
        for i in range(N):
            wait = spb.WaitRequest(id=f"t{i}").SerializeToString()
            client.call_async(TASK_SERVICE, "Wait", wait, waits.append)
        deadline = time.monotonic() + 30
        while sum(t.name == "ttrpc-Wait" for t in threading.enumerate()) < N and time.monotonic() < deadline:
            time.sleep(0.02)
        state = client.call(TASK_SERVICE, "State", spb.StateRequest(id="t5"), spb.StateResponse,
                            timeout=CONTROL_TIMEOUT)
        assert state.id == "t5" and state.status == 2  # RUNNING
        client.call(TASK_SERVICE, "Connect", spb.ConnectRequest(id="t5"), spb.ConnectResponse,
                    timeout=CONTROL_TIMEOUT)
        assert waits == []
        for i, task in enumerate(pod.tasks.values()):
            task.init.finish(i % 256)
        deadline = time.monotonic() + 30
        while len(waits) < N and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(spb.WaitResponse.FromString(w).exit_status for w in waits  # type: ignore[arg-type]
                      ) == sorted(i % 256 for i in range(N))
    finally:
        client.close()
        server.shutdown()
        guest_sock.close()
