"""The host side against a hostile agent: over 10,000 generated cases (tests/unit/hostile_agent.py).

In process, one case at a time: ttrpc.Client, AgentClient, LiteAgent, the relay pumps, the monitor's
forwarding proxy, the shim's process waiter and its OOM forwarder. Then the real monitor as a subprocess
(started as kata.runc.monitor_launch starts it) and `kata-runtime kill` and `ps` against a container record
whose proxy socket is the hostile agent.

Every case must end in a value the caller can use or in a one-line TTRPCError/KataError; a call with a
deadline must end by it (give or take SLACK, for a loaded machine); nothing may hang, die with a
traceback, or leave a thread or a descriptor behind. Calls without a deadline (waits, reads) end when the
connection does: when the agent goes silent, the harness drops its end after GRACE, as a dead VM would.

A failure names its case's seed: KATA_HOSTILE_SEED=<seed> KATA_HOSTILE_CASES=1 reruns just that case.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import kata
from kata import ttrpc
from kata.agent_client import relay
from kata.agent_client.client import AgentClient, StreamEOF
from kata.agent_client.lite import LiteAgent, StreamEnded
from kata.agent_client.proxy import forwarding_server
from kata.errors import KataError
from kata.protocols import agent_pb2 as pb
from kata.runc.monitor_launch import MonitorError, PendingMonitor
from kata.runc.state import ContainerRecord, ContainerStore
from kata.shim.oom import OomForwarder
from kata.shim.process import Process as ShimProcess
from kata.shim.stdio import StdioPaths
from kata.utils.process import ProcessId
from kata.utils.text import MESSAGE_LIMIT
from tests.unit.hostile_agent import HostileAgent, Reply, frame_of, make_plan, ok

pytestmark = pytest.mark.timeout(600)

FIRST_SEED = int(os.environ.get("KATA_HOSTILE_SEED", "20261206"))
IN_PROCESS_CASES = int(os.environ.get("KATA_HOSTILE_CASES", "10000"))
MONITOR_CASES = min(IN_PROCESS_CASES, 240)
CLI_CASES = min(IN_PROCESS_CASES, 80)
STALL_SHARE = 0.015  # cases whose agent goes silent (they take their deadline, or GRACE)
SHORT = 0.05  # the deadline of calls in a case that stalls
LONG = 2.0  # the deadline of calls in the others
SLACK = 2.0  # how late a call may end after its deadline on a loaded 2-core machine (<< HARD_LIMIT)
GRACE = 0.1  # how long a silent agent keeps its connection (longer than SHORT)
HARD_LIMIT = 30.0  # a case still running after this hangs (generous: a loaded 2-core machine)
ALLOWED = (ttrpc.TTRPCError, KataError, StreamEnded, StreamEOF)
# Replies after which the connection is gone (the silent ones: soon dropped by the harness).
CONNECTION_ENDERS = ("close", "truncated", "huge_header", "unsyncable")
PACKAGE_PARENT = str(Path(kata.__file__).resolve().parent.parent)


class Call:
    """One call of a case: what, its deadline, how long it took, and what it ended in."""

    __slots__ = ("what", "timeout", "elapsed", "result", "running")

    def __init__(self, what: str, timeout: float | None) -> None:
        self.what = what
        self.timeout = timeout
        self.elapsed = 0.0
        self.result: object = None
        self.running = True


def timed(calls: list[Call], what: str, timeout: float | None, fn: Callable[[], object]) -> object:
    call = Call(what, timeout)
    calls.append(call)
    start = time.monotonic()
    try:
        call.result = fn()
    except BaseException as exc:  # noqa: BLE001 - judged by check_call
        call.result = exc
    call.elapsed = time.monotonic() - start
    call.running = False
    return call.result


def waiting_without_deadline(calls: list[Call]) -> bool:
    """Whether the case's current call has no deadline (so only the connection's end can end it)."""
    return bool(calls) and calls[-1].running and calls[-1].timeout is None


def check_call(call: Call) -> None:
    result = call.result
    if isinstance(result, BaseException):
        assert isinstance(result, ALLOWED), f"{call.what}: {type(result).__name__}: {result!r}"
        text = str(result)
        assert text.isprintable() and len(text) <= MESSAGE_LIMIT + 100, f"{call.what}: {text[:200]!r}"
    if call.timeout is not None:
        late = f"{call.what}: {call.elapsed:.2f}s for a {call.timeout}s deadline"
        assert call.elapsed <= call.timeout + SLACK, late


# ---- the flows: each drives one host component on a connection to the hostile agent ----------------
Flow = Callable[[ttrpc.Stream, float, random.Random, list[Call]], None]
CID = "c1"


def lite_calls(agent: LiteAgent, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    """LiteAgent's calls, and what a success must look like (the guest's numbers checked)."""
    for _ in range(rng.randrange(1, 4)):
        pick = rng.randrange(8)
        if pick == 0:
            timed(calls, "check", timeout, lambda: agent.check(timeout))
        elif pick == 1:
            timed(calls, "signal", timeout, lambda: agent.signal(CID, "", 15))
        elif pick == 2:
            timed(calls, "exec", timeout, lambda: agent.exec_process(CID, "e1", b'{"args":["true"]}'))
        elif pick == 3:
            r = timed(calls, "wait", None, lambda: agent.wait_exit(CID, ""))
            assert isinstance(r, BaseException) or 0 <= r[0] <= 255  # type: ignore[index]
        elif pick == 4:
            r = timed(calls, "read", None, lambda: agent.read("stdout", CID, "", 4096))
            assert isinstance(r, BaseException) or len(r) <= 4096  # type: ignore[arg-type]
        elif pick == 5:
            r = timed(calls, "write", None, lambda: agent.write_stdin(CID, "", b"abc"))
            assert isinstance(r, BaseException) or 0 <= r <= 3  # type: ignore[operator]
        elif pick == 6:
            timed(calls, "close_stdin", timeout, lambda: agent.close_stdin(CID, ""))
        else:
            timed(calls, "resize", timeout, lambda: agent.resize(CID, "", 24, 80))


def flow_client(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    client = ttrpc.Client(stream)
    try:
        payload = pb.ReadStreamRequest(container_id=CID, len=100).SerializeToString()
        for _ in range(rng.randrange(1, 4)):
            method = rng.choice(["Check", "WaitProcess", "ReadStdout", "ListProcesses", "SignalProcess"])
            service = "grpc.Health" if method == "Check" else "grpc.AgentService"
            call = client.call_raw if rng.random() < 0.5 else functools.partial(_async, client)
            timed(calls, f"{method}", timeout, functools.partial(call, service, method, payload, timeout))
    finally:
        client.close()


def _async(client: ttrpc.Client, service: str, method: str, payload: bytes, timeout: float) -> bytes:
    results: list[bytes | ttrpc.TTRPCError] = []
    done = threading.Event()

    def on_done(result: bytes | ttrpc.TTRPCError) -> None:
        results.append(result)
        done.set()

    client.call_async(service, method, payload, on_done, timeout)
    assert done.wait(timeout + SLACK + 1), "an asynchronous call outlived its deadline"
    time.sleep(0)  # a second callback, if any, would come now
    assert len(results) == 1, f"{len(results)} callbacks"
    if isinstance(results[0], ttrpc.TTRPCError):
        raise results[0]
    return results[0]


def flow_agent_client(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    agent = AgentClient(stream, timeout=timeout)
    choices: list[tuple[str, bool, Callable[[], object]]] = [
        ("check", True, agent.check),
        ("version", True, agent.version),
        ("wait_process", False, lambda: agent.wait_process(container_id=CID)),
        ("read_stdout", False, lambda: agent.read_stdout(container_id=CID, length=100)),
        ("read_stderr", False, lambda: agent.read_stderr(container_id=CID)),
        ("write_stdin", False, lambda: agent.write_stdin(container_id=CID, data=b"x")),
        ("list_processes", True, lambda: agent.list_processes(container_id=CID, format="table")),
        ("stats_container", True, lambda: agent.stats_container(container_id=CID)),
        ("get_oom_event", False, agent.get_oom_event),
        ("guest_details", True, agent.get_guest_details),
        ("signal", True, lambda: agent.signal_process(container_id=CID, signal=9)),
        ("create", True, lambda: agent.create_container(container_id=CID, oci_spec_json=b"{}")),
    ]
    try:
        for _ in range(rng.randrange(1, 4)):
            what, has_deadline, fn = rng.choice(choices)
            timed(calls, what, timeout if has_deadline else None, fn)
    finally:
        agent.close()


def flow_lite(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    client = ttrpc.Client(stream)
    try:
        lite_calls(LiteAgent(client, timeout), timeout, rng, calls)
    finally:
        client.close()


def flow_pump_out(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    client = ttrpc.Client(stream)
    if rng.random() < 0.2:  # a reader that went away: writes fail with EPIPE
        r, fd = os.pipe()
        os.close(r)
    else:
        fd = os.open(os.devnull, os.O_WRONLY)
    try:
        pump = functools.partial(relay.pump_out, LiteAgent(client, timeout), rng.choice(["stdout", "stderr"]),
                                 CID, "", fd)
        timed(calls, "pump_out", None, pump)
    finally:
        os.close(fd)
        client.close()


def flow_pump_in(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    client = ttrpc.Client(stream)
    with tempfile.TemporaryFile() as f:
        f.write(rng.randbytes(rng.choice([0, 10, 70000, 200000])))
        f.seek(0)
        try:
            pump = functools.partial(relay.pump_in, LiteAgent(client, timeout), CID, "", f.fileno(),
                                     rng.random() < 0.3)
            timed(calls, "pump_in", None, pump)
        finally:
            client.close()


def flow_proxy(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    """An exec monitor's calls through the init monitor's proxy to the hostile agent."""
    upstream = ttrpc.Client(stream)
    server = forwarding_server(upstream)
    theirs, ours = socket.socketpair()
    served = threading.Thread(target=server.serve, args=(ttrpc.socket_stream(theirs),), daemon=True)
    served.start()
    downstream = ttrpc.Client(ttrpc.socket_stream(ours))
    try:
        lite_calls(LiteAgent(downstream, timeout), timeout, rng, calls)
    finally:
        downstream.close()
        upstream.close()
        server.shutdown()
        served.join(5)
        theirs.close()


def flow_shim_waiter(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    client = ttrpc.Client(stream)
    proc = ShimProcess(CID, rng.choice(["", "e1"]), StdioPaths(), "test")
    exits: list[ShimProcess] = []
    try:
        proc.watch(LiteAgent(client, timeout), exits.append)
        timed(calls, "shim wait", None, lambda: proc.wait(HARD_LIMIT))
        assert proc.exited and 0 <= proc.exit_status <= 255
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.001)
        assert exits == [proc], "the exit was not reported once"
    finally:
        client.close()


def flow_oom(stream: ttrpc.Stream, timeout: float, rng: random.Random, calls: list[Call]) -> None:
    agent = AgentClient(stream, timeout=timeout)
    published: list[str] = []
    try:
        # Pacing is tested on its own (test_shim_guest_events.py): here, as fast as the agent answers.
        forwarder = OomForwarder(lambda: agent.get_oom_event().container_id, {"c1", "c2"}.__contains__,
                                 published.append, rate=1e9, burst=10**9)
        timed(calls, "oom forwarder", None, forwarder.run)
        assert set(published) <= {"c1", "c2"}
    finally:
        agent.close()


FLOWS: list[tuple[Flow, int]] = [
    (flow_client, 3), (flow_agent_client, 3), (flow_lite, 3), (flow_pump_out, 2), (flow_pump_in, 1),
    (flow_proxy, 2), (flow_shim_waiter, 2), (flow_oom, 1),
]


# ---- in process -------------------------------------------------------------------------------------
class Sentinel:
    """Thread deaths and unraisable exceptions, collected while the cases run."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __enter__(self) -> Sentinel:
        self._hooks = (threading.excepthook, sys.unraisablehook)
        threading.excepthook = lambda a: self.errors.append(
            f"thread {a.thread.name if a.thread else '?'} died: {a.exc_type.__name__}: {a.exc_value}")
        sys.unraisablehook = lambda u: self.errors.append(f"unraisable: {u.exc_type.__name__}: {u.exc_value}")
        return self

    def __exit__(self, *exc: object) -> None:
        threading.excepthook, sys.unraisablehook = self._hooks


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def settle(threads: set[threading.Thread], descriptors: set[str], timeout: float = 5.0) -> str:
    """'' once only ``threads`` run and only ``descriptors`` are open, else what is left over."""
    deadline = time.monotonic() + timeout
    while True:
        extra_threads = [t.name for t in threading.enumerate() if t not in threads]
        extra_fds = fds() - descriptors
        if not extra_threads and not extra_fds:
            return ""
        if time.monotonic() >= deadline:
            links = {fd: _link(fd) for fd in extra_fds}
            return f"leaked threads {extra_threads}, descriptors {links}"
        time.sleep(0.001)


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


