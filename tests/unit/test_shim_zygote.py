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
    proc = subprocess.Popen(["nice", "-n", "5", "sleep", "30"])
    try:
        time.sleep(0.2)
        theirs = zygote.process_context(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert {k for k in mine if mine[k] != theirs[k]} == {"nice"}


def test_without_a_zygote_start_forks_the_shim_itself(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        assert zygote.fork_shim(["shim"], tmp_path, listener, path=tmp_path / "none.sock") is None
    assert not zygote.is_running(tmp_path / "none.sock")


@pytest.fixture
def ask(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Send one request over a socket pair to a Zygote object in this process; its answer, and
    whether it would go on serving."""
    server = listen_private(str(tmp_path / "z.sock"), 4, socket.SOCK_SEQPACKET)
    z = zygote.Zygote(server, wake_fd=-1)

    def call(request: dict[str, object], with_fd: bool = True) -> tuple[dict[str, object], bool]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            data = json.dumps(request).encode()
            if with_fd:
                socket.send_fds(ours, [data], [listener.fileno()])
            else:
                ours.send(data)
            going_on = z.handle(theirs)
            return json.loads(ours.recv(4096)), going_on

    yield z, call
    server.close()


def _request(tmp_path: Path, **changes: object) -> dict[str, object]:
    request: dict[str, object] = {"argv": ["containerd-shim-kata-v2", "-id", "x", "start"],
                                  "env": dict(os.environ), "cwd": str(tmp_path),
                                  "deadline": time.monotonic() + 30}
    request.update(changes)
    return request


def test_a_request_without_a_listener_is_declined(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call = ask
    assert call(_request(tmp_path), with_fd=False) == ({"declined": "not root, or no listener"}, True)


def test_a_malformed_request_is_declined(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call = ask
    answer, going_on = call(_request(tmp_path, argv="containerd-shim-kata-v2 start"))
    assert answer == {"declined": "malformed request"} and going_on
    answer, going_on = call({"argv": []})
    assert "declined" in answer and going_on


def test_a_zygote_whose_code_changed_declines_and_ends(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    z, call = ask
    z.stamp = {**z.stamp, "python": ("/elsewhere/python3", 0, 0)}
    assert call(_request(tmp_path)) == ({"declined": "the zygote's code was replaced"}, False)


def test_a_pod_whose_configuration_turns_it_off_is_declined(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call = ask
    conf = config_with(tmp_path, {"runtime": {"shim_zygote": False}})
    env = {**os.environ, "KATA_CONF_FILE": str(conf)}
    answer, going_on = call(_request(tmp_path, env=env))
    assert answer == {"declined": "shim_zygote is off in the pod's configuration"} and going_on


def test_a_request_past_its_deadline_is_declined(ask, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, call = ask
    assert call(_request(tmp_path, deadline=time.monotonic() - 1)) == ({"declined": "too late"}, True)


def test_a_caller_in_another_context_is_declined(tmp_path: Path) -> None:
    """A caller that differs (here only by its nice value) is not served: its shim would not be
    the one `start` forks."""
    path = tmp_path / "z.sock"
    server = listen_private(str(path), 4, socket.SOCK_SEQPACKET)
    caller = ("import sys; from pathlib import Path; import socket; from kata.shim import zygote\n"
              "with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as l:\n"
              f"    print(zygote.fork_shim(['shim', 'start'], Path('/'), l, path=Path({str(path)!r})))")
    proc = subprocess.Popen(["nice", "-n", "5", sys.executable, "-c", caller], stdout=subprocess.PIPE,
                            text=True)
    try:
        z = zygote.Zygote(server, wake_fd=-1)
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            assert z.handle(conn)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    assert out.strip() == "None"


def test_stop_without_a_zygote_is_none(tmp_path: Path) -> None:
    assert zygote.stop(tmp_path / "absent.lock") is None
    (tmp_path / "free.lock").write_text("123\n")
    assert zygote.stop(tmp_path / "free.lock") is None  # no one holds it: no one to stop
