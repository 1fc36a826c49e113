"""The ttrpc services of the agent: grpc.AgentService and grpc.Health, mapped onto the Sandbox."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2

import kata
from kata import ttrpc
from kata.guest.agent import log
from kata.guest.agent.crun import CrunError
from kata.guest.agent.sandbox import AlreadyExists, InvalidArgument, NotFound, Sandbox
from kata.guest.agent.stdio import EndOfStream
from kata.guest.agent.sysctl import set_sysctls
from kata.protocols import agent_pb2 as pb
from kata.protocols import health_pb2 as hpb
from kata.protocols.agent_api import AGENT_SERVICE, HEALTH_SERVICE, LONG_POLL_METHODS

if TYPE_CHECKING:
    from kata.guest.agent.warmup import Warmup

API_VERSION = "0.0.1"
SANDBOX_RUN_DIR = "/run/kata-containers/sandbox"
# The agent's answer to a read once a stream has ended; the client turns it into StreamEOF.
EOF_CODE = ttrpc.Code.OUT_OF_RANGE
EOF_MESSAGE = "EOF"

_ERROR_CODES: list[tuple[type[BaseException], ttrpc.Code]] = [
    (NotFound, ttrpc.Code.NOT_FOUND),
    (AlreadyExists, ttrpc.Code.ALREADY_EXISTS),
    (InvalidArgument, ttrpc.Code.INVALID_ARGUMENT),
    (ValueError, ttrpc.Code.INVALID_ARGUMENT),
    (CrunError, ttrpc.Code.INTERNAL),
    (OSError, ttrpc.Code.INTERNAL),
]

Handler = Callable[[ttrpc.Context, Any], Any]


def _guarded(name: str, fn: Handler) -> Handler:
    """Turn our exceptions into ttrpc status codes with a one-line message, and log failures."""

    def handler(ctx: ttrpc.Context, req: Any) -> Any:
        log.debug(f"rpc {name}")
        try:
            return fn(ctx, req)
        except ttrpc.TTRPCError:
            raise
        except Exception as e:
            code = next((c for kind, c in _ERROR_CODES if isinstance(e, kind)), ttrpc.Code.INTERNAL)
            log.warn(f"rpc {name} failed: {code.name}: {e}")
            raise ttrpc.TTRPCError(code, str(e)) from None

    return handler


class AgentService:
    def __init__(
        self,
        sandbox: Sandbox,
        *,
        network: Any = None,
        power_off: Callable[[], None] | None = None,
        mount_storage: Callable[[pb.Storage], None] | None = None,
        started_at: float | None = None,
        warmup: Warmup | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.warmup = warmup
        self.started_at = started_at
        self._answered_check = False
        self.network = network
        self.power_off = power_off
        self.mount_storage = mount_storage
        self._oom: Any = None  # kata.guest.agent.oom.OomWatcher, from the first container on
        self._forwards: Any = None  # kata.guest.agent.portforward.Forwards, from the first one on
        self._scrapes = 0
        self._scrapes_lock = threading.Lock()
        self._forwards_lock = threading.Lock()

    # sandbox ------------------------------------------------------------------------------
    def create_sandbox(self, ctx: ttrpc.Context, req: pb.CreateSandboxRequest) -> empty_pb2.Empty:
        if req.hostname:
            socket.sethostname(req.hostname)
        if req.dns:
            os.makedirs(SANDBOX_RUN_DIR, exist_ok=True)
            with open(os.path.join(SANDBOX_RUN_DIR, "resolv.conf"), "w") as f:
                f.write("".join(line + "\n" for line in req.dns))
        self._mount_all(req.storages)
        self.sandbox.id = req.sandbox_id
        log.info(f"sandbox {req.sandbox_id} created")
        return empty_pb2.Empty()

    def _mount_all(self, storages: Any) -> None:
        if storages and self.mount_storage is None:
            raise ttrpc.TTRPCError(ttrpc.Code.UNIMPLEMENTED, "this agent cannot mount storages")
        for s in storages:
            assert self.mount_storage is not None
            self.mount_storage(s)

    def destroy_sandbox(self, ctx: ttrpc.Context, req: pb.DestroySandboxRequest) -> empty_pb2.Empty:
        log.info("destroying sandbox")
        self.sandbox.kill_all()
        if self.power_off is not None:
            # Answer first: power-off must not race the reply out of the VM.
            threading.Timer(0.2, self.power_off).start()
        return empty_pb2.Empty()

    # containers ---------------------------------------------------------------------------
    def create_container(self, ctx: ttrpc.Context, req: pb.CreateContainerRequest) -> empty_pb2.Empty:
        self._mount_all(req.storages)
        set_sysctls(req.pod_sysctls)
        self.sandbox.create_container(req.container_id, req.oci_spec_json)
        try:
            self._oom_watcher().watch(req.container_id, self.sandbox.cgroup_dir(req.container_id))
        except (OSError, NotFound) as exc:  # the container works without OOM events
            log.warn(f"no OOM events for {req.container_id}: {exc}")
        return empty_pb2.Empty()

    def _oom_watcher(self) -> Any:
        if self._oom is None:
            from kata.guest.agent.oom import OomWatcher

            self._oom = OomWatcher()
        return self._oom

    def get_oom_event(self, ctx: ttrpc.Context, req: pb.GetOOMEventRequest) -> pb.OOMEvent:
        return pb.OOMEvent(container_id=self._oom_watcher().next_event())

    def start_container(self, ctx: ttrpc.Context, req: pb.StartContainerRequest) -> empty_pb2.Empty:
        self.sandbox.start_container(req.container_id)
        return empty_pb2.Empty()

    def remove_container(self, ctx: ttrpc.Context, req: pb.RemoveContainerRequest) -> empty_pb2.Empty:
        self.sandbox.remove_container(req.container_id, float(req.timeout) or None)
        if self._oom is not None:
            self._oom.unwatch(req.container_id)
        return empty_pb2.Empty()

    def exec_process(self, ctx: ttrpc.Context, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        self.sandbox.exec_process(req.container_id, req.exec_id, req.oci_process_json)
        return empty_pb2.Empty()

    def signal_process(self, ctx: ttrpc.Context, req: pb.SignalProcessRequest) -> empty_pb2.Empty:
        self.sandbox.signal_process(req.container_id, req.exec_id, req.signal)
        return empty_pb2.Empty()

    def wait_process(self, ctx: ttrpc.Context, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        status = self.sandbox.wait_process(req.container_id, req.exec_id)
        oom = not req.exec_id and self._oom is not None and self._oom.take(req.container_id)
        return pb.WaitProcessResponse(status=status, oom_killed=oom)

    def list_processes(self, ctx: ttrpc.Context, req: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
        listing = self.sandbox.list_processes(req.container_id, req.format)
        return pb.ListProcessesResponse(process_list=listing)

    def update_container(self, ctx: ttrpc.Context, req: pb.UpdateContainerRequest) -> empty_pb2.Empty:
        self.sandbox.update(req.container_id, req.resources_json)
        return empty_pb2.Empty()

    def stats_container(self, ctx: ttrpc.Context, req: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        from kata.guest.agent.stats import cgroup_stats  # only stats needs it

        return cgroup_stats(self.sandbox.cgroup_dir(req.container_id))

    def pause_container(self, ctx: ttrpc.Context, req: pb.PauseContainerRequest) -> empty_pb2.Empty:
        self.sandbox.pause(req.container_id)
        return empty_pb2.Empty()

    def resume_container(self, ctx: ttrpc.Context, req: pb.ResumeContainerRequest) -> empty_pb2.Empty:
        self.sandbox.resume(req.container_id)
        return empty_pb2.Empty()

    # stdio --------------------------------------------------------------------------------
    def write_stdin(self, ctx: ttrpc.Context, req: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        p = self.sandbox.process(req.container_id, req.exec_id)
        try:
            return pb.WriteStreamResponse(len=p.stdio.write_stdin(req.data))
        except (EndOfStream, BrokenPipeError):
            raise ttrpc.TTRPCError(ttrpc.Code.FAILED_PRECONDITION, "stdin is closed") from None

    def _read(self, req: pb.ReadStreamRequest, stdout: bool) -> pb.ReadStreamResponse:
        p = self.sandbox.process(req.container_id, req.exec_id)
        n = req.len or 32768
        try:
            data = p.stdio.read_stdout(n) if stdout else p.stdio.read_stderr(n)
        except EndOfStream:
            raise ttrpc.TTRPCError(EOF_CODE, EOF_MESSAGE) from None
        return pb.ReadStreamResponse(data=data)

    def read_stdout(self, ctx: ttrpc.Context, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return self._read(req, True)

    def read_stderr(self, ctx: ttrpc.Context, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return self._read(req, False)

    def close_stdin(self, ctx: ttrpc.Context, req: pb.CloseStdinRequest) -> empty_pb2.Empty:
        self.sandbox.process(req.container_id, req.exec_id).stdio.close_stdin()
        return empty_pb2.Empty()

    def tty_win_resize(self, ctx: ttrpc.Context, req: pb.TtyWinResizeRequest) -> empty_pb2.Empty:
        p = self.sandbox.process(req.container_id, req.exec_id)
        try:
            p.stdio.resize(req.row, req.column)
        except EndOfStream:
            raise ttrpc.TTRPCError(ttrpc.Code.FAILED_PRECONDITION, "process has no tty") from None
        return empty_pb2.Empty()

    # networking ---------------------------------------------------------------------------
    def _net(self) -> Any:
        if self.network is None:
            raise ttrpc.TTRPCError(ttrpc.Code.UNIMPLEMENTED, "networking is not available in this agent")
        return self.network

    def update_interface(self, ctx: ttrpc.Context, req: pb.UpdateInterfaceRequest) -> pb.Interface:
        return self._net().update_interface(req.interface)  # type: ignore[no-any-return]

    def update_routes(self, ctx: ttrpc.Context, req: pb.UpdateRoutesRequest) -> pb.Routes:
        return self._net().update_routes(req.routes)  # type: ignore[no-any-return]

    # guest resources ----------------------------------------------------------------------
    def get_guest_details(
        self, ctx: ttrpc.Context, req: pb.GetGuestDetailsRequest
    ) -> pb.GuestDetailsResponse:
        from kata.guest.agent.guestinfo import guest_details

        return guest_details(req, warm=self.warmup is None or self.warmup.done.is_set())

    def online_cpu_mem(self, ctx: ttrpc.Context, req: pb.OnlineCPUMemRequest) -> empty_pb2.Empty:
        from kata.guest.agent.guestinfo import online_cpu_mem

        online_cpu_mem(req)
        return empty_pb2.Empty()

    def set_guest_date_time(self, ctx: ttrpc.Context, req: pb.SetGuestDateTimeRequest) -> empty_pb2.Empty:
        from kata.guest.agent.guestinfo import set_date_time

        set_date_time(req.sec, req.usec)
        return empty_pb2.Empty()

    def reseed_random_dev(self, ctx: ttrpc.Context, req: pb.ReseedRandomDevRequest) -> empty_pb2.Empty:
        from kata.guest.agent.guestinfo import reseed_random

        reseed_random(req.data)
        return empty_pb2.Empty()

    def release_free_memory(self, ctx: ttrpc.Context,
                            req: pb.ReleaseFreeMemoryRequest) -> pb.ReleaseFreeMemoryResponse:
        from kata.guest.agent.freemem import release_free_memory

        if self.sandbox.id or self.sandbox.containers:
            raise InvalidArgument("free memory is released only before a sandbox exists (for a template)")
        return pb.ReleaseFreeMemoryResponse(zeroed_bytes=release_free_memory())

    def warm_up(self, ctx: ttrpc.Context, req: pb.WarmUpRequest) -> empty_pb2.Empty:
        if self.sandbox.id or self.sandbox.containers:
            raise InvalidArgument("a warm-up runs only before a sandbox exists (for a VM kept warm)")
        if self.warmup is None:
            raise InvalidArgument("this agent has no warm-up")
        self.warmup.again()
        return empty_pb2.Empty()

    # port forwarding ----------------------------------------------------------------------
    def _fwd(self) -> Any:
        # Under a lock: the first connections of a pod can arrive together, on different workers.
        with self._forwards_lock:
            if self._forwards is None:
                from kata.guest.agent.portforward import Forwards

                self._forwards = Forwards()
            return self._forwards

    def port_forward_connect(self, ctx: ttrpc.Context, req: pb.PortForwardConnectRequest) -> empty_pb2.Empty:
        self._fwd().connect(req.conn_id, req.port, ipv6=req.family == pb.IPFamily.v6)
        return empty_pb2.Empty()

    def port_forward_write(self, ctx: ttrpc.Context,
                           req: pb.PortForwardWriteRequest) -> pb.WriteStreamResponse:
        return pb.WriteStreamResponse(len=self._fwd().write(req.conn_id, req.data))

    def port_forward_read(self, ctx: ttrpc.Context, req: pb.PortForwardReadRequest) -> pb.ReadStreamResponse:
        try:
            return pb.ReadStreamResponse(data=self._fwd().read(req.conn_id, req.len))
        except EndOfStream:
            raise ttrpc.TTRPCError(EOF_CODE, EOF_MESSAGE) from None

    def port_forward_close(self, ctx: ttrpc.Context, req: pb.PortForwardCloseRequest) -> empty_pb2.Empty:
        self._fwd().close(req.conn_id, req.write_only)
        return empty_pb2.Empty()

    # metrics ------------------------------------------------------------------------------
    def get_metrics(self, ctx: ttrpc.Context, req: pb.GetMetricsRequest) -> pb.Metrics:
        from kata.guest.agent.metrics import guest_metrics  # only a scrape needs it

        with self._scrapes_lock:
            self._scrapes += 1
            scrapes = self._scrapes
        containers = []
        for cid in list(self.sandbox.containers):
            try:
                containers.append((cid, self.sandbox.cgroup_dir(cid)))
            except (OSError, NotFound):
                pass  # not running (yet, or any more): no cgroup to read
        return guest_metrics(containers, scrapes)

    # health -------------------------------------------------------------------------------
    def check(self, ctx: ttrpc.Context, req: hpb.CheckRequest) -> hpb.HealthCheckResponse:
        if not self._answered_check:
            self._answered_check = True
            if self.started_at is not None:
                import time

                # The agent's start-up figure: process start to the first answered Check.
                log.info(f"first Health.Check answered {time.monotonic() - self.started_at:.3f}s "
                         "after the agent process started")
        return hpb.HealthCheckResponse(status=hpb.HealthCheckResponse.SERVING)

    def version(self, ctx: ttrpc.Context, req: hpb.CheckRequest) -> hpb.VersionCheckResponse:
        return hpb.VersionCheckResponse(grpc_version=API_VERSION, agent_version=kata.__version__)

    # registration -------------------------------------------------------------------------
    def register(self, server: ttrpc.Server) -> None:
        agent: dict[str, tuple[Any, Any]] = {
            "CreateSandbox": (pb.CreateSandboxRequest, self.create_sandbox),
            "DestroySandbox": (pb.DestroySandboxRequest, self.destroy_sandbox),
            "CreateContainer": (pb.CreateContainerRequest, self.create_container),
            "StartContainer": (pb.StartContainerRequest, self.start_container),
            "RemoveContainer": (pb.RemoveContainerRequest, self.remove_container),
            "ExecProcess": (pb.ExecProcessRequest, self.exec_process),
            "SignalProcess": (pb.SignalProcessRequest, self.signal_process),
            "WaitProcess": (pb.WaitProcessRequest, self.wait_process),
            "ListProcesses": (pb.ListProcessesRequest, self.list_processes),
            "UpdateContainer": (pb.UpdateContainerRequest, self.update_container),
            "StatsContainer": (pb.StatsContainerRequest, self.stats_container),
            "PauseContainer": (pb.PauseContainerRequest, self.pause_container),
            "ResumeContainer": (pb.ResumeContainerRequest, self.resume_container),
            "WriteStdin": (pb.WriteStreamRequest, self.write_stdin),
            "ReadStdout": (pb.ReadStreamRequest, self.read_stdout),
            "ReadStderr": (pb.ReadStreamRequest, self.read_stderr),
            "CloseStdin": (pb.CloseStdinRequest, self.close_stdin),
            "TtyWinResize": (pb.TtyWinResizeRequest, self.tty_win_resize),
            "UpdateInterface": (pb.UpdateInterfaceRequest, self.update_interface),
            "UpdateRoutes": (pb.UpdateRoutesRequest, self.update_routes),
            "GetGuestDetails": (pb.GetGuestDetailsRequest, self.get_guest_details),
            "OnlineCPUMem": (pb.OnlineCPUMemRequest, self.online_cpu_mem),
            "SetGuestDateTime": (pb.SetGuestDateTimeRequest, self.set_guest_date_time),
            "ReseedRandomDev": (pb.ReseedRandomDevRequest, self.reseed_random_dev),
            "ReleaseFreeMemory": (pb.ReleaseFreeMemoryRequest, self.release_free_memory),
            "WarmUp": (pb.WarmUpRequest, self.warm_up),
            "GetOOMEvent": (pb.GetOOMEventRequest, self.get_oom_event),
            "PortForwardConnect": (pb.PortForwardConnectRequest, self.port_forward_connect),
            "PortForwardWrite": (pb.PortForwardWriteRequest, self.port_forward_write),
            "PortForwardRead": (pb.PortForwardReadRequest, self.port_forward_read),
            "PortForwardClose": (pb.PortForwardCloseRequest, self.port_forward_close),
            "GetMetrics": (pb.GetMetricsRequest, self.get_metrics),
        }
        health = {
            "Check": (hpb.CheckRequest, self.check),
            "Version": (hpb.CheckRequest, self.version),
        }
        for service, methods in ((AGENT_SERVICE, agent), (HEALTH_SERVICE, health)):
            server.register_service(service, {
                name: ttrpc.Method(rtype, _guarded(name, fn),
                                   blocking=service == AGENT_SERVICE and name in LONG_POLL_METHODS)
                for name, (rtype, fn) in methods.items()
            })