class Watchdog:
    """Ends a case from outside: drops the agent's connection once it went silent and a call without a
    deadline waits (GRACE later: what a dead VM does to such calls), or at HARD_LIMIT, which means the
    case hung. A call with a deadline meets the silence alone: only its deadline can end it."""

    def __init__(self, agent: HostileAgent, may_drop: Callable[[], bool] = lambda: True) -> None:
        self.agent = agent
        self.may_drop = may_drop
        self.hung = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        limit = time.monotonic() + HARD_LIMIT
        silent_since: float | None = None
        while not self.done.wait(0.005):
            now = time.monotonic()
            if silent_since is None and self.agent.stalled.is_set():
                silent_since = now
            if silent_since is not None and now - silent_since >= GRACE and self.may_drop():
                self.agent.close()
                return
            if now >= limit:
                self.hung = True
                self.agent.close()
                return

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def describe(seed: int, flow: Flow, plan: list[Reply], agent: HostileAgent) -> str:
    replies = ", ".join(f"{m}:{k}" for m, k, _ in agent.replies)
    return f"case seed {seed}: {flow.__name__}, plan [{', '.join(r.kind for r in plan)}], replies [{replies}]"


def run_in_process_case(seed: int) -> tuple[str, list[Call], str]:
    rng = random.Random(seed)
    flow = rng.choices([f for f, _ in FLOWS], weights=[w for _, w in FLOWS])[0]
    stall = rng.random() < STALL_SHARE
    plan = make_plan(rng, rng.randrange(1, 6), stall=stall)
    timeout = SHORT if stall else LONG
    host, guest = socket.socketpair()
    agent = HostileAgent(guest, plan, random.Random(rng.random()))
    calls: list[Call] = []
    watchdog = Watchdog(agent, lambda: waiting_without_deadline(calls))
    try:
        flow(ttrpc.socket_stream(host), timeout, rng, calls)
    finally:
        watchdog.stop()
        agent.join()
        host.close()
    what = describe(seed, flow, plan, agent)
    return what, calls, "the case hung (hard limit)" if watchdog.hung else ""


