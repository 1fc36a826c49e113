"""The agent's ttrpc services in-process over a socketpair, with the real ttrpc Server and AgentClient."""

from __future__ import annotations

import ast
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata import ttrpc
from kata.agent_client.client import AgentClient, AgentError, StreamEOF
from kata.guest.agent.reaper import Exit
from kata.guest.agent.sandbox import Process, Sandbox
from kata.guest.agent.stdio import Stdio
from tests.unit.guest_fakes import agent_server, close_processes, serve_on_socketpair
from tests.unit.guest_fakes import fake_process as _fake_process


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentClient, Sandbox]]:
    server, sandbox = agent_server(tmp_path, max_workers=8)
    host, guest = serve_on_socketpair(server)
    client = AgentClient(host, timeout=10.0)
    try:
        yield client, sandbox
    finally:
        client.close()
        server.shutdown()
        guest.close()
        close_processes(sandbox)


def test_health_and_version(agent: tuple[AgentClient, Sandbox]) -> None:
    client, _ = agent
    client.wait_ready(5.0)
    assert client.check().status == 1  # SERVING
    assert client.version().agent_version


def test_guest_details(agent: tuple[AgentClient, Sandbox]) -> None:
    client, _ = agent
    details = client.get_guest_details()
    assert details.agent_details.version
    assert "virtio-fs" in details.agent_details.storage_handlers
    if os.path.exists("/sys/devices/system/memory/block_size_bytes"):
        assert details.mem_block_size_bytes > 0


def test_unknown_container_is_not_found(agent: tuple[AgentClient, Sandbox]) -> None:
    client, _ = agent
    for call in (
        lambda: client.start_container(container_id="nope"),
        lambda: client.wait_process(container_id="nope"),
        lambda: client.read_stdout(container_id="nope"),
        lambda: client.signal_process(container_id="nope", signal=9),
        lambda: client.remove_container(container_id="nope"),
    ):
        with pytest.raises(AgentError) as err:
            call()
        assert err.value.code == ttrpc.Code.NOT_FOUND
        assert "\n" not in str(err.value)


def test_bad_spec_is_invalid_argument(agent: tuple[AgentClient, Sandbox]) -> None:
    client, _ = agent
    with pytest.raises(AgentError) as err:
        client.create_container(container_id="c1", oci_spec_json=b"{not json")
    assert err.value.code == ttrpc.Code.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", ["", "..", "../c1", "a/b", "caf\u00e9", "x" * 129])
def test_ids_the_guest_builds_paths_from_are_checked(agent: tuple[AgentClient, Sandbox], bad: str) -> None:
    """The bundle is run_dir/<container id>, an exec's files exec-<exec id>.json/.pid in it."""
    client, sandbox = agent
    _, fds = _fake_process(sandbox)
    spec = b'{"process": {"args": ["true"]}}'
    for call in (lambda: client.create_container(container_id=bad, oci_spec_json=spec),
                 lambda: client.exec_process(container_id="c1", exec_id=bad, oci_process_json=spec)):
        with pytest.raises(AgentError) as err:
            call()
        assert err.value.code == ttrpc.Code.INVALID_ARGUMENT and "id" in str(err.value)
    assert list(sandbox.containers) == ["c1"] and os.listdir(sandbox.run_dir) == []
    for fd in fds:
        os.close(fd)


def test_the_guest_image_has_every_module_its_code_imports() -> None:
    """The guest image carries RootfsSpec.guest_code only: a kata module the guest's code imports
    beyond it (say a new shared helper), even inside a function, would fail the agent in the VM, far
    from the change that caused it. Every import of every shipped file is read, as the AST has it."""
    from kata.osbuilder.rootfs import RootfsSpec, guest_code_files

    root = Path(__file__).resolve().parents[2]
    shipped = {rel for rel, _ in guest_code_files(RootfsSpec(), root)}

    def module_file(name: str) -> str | None:
        rel = name.replace(".", "/")
        return next((f for f in (f"{rel}.py", f"{rel}/__init__.py") if (root / f).exists()), None)

    for rel in sorted(shipped):
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                found = module_file(name) if name.split(".")[0] == "kata" else None
                assert found is None or found in shipped, f"{rel} imports {name}, which the image lacks"


def test_crun_failure_is_internal_and_cleans_up(agent: tuple[AgentClient, Sandbox]) -> None:
    client, sandbox = agent
    with pytest.raises(AgentError) as err:
        client.create_container(container_id="c1", oci_spec_json=b'{"process": {"args": ["true"]}}')
    assert err.value.code == ttrpc.Code.INTERNAL
    assert "c1" not in sandbox.containers


def test_networking_without_backend_is_unimplemented(agent: tuple[AgentClient, Sandbox]) -> None:
    client, _ = agent
    with pytest.raises(AgentError) as err:
        client.update_routes(routes=[])
    assert err.value.code == ttrpc.Code.UNIMPLEMENTED


