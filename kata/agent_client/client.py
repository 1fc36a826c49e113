"""Typed calls of the guest agent's API (grpc.AgentService and grpc.Health) over one ttrpc connection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from kata import ttrpc
from kata.errors import KataError
from kata.protocols import agent_pb2 as pb
from kata.protocols import health_pb2 as hpb
from kata.protocols.agent_api import AGENT_SERVICE, HEALTH_SERVICE, LONG_POLL_METHODS

# The agent's answer to ReadStdout/ReadStderr once the stream has ended (gRPC's "read past end").
EOF_CODE = ttrpc.Code.OUT_OF_RANGE

R = TypeVar("R", bound=Message)
# The client's timeout, or none for a long-poll method (which waits as long as its process does).
_DEFAULT = -1.0


class AgentError(KataError):
    """An agent call failed; `code` is the ttrpc status code, str() is one line."""

    def __init__(self, method: str, code: ttrpc.Code, message: str) -> None:
        super().__init__(f"agent {method}: {code.name}: {message}")
        self.method = method
        self.code = code


class StreamEOF(Exception):
    """ReadStdout/ReadStderr: the process's stream has ended (no more data will come)."""


class AgentClient:
    def __init__(self, conn: ttrpc.Stream | ttrpc.Client, timeout: float | None = 60.0) -> None:
        """On a stream to the agent, or on a ttrpc connection already open (e.g. a monitor's proxy)."""
        self._client = conn if isinstance(conn, ttrpc.Client) else ttrpc.Client(conn)
        self.timeout = timeout

    @property
    def client(self) -> ttrpc.Client:
        """The ttrpc connection, for callers that share it (e.g. kata.agent_client.lite's relay calls)."""
        return self._client

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: str, req: Message, resp_type: type[R], timeout: float | None = _DEFAULT,
        service: str = AGENT_SERVICE,
    ) -> R:
        if timeout == _DEFAULT:
            timeout = None if service == AGENT_SERVICE and method in LONG_POLL_METHODS else self.timeout
        try:
            return self._client.call(service, method, req, resp_type, timeout=timeout)
        except ttrpc.TTRPCError as e:
            raise AgentError(method, e.code, e.message) from None

    # health ---------------------------------------------------------------------------------
    def check(self, timeout: float | None = _DEFAULT) -> hpb.HealthCheckResponse:
        return self._call("Check", hpb.CheckRequest(), hpb.HealthCheckResponse, timeout, HEALTH_SERVICE)

    def version(self) -> hpb.VersionCheckResponse:
        return self._call("Version", hpb.CheckRequest(), hpb.VersionCheckResponse, _DEFAULT, HEALTH_SERVICE)

    def wait_ready(self, timeout: float) -> None:
        """Health.Check until it answers (kata.agent_client.ready); AgentError once ``timeout`` has run out
        or the connection has closed."""
        from kata.agent_client.ready import wait_ready

        try:
            wait_ready(lambda t: self._client.call(HEALTH_SERVICE, "Check", hpb.CheckRequest(),
                                                   hpb.HealthCheckResponse, timeout=t), self._client, timeout)
        except ttrpc.TTRPCError as exc:
            why = exc.message if self._client.closed else f"not ready within {timeout:.1f}s ({exc.message})"
            raise AgentError("Check", exc.code, why) from None

    # sandbox --------------------------------------------------------------------------------
    def create_sandbox(
        self, *, sandbox_id: str, hostname: str = "", dns: Iterable[str] = (),
        storages: Iterable[pb.Storage] = (), sandbox_pidns: bool = False, guest_hook_path: str = "",
    ) -> Empty:
        req = pb.CreateSandboxRequest(sandbox_id=sandbox_id, hostname=hostname, dns=list(dns),
                                      storages=list(storages), sandbox_pidns=sandbox_pidns,
                                      guest_hook_path=guest_hook_path)
        return self._call("CreateSandbox", req, Empty)

    def destroy_sandbox(self, timeout: float | None = _DEFAULT) -> Empty:
        # The guest powers off right after answering; callers bound the wait with a short timeout.
        return self._call("DestroySandbox", pb.DestroySandboxRequest(), Empty, timeout)

    # containers -----------------------------------------------------------------------------
    def create_container(
        self, *, container_id: str, oci_spec_json: bytes, exec_id: str = "",
        storages: Iterable[pb.Storage] = (), pod_sysctls: Mapping[str, str] | None = None,
    ) -> Empty:
        req = pb.CreateContainerRequest(container_id=container_id, exec_id=exec_id,
                                        oci_spec_json=oci_spec_json, storages=list(storages),
                                        pod_sysctls=dict(pod_sysctls or {}))
        return self._call("CreateContainer", req, Empty)

    def start_container(self, *, container_id: str) -> Empty:
        return self._call("StartContainer", pb.StartContainerRequest(container_id=container_id), Empty)

    def remove_container(self, *, container_id: str, timeout: int = 0) -> Empty:
        req = pb.RemoveContainerRequest(container_id=container_id, timeout=timeout)
        return self._call("RemoveContainer", req, Empty)

    def exec_process(self, *, container_id: str, exec_id: str, oci_process_json: bytes) -> Empty:
        req = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id,
                                    oci_process_json=oci_process_json)
        return self._call("ExecProcess", req, Empty)

    def signal_process(self, *, container_id: str, signal: int, exec_id: str = "") -> Empty:
        req = pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id, signal=signal)
        return self._call("SignalProcess", req, Empty)

    def wait_process(self, *, container_id: str, exec_id: str = "") -> pb.WaitProcessResponse:
        """Blocks until the process exits: no deadline."""
        req = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        return self._call("WaitProcess", req, pb.WaitProcessResponse)

    def list_processes(
        self, *, container_id: str, format: str = "json", args: Iterable[str] = ()
    ) -> pb.ListProcessesResponse:
        req = pb.ListProcessesRequest(container_id=container_id, format=format, args=list(args))
        return self._call("ListProcesses", req, pb.ListProcessesResponse)

    def update_container(self, *, container_id: str, resources_json: bytes) -> Empty:
        req = pb.UpdateContainerRequest(container_id=container_id, resources_json=resources_json)
        return self._call("UpdateContainer", req, Empty)

    def stats_container(self, *, container_id: str) -> pb.StatsContainerResponse:
        req = pb.StatsContainerRequest(container_id=container_id)
        return self._call("StatsContainer", req, pb.StatsContainerResponse)

    def pause_container(self, *, container_id: str) -> Empty:
        return self._call("PauseContainer", pb.PauseContainerRequest(container_id=container_id), Empty)

    def resume_container(self, *, container_id: str) -> Empty:
        return self._call("ResumeContainer", pb.ResumeContainerRequest(container_id=container_id), Empty)

    # stdio ----------------------------------------------------------------------------------
    def write_stdin(self, *, container_id: str, data: bytes, exec_id: str = "") -> pb.WriteStreamResponse:
        """Blocks until the process has room for ``data`` in its stdin: no deadline."""
        req = pb.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data)
        return self._call("WriteStdin", req, pb.WriteStreamResponse)

    def _read(self, method: str, container_id: str, exec_id: str, length: int) -> pb.ReadStreamResponse:
        req = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=length)
        try:
            # Blocks until the process writes: no deadline.
            return self._call(method, req, pb.ReadStreamResponse)
        except AgentError as e:
            if e.code == EOF_CODE:
                raise StreamEOF(f"{method} {container_id}/{exec_id or 'init'}: end of stream") from None
            raise

    def read_stdout(
        self, *, container_id: str, exec_id: str = "", length: int = 32768
    ) -> pb.ReadStreamResponse:
        """The next chunk of stdout (or the tty's output); raises StreamEOF at the end."""
        return self._read("ReadStdout", container_id, exec_id, length)

    def read_stderr(
        self, *, container_id: str, exec_id: str = "", length: int = 32768
    ) -> pb.ReadStreamResponse:
        """The next chunk of stderr; raises StreamEOF at the end (at once for a tty process)."""
        return self._read("ReadStderr", container_id, exec_id, length)

    def close_stdin(self, *, container_id: str, exec_id: str = "") -> Empty:
        req = pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id)
        return self._call("CloseStdin", req, Empty)

    def tty_win_resize(self, *, container_id: str, row: int, column: int, exec_id: str = "") -> Empty:
        req = pb.TtyWinResizeRequest(container_id=container_id, exec_id=exec_id, row=row, column=column)
        return self._call("TtyWinResize", req, Empty)

    # networking -----------------------------------------------------------------------------
    def update_interface(self, *, interface: pb.Interface) -> pb.Interface:
        return self._call("UpdateInterface", pb.UpdateInterfaceRequest(interface=interface), pb.Interface)

    def update_routes(self, *, routes: Iterable[pb.Route]) -> pb.Routes:
        req = pb.UpdateRoutesRequest(routes=pb.Routes(routes=list(routes)))
        return self._call("UpdateRoutes", req, pb.Routes)

    # guest resources ------------------------------------------------------------------------
    def get_guest_details(
        self, *, mem_block_size: bool = True, mem_hotplug_probe: bool = True
    ) -> pb.GuestDetailsResponse:
        req = pb.GetGuestDetailsRequest(mem_block_size=mem_block_size, mem_hotplug_probe=mem_hotplug_probe)
        return self._call("GetGuestDetails", req, pb.GuestDetailsResponse)

    def set_guest_date_time(self, *, sec: int, usec: int) -> Empty:
        return self._call("SetGuestDateTime", pb.SetGuestDateTimeRequest(sec=sec, usec=usec), Empty)

    def reseed_random_dev(self, *, data: bytes) -> Empty:
        return self._call("ReseedRandomDev", pb.ReseedRandomDevRequest(data=data), Empty)

    def release_free_memory(self, *, timeout: float | None = _DEFAULT) -> pb.ReleaseFreeMemoryResponse:
        """Before a template's snapshot: the guest drops its caches and zeroes its free pages."""
        return self._call("ReleaseFreeMemory", pb.ReleaseFreeMemoryRequest(), pb.ReleaseFreeMemoryResponse,
                          timeout=timeout)

    def warm_up(self, *, timeout: float | None = _DEFAULT) -> Empty:
        """For a VM restored to be kept warm: the guest runs its warm-up container once more."""
        return self._call("WarmUp", pb.WarmUpRequest(), Empty, timeout=timeout)

    def get_oom_event(self) -> pb.OOMEvent:
        """Blocks until a container is killed for lack of memory: no deadline."""
        return self._call("GetOOMEvent", pb.GetOOMEventRequest(), pb.OOMEvent)

    def get_metrics(self) -> pb.Metrics:
        """The guest's figures as it sends them: unchecked (kata.metrics.guest checks them)."""
        return self._call("GetMetrics", pb.GetMetricsRequest(), pb.Metrics)

    def online_cpu_mem(self, *, wait: bool = False, nb_cpus: int = 0, cpu_only: bool = False,
                       mem_mib: int = 0) -> Empty:
        req = pb.OnlineCPUMemRequest(wait=wait, nb_cpus=nb_cpus, cpu_only=cpu_only, mem_mib=mem_mib)
        return self._call("OnlineCPUMem", req, Empty)

    # port forwarding ------------------------------------------------------------------------
    def port_forward_connect(self, *, conn_id: int, port: int, ipv6: bool = False,
                             timeout: float | None = _DEFAULT) -> Empty:
        """The agent dials ``port`` on the guest's loopback (``ipv6``: ::1 first) as ``conn_id``."""
        req = pb.PortForwardConnectRequest(conn_id=conn_id, port=port,
                                           family=pb.IPFamily.v6 if ipv6 else pb.IPFamily.v4)
        return self._call("PortForwardConnect", req, Empty, timeout)

    def port_forward_write(self, *, conn_id: int, data: bytes) -> pb.WriteStreamResponse:
        """Blocks until the guest's server has room for ``data``: no deadline."""
        req = pb.PortForwardWriteRequest(conn_id=conn_id, data=data)
        return self._call("PortForwardWrite", req, pb.WriteStreamResponse)

    def port_forward_read(self, *, conn_id: int, length: int) -> bytes:
        """The next bytes the guest's server sent, at most ``length`` (more is the agent's error);
        StreamEOF once it has closed its end. Blocks until it sends: no deadline."""
        req = pb.PortForwardReadRequest(conn_id=conn_id, len=length)
        try:
            data = self._call("PortForwardRead", req, pb.ReadStreamResponse).data
        except AgentError as e:
            if e.code == EOF_CODE:
                raise StreamEOF(f"PortForwardRead {conn_id}: end of stream") from None
            raise
        if len(data) > length:
            raise AgentError("PortForwardRead", ttrpc.Code.INTERNAL,
                             f"{len(data)} bytes for a read of at most {length}")
        return data

    def port_forward_close(self, *, conn_id: int, write_only: bool = False,
                           timeout: float | None = _DEFAULT) -> Empty:
        req = pb.PortForwardCloseRequest(conn_id=conn_id, write_only=write_only)
        return self._call("PortForwardClose", req, Empty, timeout)