def test_in_process_components_survive_a_hostile_agent() -> None:
    rng = random.Random(FIRST_SEED)
    seeds = [rng.randrange(2**63) for _ in range(IN_PROCESS_CASES)]
    if IN_PROCESS_CASES == 1:
        seeds = [FIRST_SEED]
    run_in_process_case(seeds[0])  # warm up: lazy imports and first-use threads are no leak
    threads, descriptors = set(threading.enumerate()), fds()
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    with Sentinel() as sentinel:
        for seed in seeds:
            what, calls, hung = run_in_process_case(seed)
            assert not hung, f"{what}: {hung}"
            for call in calls:
                try:
                    check_call(call)
                except AssertionError as exc:
                    raise AssertionError(f"{what}: {exc}") from None
                kind = type(call.result).__name__ if isinstance(call.result, BaseException) else "ok"
                outcomes[kind] = outcomes.get(kind, 0) + 1
            assert not sentinel.errors, f"{what}: {sentinel.errors}"
            leftover = settle(threads, descriptors)
            assert not leftover, f"{what}: {leftover}"
    # The cases reached both kinds of ending, not only errors.
    print(f"\n{len(seeds)} in-process cases in {time.monotonic() - started:.1f}s: {outcomes}")
    if len(seeds) >= 1000:
        assert outcomes.get("ok", 0) > len(seeds) // 10 and sum(outcomes.values()) > len(seeds)


