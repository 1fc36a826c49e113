"""The debug console without a VM: its frames, the VM's wiring, and the guest's sessions served on a
unix socket (the vsock case: a connection per session) to the host's relay, with real shells."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.agent_client.console import ConsoleError, Session
from kata.factory.template import template_key
from kata.hypervisor.base import VMConfig
from kata.hypervisor.qemu_argv import Vsock, build_argv, kernel_cmdline
from kata.protocols import debug_console as proto
from kata.protocols.agent_api import AgentEndpoint
from tests.conftest import config_with, process_gone

# ---- frames ------------------------------------------------------------------------------------


def test_frames_round_trip_whatever_the_chunking() -> None:
    stream = (proto.open_frame(24, 80, True, "xterm-256color") + proto.data_frames(b"x" * 40000)
              + proto.resize_frame(50, 132) + proto.frame(proto.EOF))
    decoder = proto.Decoder(proto.HOST_KINDS)
    frames = []
    for i in range(0, len(stream), 7):
        frames += decoder.feed(stream[i:i + 7])
    assert decoder.pending == 0
    kinds = [k for k, _ in frames]
    assert kinds == [proto.OPEN, proto.DATA, proto.DATA, proto.DATA, proto.RESIZE, proto.EOF]
    assert proto.parse_open(frames[0][1]) == (24, 80, True, "xterm-256color")
    assert b"".join(p for k, p in frames if k == proto.DATA) == b"x" * 40000
    assert proto.parse_resize(frames[4][1]) == (50, 132)
    assert proto.parse_exited(proto.Decoder(proto.GUEST_KINDS).feed(proto.exited_frame(130))[0][1]) == 130


def test_a_hostile_stream_is_refused_before_it_is_held() -> None:
    # A length over the bound is refused at its header, not after the payload was buffered.
    with pytest.raises(proto.ProtocolError, match="exceeds"):
        proto.Decoder(proto.GUEST_KINDS).feed(proto.HEADER.pack(proto.DATA, proto.MAX_PAYLOAD + 1))
    # The guest may not send what only the host sends.
    with pytest.raises(proto.ProtocolError, match="kind"):
        proto.Decoder(proto.GUEST_KINDS).feed(proto.resize_frame(1, 1))
    with pytest.raises(proto.ProtocolError):
        proto.parse_exited(b"")
    with pytest.raises(proto.ProtocolError):
        proto.parse_open(b"\0" * 100)
    # A TERM with control characters does not reach the shell's environment.
    assert proto.parse_open(proto.open_frame(1, 1, False, "xterm\x1b]0;x")[3:])[3] == ""
    decoder = proto.Decoder(proto.GUEST_KINDS)
    decoder.feed(proto.HEADER.pack(proto.DATA, proto.MAX_PAYLOAD) + b"y" * 100)
    assert decoder.pending == proto.HEADER.size + 100


# ---- the VM's wiring -------------------------------------------------------------------------

RUN = Path("/run/vc/vm/sb1")


def vm(**over: object) -> VMConfig:
    base = VMConfig(
        id="sb1", hypervisor_path=Path("/usr/bin/qemu-system-x86_64"), kernel=Path("/k/vmlinux"),
        image=Path("/k/root.img"), initrd=None, kernel_params=("quiet",), vcpus=1, max_vcpus=1,
        memory_mib=512, max_memory_mib=512, machine_type="microvm", accel="tcg",
        agent_channel="virtio-serial", run_dir=RUN)
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def test_the_console_gets_a_port_of_its_own_only_when_enabled() -> None:
    off = build_argv(vm())
    assert "console.sock" not in " ".join(off) and proto.SERIAL_PORT_NAME not in " ".join(off)
    assert proto.KERNEL_PARAM not in kernel_cmdline(vm(), vsock=False).split()

    on = build_argv(vm(debug_console=True))
    chardevs = [on[i + 1] for i, a in enumerate(on) if a == "-chardev"]
    assert f"socket,id=dbgcon,path={RUN}/console.sock,server=on,wait=off" in chardevs
    assert f"virtserialport,bus=vser0.0,chardev=dbgcon,name={proto.SERIAL_PORT_NAME}" in on
    # Room for both ports (number 0 is kept for a console), and no more: each costs guest memory.
    assert any(a.endswith(",id=vser0,max_ports=3") for a in on)
    assert any(a.endswith(",id=vser0,max_ports=2") for a in off)
    # The agent's own port is still there, unchanged.
    assert f"socket,id=agent,path={RUN}/agent.sock,server=on,wait=off" in chardevs
    params = kernel_cmdline(vm(debug_console=True), vsock=False).split()
    assert proto.KERNEL_PARAM in params and not any(p.startswith(proto.VPORT_PARAM) for p in params)


def test_on_vsock_the_console_is_a_port_of_the_same_device() -> None:
    argv = build_argv(vm(debug_console=True, agent_channel="vsock"), vsock=Vsock(cid=7))
    assert "console.sock" not in " ".join(argv)
    params = kernel_cmdline(vm(debug_console=True), vsock=True).split()
    assert f"{proto.VPORT_PARAM}={proto.VSOCK_PORT}" in params


def test_only_the_driver_turns_the_guest_console_on() -> None:
    # kernel_params (or an annotation allowed to add to them) cannot open a shell the host did not wire.
    sneaky = ("quiet", proto.KERNEL_PARAM, f"{proto.VPORT_PARAM}=1026")
    params = kernel_cmdline(vm(kernel_params=sneaky), vsock=True).split()
    assert proto.KERNEL_PARAM not in params and f"{proto.VPORT_PARAM}=1026" not in params
    assert "quiet" in params


def test_a_console_vm_has_a_template_of_its_own(tmp_path: Path) -> None:
    kernel, image = tmp_path / "vmlinux", tmp_path / "image"
    kernel.write_bytes(b"k")
    image.write_bytes(b"i")
    base = vm(kernel=kernel, image=image, hypervisor_path=Path("/bin/sh"))
    assert template_key(base) != template_key(dataclasses.replace(base, debug_console=True))


def test_config_key_is_katas_and_off_by_default(tmp_path: Path) -> None:
    from kata.config import load_config
    from kata.config.load import PACKAGED_CONFIG

    assert load_config(PACKAGED_CONFIG).agent.debug_console_enabled is False
    cfg = load_config(config_with(tmp_path, {"agent.kata": {"debug_console_enabled": True}}))
    assert cfg.agent.debug_console_enabled is True
    (tmp_path / "bad.toml").write_text('[hypervisor.qemu]\n[agent.kata]\ndebug_console_enabled = "yes"\n')
    with pytest.raises(Exception, match="debug_console_enabled: must be a bool"):
        load_config(tmp_path / "bad.toml")


# ---- sessions: the guest's code serving real shells, the host's relay --------------------------

# The guest side in an interpreter of its own: its reaper calls waitpid(-1), which would take the
# children of the pytest process. A connection per session, as on vsock.
GUEST = """
    import os, socket, sys
    from kata.guest.agent import debug_console
    from kata.guest.agent.reaper import Reaper
    debug_console.SHELLS = ("/bin/sh",)  # the host's: the test does not depend on bash's start-up
    reaper = Reaper(); reaper.start()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[1]); listener.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setblocking(False)
            debug_console.Session(conn.fileno(), reaper).run()