def test_stdout_stderr_then_eof(agent: tuple[AgentClient, Sandbox]) -> None:
    client, sandbox = agent
    _, (in_r, out_w, err_w) = _fake_process(sandbox)
    os.write(out_w, b"hello")
    assert client.read_stdout(container_id="c1").data == b"hello"
    os.write(err_w, b"oops")
    assert client.read_stderr(container_id="c1").data == b"oops"
    os.close(out_w)
    os.close(err_w)
    with pytest.raises(StreamEOF):
        client.read_stdout(container_id="c1")
    with pytest.raises(StreamEOF):
        client.read_stderr(container_id="c1")
    os.close(in_r)


def test_stdin_write_and_close(agent: tuple[AgentClient, Sandbox]) -> None:
    client, sandbox = agent
    _, (in_r, out_w, err_w) = _fake_process(sandbox)
    assert client.write_stdin(container_id="c1", data=b"abc").len == 3
    assert os.read(in_r, 10) == b"abc"
    client.close_stdin(container_id="c1")
    assert os.read(in_r, 10) == b""  # EOF reaches the child
    with pytest.raises(AgentError) as err:
        client.write_stdin(container_id="c1", data=b"x")
    assert err.value.code == ttrpc.Code.FAILED_PRECONDITION
    for fd in (in_r, out_w, err_w):
        os.close(fd)


def test_wait_process_blocks_until_exit(agent: tuple[AgentClient, Sandbox]) -> None:
    client, sandbox = agent
    proc, fds = _fake_process(sandbox)
    threading.Timer(0.2, proc.exit.set, args=(137,)).start()
    assert client.wait_process(container_id="c1").status == 137
    # Signalling an exited process is not an error (the shim does it routinely).
    client.signal_process(container_id="c1", signal=9)
    with pytest.raises(AgentError) as err:
        client.tty_win_resize(container_id="c1", row=24, column=80)
    assert err.value.code == ttrpc.Code.FAILED_PRECONDITION
    for fd in fds:
        os.close(fd)


def test_unknown_exec_is_not_found(agent: tuple[AgentClient, Sandbox]) -> None:
    client, sandbox = agent
    _, fds = _fake_process(sandbox)
    with pytest.raises(AgentError) as err:
        client.wait_process(container_id="c1", exec_id="e1")
    assert err.value.code == ttrpc.Code.NOT_FOUND
    for fd in fds:
        os.close(fd)


def test_crun_errors_in_runc_words() -> None:
    from kata.guest.agent.crun import runc_wording

    crun = "executable file `nonexistentcmd` not found in $PATH: No such file or directory"
    assert runc_wording(crun) == 'exec: "nonexistentcmd": executable file not found in $PATH'
    assert runc_wording("mount failed: EBUSY") == "mount failed: EBUSY"


def test_wait_ready_ends_at_once_when_the_connection_closes() -> None:
    """A VMM that dies while the host waits for its agent closes the connection: the wait ends then,
    not at its deadline (it used to spin on the closed client until boot_timeout)."""
    import time

    host, guest = socket.socketpair()
    client = AgentClient(ttrpc.socket_stream(host), timeout=10.0)
    guest.close()
    t0 = time.monotonic()
    with pytest.raises(AgentError, match="UNAVAILABLE"):  # closed by the peer, or a write that failed
        client.wait_ready(20.0)
    assert time.monotonic() - t0 < 5.0
    client.close()


def test_a_finished_exec_gives_back_its_descriptors(agent: tuple[AgentClient, Sandbox]) -> None:
    """An exec whose output was read to its end and whose status was taken is forgotten at the next
    exec: the agent keeps no descriptor of it (thousands of execs ran the agent out of them)."""
    client, sandbox = agent
    _fake_process(sandbox)
    container = sandbox.containers["c1"]
    before = len(os.listdir("/proc/self/fd"))
    for n in range(50):
        stdio = Stdio.pipes()
        child = stdio.child_fds()
        stdio._child = []
        container.execs[f"e{n}"] = Process(exec_id=f"e{n}", pid=999990, exit=Exit(999990), stdio=stdio,
                                           terminal=False)
        os.write(child[1], b"out")
        for fd in child:
            os.close(fd)  # the process ends: its ends of the pipes close
        assert client.read_stdout(container_id="c1", exec_id=f"e{n}").data == b"out"
        for read in (client.read_stdout, client.read_stderr):
            with pytest.raises(StreamEOF):
                read(container_id="c1", exec_id=f"e{n}")
        container.execs[f"e{n}"].exit.set(0)
        assert client.wait_process(container_id="c1", exec_id=f"e{n}").status == 0
        sandbox._forget_finished_execs(container)  # what the next ExecProcess does first
    assert container.execs == {}
    assert len(os.listdir("/proc/self/fd")) <= before


def test_free_memory_is_released_only_before_a_sandbox(agent: tuple[AgentClient, Sandbox]) -> None:
    """ReleaseFreeMemory briefly takes all the guest's free memory: a template's guest only."""
    client, sandbox = agent
    sandbox.id = "sb1"
    with pytest.raises(AgentError) as err:
        client.release_free_memory()
    assert err.value.code == ttrpc.Code.INVALID_ARGUMENT and "sandbox" in str(err.value)