# ---- subprocesses: the monitor, kata-runtime ----------------------------------------------------------
@pytest.fixture
def workdir() -> Iterator[Path]:
    """Short paths: a unix socket's must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kh", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Listener:
    """The hostile agent on a unix socket: each connection gets the next plan."""

    def __init__(self, path: Path, plans: list[list[Reply]], rng: random.Random) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.plans = plans
        self.rng = rng
        self.agents: list[HostileAgent] = []
        self.watchdogs: list[Watchdog] = []
        self.thread = threading.Thread(target=self._accept, name="hostile-listener", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            plan = self.plans.pop(0) if self.plans else []
            agent = HostileAgent(conn, plan, random.Random(self.rng.random()))
            self.agents.append(agent)
            self.watchdogs.append(Watchdog(agent))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        for watchdog in self.watchdogs:
            watchdog.stop()
        for agent in self.agents:
            agent.join()

    def hung(self) -> bool:
        return any(w.hung for w in self.watchdogs)


def one_line_at_most(err: bytes, what: str, prefix: bytes = b"") -> None:
    """No traceback, and at most one line (that starts with ``prefix``, when others may be there too)."""
    assert b"Traceback" not in err, f"{what}: {err[-2000:]!r}"
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) <= 1, f"{what}: {lines}"


def wait_monitor(proc: subprocess.Popen[bytes], listener: Listener, lingers: bool) -> int:
    """The monitor's exit status. An init monitor whose agent connection ended before the container
    was started stays, as runc's init does, until `start` or a signal: like a runtime's `kill`, this
    signals it once the agent's side is gone. TimeoutExpired at HARD_LIMIT."""
    deadline = time.monotonic() + HARD_LIMIT
    next_kill = 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            raise subprocess.TimeoutExpired(proc.args, HARD_LIMIT)
        gone = listener.agents and not any(a.thread.is_alive() for a in listener.agents)
        if lingers and gone and now >= next_kill:
            # Again each second, as a runtime's kill is repeated: one that came while the monitor was
            # still waiting on its agent was forwarded there (and is not its release).
            if next_kill:
                proc.send_signal(signal.SIGTERM)
            next_kill = now + (1.0 if next_kill else 0.05)  # the first after the monitor saw the end
        time.sleep(0.01)
    return proc.returncode


