"""containerd's task API (containerd.task.v2.Task) on the shim's ttrpc server, answered by the Pod.

Only decoding, encoding and error mapping live here; the pod does the work.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from kata import __version__, ttrpc
from kata.errors import KataError
from kata.oci.spec import OCIError, validate_process, validate_resources
from kata.protocols.containerd.api.types.task import task_pb2 as types
from kata.protocols.containerd.runtime.v2.task import shim_pb2 as pb
from kata.sandbox.paths import InvalidIdError, validate_id
from kata.sandbox.status import Status
from kata.shim import events
from kata.shim.options import config_path
from kata.shim.process import Process
from kata.shim.stdio import StdioPaths
from kata.shim.tasks import CreateParams, PodTasks, ShimError
from kata.utils.text import one_line

SERVICE = "containerd.task.v2.Task"
_STATUS = {Status.CREATED: types.CREATED, Status.RUNNING: types.RUNNING, Status.STOPPED: types.STOPPED,
           Status.PAUSED: types.PAUSED}
log = logging.getLogger("kata.shim")


def _json_any(any_msg: Any, what: str) -> dict[str, Any]:
    """containerd sends OCI structures (an exec's process, new resources) as JSON in an Any."""
    try:
        value = json.loads(any_msg.value or b"{}")
    except ValueError as exc:
        raise ShimError(ttrpc.Code.INVALID_ARGUMENT, f"{what}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ShimError(ttrpc.Code.INVALID_ARGUMENT, f"{what}: not a JSON object")
    return value


def _checked(validate: Callable[[Any, str], None], value: Any, what: str) -> None:
    """An OCI structure from containerd (an exec's process, new resources) checked as the spec's
    are, before the guest gets it: a bad one is the caller's error."""
    try:
        validate(value, what)
    except OCIError as exc:
        raise ShimError(ttrpc.Code.INVALID_ARGUMENT, str(exc)) from None


def config_path_of(options: Any) -> Path | None:
    """The configuration.toml the CRI plugin's runtime options name (ConfigPath), if any."""
    if options is None:
        return None
    try:
        return config_path(options.type_url, options.value)
    except ValueError as exc:
        raise ShimError(ttrpc.Code.INVALID_ARGUMENT, f"runtime options: {exc}") from None


class TaskService:
    def __init__(self, pod: PodTasks, on_shutdown: Callable[[], None], default_config: Path | None) -> None:
        self.pod = pod
        self.on_shutdown = on_shutdown
        self.default_config = default_config

    def methods(self) -> dict[str, ttrpc.Method[Any]]:
        def m(req_type: type[Message], fn: Callable[[Any], Message],
              blocking: bool = False) -> ttrpc.Method[Any]:
            return ttrpc.Method(req_type, lambda _ctx, req: self._guard(fn, req), blocking)

        return {
            "State": m(pb.StateRequest, self.state),
            "Create": m(pb.CreateTaskRequest, self.create),
            "Start": m(pb.StartRequest, self.start),
            "Delete": m(pb.DeleteRequest, self.delete),
            "Pids": m(pb.PidsRequest, self.pids),
            "Pause": m(pb.PauseRequest, self.pause),
            "Resume": m(pb.ResumeRequest, self.resume),
            "Checkpoint": m(pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": m(pb.KillRequest, self.kill),
            "Exec": m(pb.ExecProcessRequest, self.exec),
            "ResizePty": m(pb.ResizePtyRequest, self.resize_pty),
            "CloseIO": m(pb.CloseIORequest, self.close_io),
            "Update": m(pb.UpdateTaskRequest, self.update),
            # containerd waits for every process here, as long as it runs: a long-poll call.
            "Wait": m(pb.WaitRequest, self.wait, blocking=True),
            "Stats": m(pb.StatsRequest, self.stats),
            "Connect": m(pb.ConnectRequest, self.connect),
            "Shutdown": m(pb.ShutdownRequest, self.shutdown),
        }

    @staticmethod
    def _guard(fn: Callable[[Any], Message], req: Any) -> Message:
        """Failures become ttrpc statuses containerd understands (NotFound, FailedPrecondition...),
        each one line."""
        try:
            _check_ids(req)
            return fn(req)
        except ShimError as exc:
            raise ttrpc.TTRPCError(exc.code, one_line(exc)) from None
        except ttrpc.TTRPCError as exc:
            raise ttrpc.TTRPCError(exc.code, one_line(exc)) from None
        except InvalidIdError as exc:
            raise ttrpc.TTRPCError(ttrpc.Code.INVALID_ARGUMENT, one_line(exc)) from None
        except KataError as exc:
            log.warning(f"{fn.__name__}: {exc}")
            raise ttrpc.TTRPCError(ttrpc.Code.UNKNOWN, one_line(exc)) from None
        except Exception as exc:
            log.error(f"{fn.__name__}: internal error: {type(exc).__name__}: {one_line(exc)}")
            log.debug(f"{fn.__name__}: traceback", exc_info=True)
            raise ttrpc.TTRPCError(ttrpc.Code.INTERNAL, one_line(f"{type(exc).__name__}: {exc}")) from None

    # ---- RPCs ----------------------------------------------------------------------------------
    def state(self, req: pb.StateRequest) -> pb.StateResponse:
        task = self.pod.task(req.id)
        proc = task.process(req.exec_id)
        resp = pb.StateResponse(id=req.id, exec_id=req.exec_id, bundle=str(task.bundle), pid=self.pod.pid,
                                status=_STATUS[proc.status], stdin=proc.stdio.stdin, stdout=proc.stdio.stdout,
                                stderr=proc.stdio.stderr, terminal=proc.stdio.terminal,
                                exit_status=proc.exit_status)
        _set_time(resp.exited_at, proc)
        return resp

    def create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        if req.checkpoint:
            raise ShimError(ttrpc.Code.UNIMPLEMENTED, "checkpoint and restore are not supported")
        params = CreateParams(
            id=req.id, bundle=Path(req.bundle), rootfs=list(req.rootfs),
            stdio=StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal),
            config_path=config_path_of(req.options if req.HasField("options") else None)
            or self.default_config)
        return pb.CreateTaskResponse(pid=self.pod.create(params))

    def start(self, req: pb.StartRequest) -> pb.StartResponse:
        return pb.StartResponse(pid=self.pod.start(req.id, req.exec_id))

    def delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        pid = self.pod.pid
        proc = self.pod.delete(req.id, req.exec_id)
        if self.pod.publisher is not None:
            # The exit and delete events reach containerd before its Delete returns.
            self.pod.publisher.flush()
        resp = pb.DeleteResponse(pid=pid, exit_status=proc.exit_status)
        _set_time(resp.exited_at, proc)
        return resp

    def pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        self.pod.task(req.id)
        pid = self.pod.pid
        return pb.PidsResponse(processes=[types.ProcessInfo(pid=pid)] if pid else [])

    def pause(self, req: pb.PauseRequest) -> Empty:
        self.pod.pause(req.id)
        return Empty()

    def resume(self, req: pb.ResumeRequest) -> Empty:
        self.pod.resume(req.id)
        return Empty()

    def checkpoint(self, req: pb.CheckpointTaskRequest) -> Empty:
        raise ShimError(ttrpc.Code.UNIMPLEMENTED, "checkpoint is not supported by kata")

    def kill(self, req: pb.KillRequest) -> Empty:
        self.pod.kill(req.id, req.exec_id, req.signal, req.all)
        return Empty()

    def exec(self, req: pb.ExecProcessRequest) -> Empty:
        process = _json_any(req.spec, "exec process")
        _checked(validate_process, process, "exec process")
        stdio = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)
        self.pod.exec(req.id, req.exec_id, stdio, json.dumps(process).encode())
        return Empty()

    def resize_pty(self, req: pb.ResizePtyRequest) -> Empty:
        self.pod.resize(req.id, req.exec_id, req.width, req.height)
        return Empty()

    def close_io(self, req: pb.CloseIORequest) -> Empty:
        if req.stdin:
            self.pod.close_io(req.id, req.exec_id)
        return Empty()

    def update(self, req: pb.UpdateTaskRequest) -> Empty:
        resources = _json_any(req.resources, "resources")
        _checked(validate_resources, resources, "resources")
        self.pod.update(req.id, resources)
        return Empty()

    def wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        proc = self.pod.task(req.id).process(req.exec_id)
        proc.wait()
        resp = pb.WaitResponse(exit_status=proc.exit_status)
        _set_time(resp.exited_at, proc)
        return resp

    def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        return pb.StatsResponse(stats=events.pack(self.pod.stats(req.id)))

    def connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self.pod.pid, version=__version__)

    def shutdown(self, req: pb.ShutdownRequest) -> Empty:
        if self.pod.shutdown(now=req.now):
            # After this answer has gone out: the caller waits for it.
            threading.Thread(target=self.on_shutdown, daemon=True).start()
        return Empty()


def _check_ids(req: Any) -> None:
    """A request's task id, and its exec id when it names one (empty means the task's init), are
    checked before anything is looked up or built from them: exec ids come from users (`ctr task
    exec --exec-id`), and task ids name the pod's directories."""
    fields = req.DESCRIPTOR.fields_by_name
    if "id" in fields:
        validate_id(req.id)
    if "exec_id" in fields and req.exec_id:
        validate_id(req.exec_id)


def _set_time(ts: Any, proc: Process) -> None:
    if proc.exited_at is not None:
        ts.FromNanoseconds(int(proc.exited_at * 1e9))
