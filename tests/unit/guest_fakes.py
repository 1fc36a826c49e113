"""The real agent service in-process, over the real ttrpc Server, with container processes the test plays:
real pipes, no real child (the reaper thread never starts: waitpid(-1) would steal other tests' children)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from kata import ttrpc
from kata.guest.agent.crun import Crun
from kata.guest.agent.reaper import Exit, Reaper
from kata.guest.agent.sandbox import Container, Process, Sandbox
from kata.guest.agent.service import AgentService
from kata.guest.agent.stdio import Stdio


def agent_server(run_dir: Path, max_workers: int = 32) -> tuple[ttrpc.Server, Sandbox]:
    """The agent's services on a Server with the agent's own pool size by default."""
    reaper = Reaper()
    sandbox = Sandbox(reaper, Crun(reaper, binary="/nonexistent/crun"), run_dir=str(run_dir))
    server = ttrpc.Server(max_workers=max_workers)
    AgentService(sandbox).register(server)
    return server, sandbox


def serve_on_socketpair(server: ttrpc.Server) -> tuple[ttrpc.Stream, socket.socket]:
    """A connection to ``server``: (the host's stream, the guest's socket, to close after shutdown)."""
    host, guest = socket.socketpair()
    threading.Thread(target=server.serve, args=(ttrpc.socket_stream(guest),), daemon=True).start()
    return ttrpc.socket_stream(host), guest


def close_processes(sandbox: Sandbox) -> None:
    """Close the agent's ends of every process's stdio (the test closes the ends it played)."""
    for container in sandbox.containers.values():
        for proc in [container.init, *container.execs.values()]:
            if proc is not None:
                proc.stdio.close()


def fake_process(sandbox: Sandbox, cid: str = "c1") -> tuple[Process, tuple[int, int, int]]:
    """A container whose init has real pipes but no real child: the test plays the child with the
    returned (stdin read end, stdout write end, stderr write end), and ends it with proc.exit.set()."""
    stdio = Stdio.pipes()
    child = stdio.child_fds()
    stdio._child = []  # the test owns the child ends now
    proc = Process(exec_id="", pid=999999, exit=Exit(999999), stdio=stdio, terminal=False)
    sandbox.containers[cid] = Container(id=cid, bundle="/nonexistent", spec={}, init=proc)
    return proc, child
