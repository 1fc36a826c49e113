"""The shim zygote's parts that need no VM: what it preloads, the command line a forked shim shows,
the process context it compares, and the requests it declines (a real zygote object answering
over a real socket; no shim is forked here: tests/integration/test_shim_ctr.py has those)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kata.shim import zygote
from kata.utils.sockets import listen_private
from tests.conftest import config_with


@pytest.mark.parametrize("name", zygote.PRELOAD)
def test_every_preloaded_module_imports(name: str) -> None:
    importlib.import_module(name)


SHOW = """
import os, sys
from kata.shim.zygote import set_command_line
try:
    set_command_line(os.environ["NEW"].split(","), "new-comm")
except OSError as exc:
    print("refused:", exc)
sys.stdout.write(repr(open("/proc/self/cmdline", "rb").read()) + "\\n" + open("/proc/self/comm").read())
"""


def _show(new: str, room: int) -> tuple[bytes, str]:
    # The new command line comes in the environment: the old one is the program, SHOW and ``room``.
    proc = subprocess.run([sys.executable, "-c", SHOW, " " * room], capture_output=True, text=True,
                          timeout=60, check=True, env={**os.environ, "NEW": new})
    lines = proc.stdout.splitlines()
    if lines[0].startswith("refused:"):
        return lines[0].encode(), ""
    return eval(lines[0]), lines[1]  # noqa: S307 - the repr of bytes this test printed


def test_a_command_line_is_written_over_the_old_one() -> None:
    cmdline, comm = _show("/usr/bin/containerd-shim-kata-v2,-id,pod-1,start", room=200)
    assert cmdline.rstrip(b"\0") == b"/usr/bin/containerd-shim-kata-v2\0-id\0pod-1\0start"
    assert set(cmdline[len(b"/usr/bin/containerd-shim-kata-v2\0-id\0pod-1\0start"):]) == {0}
    assert comm == "new-comm"


def test_a_command_line_longer_than_the_room_is_refused() -> None:
    refused, _ = _show("x" * (len(SHOW) + 400), room=10)
    assert refused.startswith(b"refused:") and b"does not fit" in refused


def test_the_process_context_tells_a_changed_child_apart() -> None:
    mine = zygote.process_context(os.getpid())
    assert mine == zygote.process_context(os.getpid())
    assert mine["ns/mnt"].startswith("mnt:[") and "Max open files" in mine["limits"]
    # A Python child, as `start` is: Python ignores SIGPIPE and SIGXFSZ, which the context compares.
    proc = subprocess.Popen(["nice", "-n", "5", sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        theirs = zygote.process_context(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    differ = {k for k in mine if mine[k] != theirs[k]}
    assert "nice" in differ and differ <= {"nice", "ioprio"}  # a task's I/O priority follows its nice


def test_the_environment_modules_read_as_they_load_is_compared() -> None:
    env = {"KATA_STATE_ROOT": "/x", "KATA_CONF_FILE": "/c.toml", "PYTHONPATH": "/p", "LC_ALL": "C",
           "TZ": "UTC", "PATH": "/bin", "TTRPC_ADDRESS": "/t", "NAMESPACE": "k8s.io"}
    assert zygote.import_time_env(env) == {"KATA_STATE_ROOT": "/x", "PYTHONPATH": "/p", "LC_ALL": "C",
                                           "TZ": "UTC"}


def test_without_a_zygote_start_forks_the_shim_itself(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        assert zygote.fork_shim(["shim"], ["start"], tmp_path, listener, path=tmp_path / "none.sock") is None
    assert not zygote.is_running(tmp_path / "none.sock")


@pytest.fixture
def ask(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Send one request over a socket pair to a Zygote object in this process: its answer, and
    what it does next. No shim is forked: this process has threads (pytest's), so a request that
    passes every other check is declined there."""
    path = tmp_path / "z.sock"
    server = listen_private(str(path), 4, socket.SOCK_SEQPACKET)
    pod_socket = listen_private(str(tmp_path / "pod.sock"), 4)
    z = zygote.Zygote(server, path, wake_fd=-1, stamp=zygote.code_stamp())

    def call(request: dict[str, object], fds: list[int] | None = None) -> tuple[dict[str, object], str]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        try:
            with ours, theirs:
                socket.send_fds(ours, [json.dumps(request).encode()],
                                [pod_socket.fileno(), r] if fds is None else fds)
                outcome = z.handle(theirs)
                return json.loads(ours.recv(4096)), outcome
        finally:
            os.close(r)
            os.close(w)

    yield z, call, path
    server.close()
    pod_socket.close()


def _request(tmp_path: Path, **changes: object) -> dict[str, object]:
    request: dict[str, object] = {"cmdline": ["containerd-shim-kata-v2", "-id", "x", "start"],
                                  "argv": ["-id", "x", "start"], "env": dict(os.environ),
                                  "cwd": str(tmp_path)}
    request.update(changes)
    return request


