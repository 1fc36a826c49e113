"""What one sandbox reports, and its endpoint: the one piece the shim (a pod) and the runc path's init
monitor (a container) both run, each with its own processes and agent connection."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from kata.agent_client.lite import LiteAgent
from kata.metrics import MetricsError
from kata.metrics.endpoint import Endpoint
from kata.sandbox.paths import SandboxPaths
from kata.utils.process import ProcessId


def socket_path(sid: str) -> Path:
    """Where sandbox ``sid`` serves its metrics (the id is checked here)."""
    return SandboxPaths(sid).metrics_socket


class SandboxMetrics:
    """The figures of the processes in ``processes`` (by kind: hypervisor, virtiofsd; this process is
    the "shim") and of the guest, through whatever agent connection ``agent()`` gives at the time."""

    def __init__(self, processes: Mapping[str, Sequence[ProcessId]],
                 agent: Callable[[], LiteAgent | None]) -> None:
        me = ProcessId.of(os.getpid())
        self.processes = {**processes, "shim": [me] if me is not None else []}
        self._agent = agent

    def render(self) -> bytes:
        from kata.metrics import families, guest, host

        agent = self._agent()
        if agent is None or agent.client.closed:
            raise MetricsError("the sandbox's agent is not connected")
        return families.render(host.gather(self.processes), guest.fetch(agent))


def serve(sid: str, processes: Mapping[str, Sequence[ProcessId]], agent: Callable[[], LiteAgent | None]
          ) -> Endpoint:
    """Start serving sandbox ``sid``'s metrics on its socket; the caller closes the endpoint."""
    endpoint = Endpoint(socket_path(sid), SandboxMetrics(processes, agent).render)
    endpoint.start()
    return endpoint