def run_monitor_case(seed: int, workdir: Path) -> str:
    """What the case ended in: "status N", or "refused" (the monitor answered "error")."""
    rng = random.Random(seed)
    where = workdir / f"m{seed % 10**9}"
    where.mkdir()
    role = "init" if rng.random() < 0.75 else "exec"
    stall = rng.random() < 0.05
    plan = make_plan(rng, rng.randrange(2, 8), stall=stall)
    if role == "init" and rng.random() < 0.7:
        plan[0] = Reply("valid", lambda sid, good: [frame_of(sid, ok(good))])  # mostly past Check
    listener = Listener(where / "agent.sock", [plan], random.Random(rng.random()))
    stdin = os.open(os.devnull, os.O_RDONLY)
    if rng.random() < 0.3:
        os.close(stdin)
        (where / "in").write_bytes(rng.randbytes(rng.choice([10, 100000])))
        stdin = os.open(where / "in", os.O_RDONLY)
    out = os.open(where / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    err = os.open(where / "err", os.O_WRONLY | os.O_CREAT, 0o600)
    conf: dict[str, Any] = {"role": role, "cid": CID, "terminal": False, "console_socket": None,
                            "foreground": False}
    if role == "init":
        conf.update(agent={"kind": "serial", "path": str(where / "agent.sock")},
                    proxy=str(where / "proxy.sock"))
    else:
        conf.update(exec_id="e1", proxy=str(where / "agent.sock"), process={"args": ["true"], "cwd": "/"})
    what = f"monitor case seed {seed} ({role}, plan [{', '.join(r.kind for r in plan)}])"
    try:
        monitor = PendingMonitor([CID, "hostile"], stdio=(stdin, out, err))
    finally:
        for fd in (stdin, out, err):
            os.close(fd)
    configured = True
    try:
        monitor.configure(conf, timeout=HARD_LIMIT)
        monitor.release()  # as kata-runtime's exit would: the caller has the monitor's pid now
        for _ in range(rng.choice([0, 0, 1, 3])):  # forwarded to the agent, whose answers are hostile too
            monitor.proc.send_signal(rng.choice([signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1]))
    except MonitorError as exc:
        configured = False
        assert str(exc).isprintable(), f"{what}: {exc!r}"
    try:
        status = wait_monitor(monitor.proc, listener, lingers=configured and role == "init")
    except subprocess.TimeoutExpired:
        monitor.proc.kill()
        monitor.proc.wait()
        replies = [(m, k) for agent in listener.agents for m, k, _ in agent.replies]
        alive = [a.thread.is_alive() for a in listener.agents]
        raise AssertionError(f"{what}: the monitor hung (replies {replies}, agents alive {alive})") from None
    finally:
        listener.close()
    replies = [(m, k) for agent in listener.agents for m, k, _ in agent.replies]
    what += f", replies {replies}, exit {status}"
    assert not listener.hung(), f"{what}: hung"
    # The container's stderr is the monitor's too: the guest's output may be there, around our one line.
    one_line_at_most((where / "err").read_bytes(), what, prefix=b"kata-monitor: ")
    if not configured:
        # It answered "error": the runtime kills it (PendingMonitor.cancel), unless it was quicker.
        assert status in (255, -9), what
        return "refused"
    assert 0 <= status <= 255, what
    methods = [m for m, _ in replies]
    if "WaitProcess" in methods:
        first = methods.index("WaitProcess")
        guessed = {"premature", "wrong_id"} & {k for _, k in replies[:first]}  # may answer a later stream id
        kind = replies[first][1]
        if not guessed and (kind in CONNECTION_ENDERS or kind.endswith("(silent)")):
            assert status == 255, f"{what}: the connection ended before any exit was reported"
    assert not (where / "proxy.sock").exists(), f"{what}: the proxy socket was left behind"
    return "unknown status (255)" if status == 255 else "exit status"


def run_cli_case(seed: int, workdir: Path) -> str:
    rng = random.Random(seed)
    where = workdir / f"c{seed % 10**9}"
    cid = f"k{seed % 10**6}"
    store = ContainerStore(where / "root")
    store.reserve(cid)
    # What the record's monitor is: `kill` signals it itself once the agent is gone, as runc
    # signals its init process; so a process of its own, never this one.
    stand_in = subprocess.Popen(["sleep", "300"])
    me = ProcessId.of(stand_in.pid)
    assert me is not None
    store.save(ContainerRecord(id=cid, bundle=str(where), rootfs=str(where), created="now", config="",
                               status="running", pid=me.pid, pid_start=me.start_time))
    stall = rng.random() < 0.1
    listener = Listener(where / "vc" / "vm" / cid / "agent-proxy.sock", [make_plan(rng, 3, stall=stall)],
                        random.Random(rng.random()))
    verb = rng.choice([["kill", cid, "15"], ["ps", cid]])
    env = dict(os.environ, KATA_STATE_ROOT=str(where / "vc"), PYTHONPATH=PACKAGE_PARENT)
    try:
        done = subprocess.run([sys.executable, "-m", "kata.cli.main", "--root", str(where / "root"), *verb],
                              env=env, capture_output=True, timeout=HARD_LIMIT)
    finally:
        listener.close()
        stand_in.kill()
        stand_in.wait()
    replies = [(m, k) for agent in listener.agents for m, k, _ in agent.replies]
    what = f"kata-runtime {verb[0]} case seed {seed}: replies {replies}, exit {done.returncode}"
    assert not listener.hung(), f"{what}: hung"
    one_line_at_most(done.stderr, what)
    assert done.returncode in (0, 1), f"{what}: {done.stderr!r}"
    if done.returncode:
        assert done.stderr.startswith(b"kata-runtime: "), f"{what}: {done.stderr!r}"
        assert b"internal error" not in done.stderr, f"{what}: {done.stderr!r}"
    for line in done.stdout.decode(errors="strict").splitlines():  # ps: the guest's table, escaped
        assert line.isprintable(), f"{what}: {line[:200]!r}"
    return f"{verb[0]} {'failed' if done.returncode else 'done'}"


def run_in_parallel(cases: list[Callable[[], str]], workers: int = 4) -> dict[str, int]:
    """Each case's outcome, counted."""
    outcomes: dict[str, int] = {}
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(case) for case in cases]:
            outcome = future.result()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def test_the_monitor_and_the_cli_survive_a_hostile_agent(workdir: Path) -> None:
    rng = random.Random(FIRST_SEED + 1)
    threads, descriptors = set(threading.enumerate()), fds()
    started = time.monotonic()
    with Sentinel() as sentinel:
        monitors = run_in_parallel([functools.partial(run_monitor_case, rng.randrange(2**63), workdir)
                                    for _ in range(MONITOR_CASES)])
        clis = run_in_parallel([functools.partial(run_cli_case, rng.randrange(2**63), workdir)
                                for _ in range(CLI_CASES)])
        assert not sentinel.errors, sentinel.errors
    print(f"\n{MONITOR_CASES} monitor and {CLI_CASES} CLI cases in {time.monotonic() - started:.1f}s: "
          f"{monitors}, {clis}")
    if MONITOR_CASES >= 100:  # they reach every ending, not only errors
        assert len(monitors) == 3 and len(clis) == 4
    assert not settle(threads, descriptors), settle(threads, descriptors)