def test_a_request_passing_every_check_meets_the_thread_check(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call, _ = ask
    answer, outcome = call(_request(tmp_path))
    assert answer == {"declined": "the zygote has threads: it cannot fork"} and outcome == "declined"


def test_a_request_without_a_listening_socket_and_a_pipe_is_declined(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call, _ = ask
    declined = {"declined": "a request takes a listening unix socket and a pipe"}
    assert call(_request(tmp_path), fds=[]) == (declined, "declined")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        r, w = os.pipe()
        try:
            assert call(_request(tmp_path), fds=[unbound.fileno(), r]) == (declined, "declined")
        finally:
            os.close(r)
            os.close(w)


def test_a_malformed_request_is_declined(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call, _ = ask
    malformed = ({"declined": "malformed request"}, "declined")
    assert call(_request(tmp_path, argv="start")) == malformed
    assert call(_request(tmp_path, cmdline=[])) == malformed
    assert call(_request(tmp_path, env={"A=B": "c"})) == malformed
    assert call(_request(tmp_path, env={"A": "b\0c"})) == malformed
    assert call({"argv": ["start"]}) == malformed


def test_a_zygote_whose_code_changed_declines_and_ends(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import fcntl

    from kata.utils.files import lock_held

    z, call, path = ask
    lock = tmp_path / "z.lock"
    z.lock = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(z.lock, fcntl.LOCK_EX)
    os.write(z.lock, b"12345\n")
    z.stamp = {**z.stamp, "python": ("/elsewhere/python3", (0, 0, 0, 0))}
    assert call(_request(tmp_path)) == ({"declined": "the zygote's code was replaced"}, "end")
    # Socket and lock gone before the answer: the caller can start another at once.
    assert not path.exists() and not lock_held(lock) and lock.read_text() == ""


def test_a_caller_with_another_import_time_environment_ends_the_zygote(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call, _ = ask
    env = {**os.environ, "KATA_STATE_ROOT": "/elsewhere"}
    answer, outcome = call(_request(tmp_path, env=env))
    assert answer == {"declined": "the caller's process context or environment is not the zygote's"}
    assert outcome == "end"


def test_a_pod_whose_configuration_turns_it_off_is_declined(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call, _ = ask
    conf = config_with(tmp_path, {"runtime": {"shim_zygote": False}})
    env = {**os.environ, "KATA_CONF_FILE": str(conf)}
    answer, outcome = call(_request(tmp_path, env=env))
    assert answer == {"declined": "shim_zygote is off in the pod's configuration"} and outcome == "declined"


ASK = """
import json, os, socket, sys
from pathlib import Path
from kata.shim import zygote
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as l:
    l.bind(sys.argv[2]); l.listen(1)
    r, w = os.pipe()
    request = {"cmdline": ["shim", "start"], "argv": ["start"], "env": dict(os.environ), "cwd": "/"}
    print(json.dumps(zygote.ask(request, [l.fileno(), r], path=Path(sys.argv[1]))))
"""


def test_a_caller_in_another_context_is_declined(tmp_path: Path) -> None:
    """A caller that differs (here only by its nice value) is not served: its shim would not be
    the one `start` forks; the zygote makes way for one that can serve it."""
    path = tmp_path / "z.sock"
    server = listen_private(str(path), 4, socket.SOCK_SEQPACKET)
    argv = ["nice", "-n", "5", sys.executable, "-c", ASK, str(path), str(tmp_path / "l.sock")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        z = zygote.Zygote(server, path, wake_fd=-1, stamp=zygote.code_stamp())
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            assert z.handle(conn) == "end"
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    assert json.loads(out) == {"declined": "the caller's process context or environment is not the zygote's"}


def test_stop_without_a_zygote_is_none(tmp_path: Path) -> None:
    assert zygote.stop(tmp_path / "absent.lock") is None
    (tmp_path / "free.lock").write_text("123\n")
    assert zygote.stop(tmp_path / "free.lock") is None  # no one holds it: no one to stop


def test_a_pipe_s_write_end_is_not_a_go_pipe(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call, _ = ask
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as pod:
        pod.bind(str(tmp_path / "p.sock"))
        pod.listen(1)
        r, w = os.pipe()
        try:
            answer, _ = call(_request(tmp_path), fds=[pod.fileno(), w])
        finally:
            os.close(r)
            os.close(w)
    assert answer == {"declined": "a request takes a listening unix socket and a pipe"}


def test_a_held_lock_counts_as_a_running_zygote(tmp_path: Path) -> None:
    """A zygote loading its code holds the lock before it listens: no second one is launched."""
    import fcntl

    lock = tmp_path / "z.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert not zygote.is_running(tmp_path / "none.sock", lock)
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert zygote.is_running(tmp_path / "none.sock", lock)
    finally:
        os.close(fd)


def test_stop_signals_only_a_zygote(tmp_path: Path) -> None:
    """A lock naming a pid that is not a zygote's (a stale one, reused by a pod's shim) gets no
    signal: stop waits and reports that the holder did not end."""
    import fcntl

    other = subprocess.Popen(["sleep", "30"])
    lock = tmp_path / "z.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{other.pid}\n".encode())
        with pytest.raises(OSError, match="did not end"):
            zygote.stop(lock, timeout=0.3)
        assert other.poll() is None
    finally:
        os.close(fd)
        other.kill()
        other.wait()