"""


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[AgentEndpoint]:
    path = str(tmp_path / "console.sock")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GUEST), path], stdout=subprocess.PIPE,
                            env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield AgentEndpoint(kind="serial", path=path)
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def piped(endpoint: AgentEndpoint, script: bytes) -> tuple[int, bytes]:
    """A piped session fed ``script``: (status, output)."""
    session = Session.open(endpoint, "test", rows=0, cols=0, tty=False, term="", timeout=10)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, script)
    os.close(in_w)
    try:
        status = session.relay(in_r, out_w)
    finally:
        session.close()
        os.close(in_r)
        os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        return status, f.read()


def test_a_piped_session_runs_a_script_and_ends_with_its_input(guest: AgentEndpoint) -> None:
    status, out = piped(guest, b"echo hello $((6*7))\nls /nonexistent-x 2>&1 | wc -l\nexit 3\n")
    assert (status, out) == (3, b"hello 42\n1\n")
    # No exit in the script: the end of our input is the end of the shell's.
    assert piped(guest, b"echo last; false\n") == (1, b"last\n")
    # Sessions follow each other on the same channel.
    assert piped(guest, b"[ -t 0 ] || echo no-tty\n") == (0, b"no-tty\n")


def test_a_terminal_session_runs_on_a_pty_of_the_asked_size(guest: AgentEndpoint) -> None:
    session = Session.open(guest, "test", rows=33, cols=101, tty=True, term="xterm", timeout=10)
    host_master, host_slave = os.openpty()  # stands for the operator's terminal, raw as the command sets it
    tty.setraw(host_slave)
    in_r, in_w = os.pipe()
    os.write(in_w, b"stty size; tty; echo $TERM; exit 5\r")
    out = b""
    try:
        status = session.relay(in_r, host_slave)
        while select.select([host_master], [], [], 0.5)[0]:  # a pty hands its buffer over in pieces
            out += os.read(host_master, 65536)
    finally:
        session.close()
        for fd in (in_r, in_w, host_slave, host_master):
            os.close(fd)
    assert status == 5
    assert b"33 101\r\n" in out and b"/dev/pts/" in out and b"xterm\r\n" in out


def test_when_the_host_goes_the_shell_and_its_session_go(guest: AgentEndpoint) -> None:
    session = Session.open(guest, "test", rows=0, cols=0, tty=True, term="", timeout=10)
    host_master, host_slave = os.openpty()
    try:
        session.sock.sendall(proto.data_frames(b"sleep 1000 & echo PI''DS $$ $!\r"))
        out = b""
        deadline = time.monotonic() + 10
        decoder = proto.Decoder(proto.GUEST_KINDS)
        while b"\r\n" not in out.partition(b"PIDS ")[2]:  # the output, not the echo of the line
            assert time.monotonic() < deadline, out
            session.sock.settimeout(max(0.1, deadline - time.monotonic()))
            out += b"".join(p for k, p in decoder.feed(session.sock.recv(4096)) if k == proto.DATA)
        shell, job = (int(w) for w in out.split(b"PIDS ")[-1].split()[:2])
        assert not process_gone(shell) and not process_gone(job)
    finally:
        session.close()
        os.close(host_master)
        os.close(host_slave)
    deadline = time.monotonic() + 10
    while not (process_gone(shell) and process_gone(job)):
        assert time.monotonic() < deadline, "the shell or its job outlived the host's session"
        time.sleep(0.05)
    # The next host gets a fresh shell.
    assert piped(guest, b"echo again\n") == (0, b"again\n")


def test_a_session_that_does_not_open_properly_is_dropped(guest: AgentEndpoint) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(guest.path)
        sock.sendall(proto.data_frames(b"echo not-opened\n"))
        sock.settimeout(10)
        assert sock.recv(100) == b""  # the guest hung up, having started nothing
    assert piped(guest, b"echo fine\n") == (0, b"fine\n")


def test_a_guest_that_breaks_the_protocol_ends_the_session(tmp_path: Path) -> None:
    path = str(tmp_path / "fake.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        pid = os.fork()
        if pid == 0:  # a hostile guest: starts, then announces a frame far over the bound
            conn, _ = listener.accept()
            conn.recv(100)
            conn.sendall(proto.frame(proto.STARTED) + proto.HEADER.pack(proto.DATA, 0xFFFF))
            conn.recv(100)
            os._exit(0)
        r, w = os.pipe()
        try:
            # Whether the bad header comes with STARTED or after it, the session ends in one line.
            with pytest.raises(ConsoleError, match="broke the protocol: frame of 65535 bytes exceeds"):
                session = Session.open(AgentEndpoint(kind="serial", path=path), "test", rows=0, cols=0,
                                       tty=False, term="", timeout=10)
                try:
                    session.relay(r, w)
                finally:
                    session.close()
        finally:
            os.close(r)
            os.close(w)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_console_nobody_answers_times_out_in_one_line(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as listener:  # accepts nothing, as a port held by another host
        listener.bind(path)
        listener.listen(1)
        with pytest.raises(ConsoleError, match="did not start a shell within 0.5s"):
            Session.open(AgentEndpoint(kind="serial", path=path), "sandbox x", rows=0, cols=0, tty=False,
                         term="", timeout=0.5)
    with pytest.raises(ConsoleError, match="cannot connect"):
        Session.open(AgentEndpoint(kind="serial", path=path), "sandbox x", rows=0, cols=0, tty=False, term="")