def test_cases_are_what_the_seed_says() -> None:
    """A failure's seed reproduces its case: plans are drawn from the seed alone."""
    a, b = random.Random(7), random.Random(7)
    assert [r.kind for r in make_plan(a, 20)] == [r.kind for r in make_plan(b, 20)]
    assert [r.steps(1, b"x") for r in make_plan(random.Random(8), 20)] == [
        r.steps(1, b"x") for r in make_plan(random.Random(8), 20)]


def test_a_burst_of_signals_never_wedges_the_monitor(workdir: Path) -> None:
    """Thousands of signals as fast as they come, to a few monitors: each forwards what it can and
    still ends (its handler used to take a lock; a signal that interrupted the handler while it held
    that lock waited on it for ever: one burst in three wedged the monitor)."""
    for n in range(6):
        valid = Reply("valid", lambda sid, good: [frame_of(sid, ok(good))])
        where = workdir / f"b{n}"
        where.mkdir()
        listener = Listener(where / "agent.sock", [[valid] * 50], random.Random(n))
        null = os.open(os.devnull, os.O_RDWR)
        try:
            monitor = PendingMonitor([CID, "burst"], stdio=(null, null, null))
        finally:
            os.close(null)
        try:
            agent = {"kind": "serial", "path": str(where / "agent.sock")}
            monitor.configure({"role": "init", "cid": CID, "terminal": False, "console_socket": None,
                               "foreground": False, "agent": agent, "proxy": str(where / "proxy.sock")},
                              timeout=HARD_LIMIT)
            monitor.release()
            for i in range(3000):
                monitor.proc.send_signal([signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP][i % 3])
            status = wait_monitor(monitor.proc, listener, lingers=True)
        finally:
            if monitor.proc.poll() is None:
                monitor.proc.kill()
                monitor.proc.wait()
            listener.close()
        assert 0 <= status <= 255  # it ended: with the status the agent gave, or 255 without one
