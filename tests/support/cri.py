"""A small typed client of the Kubernetes CRI v1 API (containerd's CRI plugin), for tests.

It speaks the subset in kata/protocols/cri/api.proto, calling the gRPC methods by path (the build
generates messages, not stubs). Every call has a deadline; a failure is a ``CriError`` with the method,
the gRPC status code and containerd's message on one line.

    with CriClient(containerd.socket) as cri:
        pod = cri.run_pod("web", "default", "uid-1", runtime_handler="runc")
        cid = cri.run_container(pod, "app", image, ["sleep", "1000"])
        code, out, err = cri.exec_sync(cid, ["hostname"])
        cri.remove_pod(pod.id)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

import grpc
from google.protobuf.message import Message

from kata.errors import KataError
from kata.protocols.cri import api_pb2 as cri

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"
DEFAULT_TIMEOUT = 120.0  # a Kata sandbox boots a VM, under TCG here
_M = TypeVar("_M", bound=Message)


class CriError(KataError):
    """A CRI call failed; ``code`` is its gRPC status code (None for a failure that has none)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ExecResult(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Pod:
    """A sandbox RunPodSandbox made, with the config CreateContainer must be given again."""

    id: str
    config: cri.PodSandboxConfig


def pod_config(name: str, namespace: str = "default", uid: str = "", *, hostname: str | None = None,
               labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None,
               log_directory: str = "", cgroup_parent: str = "",
               linux: cri.LinuxPodSandboxConfig | None = None,
               dns: cri.DNSConfig | None = None) -> cri.PodSandboxConfig:
    """What kubelet would send for a pod: metadata, hostname (the pod's name unless given), labels,
    annotations. ``cgroup_parent`` is a shortcut for ``linux.cgroup_parent``."""
    linux_config = cri.LinuxPodSandboxConfig()
    if linux is not None:
        linux_config.CopyFrom(linux)
    if cgroup_parent:
        linux_config.cgroup_parent = cgroup_parent
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace=namespace, uid=uid or f"uid-{name}"),
        hostname=name if hostname is None else hostname, log_directory=log_directory,
        labels=dict(labels or {}), annotations=dict(annotations or {}), linux=linux_config, dns_config=dns)


def container_config(name: str, image: str, command: Sequence[str] = (), args: Sequence[str] = (), *,
                     envs: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                     annotations: Mapping[str, str] | None = None, mounts: Iterable[cri.Mount] = (),
                     working_dir: str = "", log_path: str = "", tty: bool = False, stdin: bool = False,
                     linux: cri.LinuxContainerConfig | None = None) -> cri.ContainerConfig:
    """A container's config; ``log_path`` is relative to the pod's ``log_directory``."""
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image), command=list(command),
        args=list(args), envs=[cri.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        labels=dict(labels or {}), annotations=dict(annotations or {}), mounts=list(mounts),
        working_dir=working_dir, log_path=log_path, tty=tty, stdin=stdin, linux=linux)


class CriClient:
    """The RuntimeService and ImageService of a CRI endpoint (a unix socket path)."""

    def __init__(self, socket_path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        self._methods: dict[str, Callable[..., Any]] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, service: str, method: str, request: Message, reply: type[_M],
              timeout: float | None = None) -> _M:
        path = f"/{service}/{method}"
        stub = self._methods.get(path)
        if stub is None:
            stub = self._channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                             response_deserializer=reply.FromString)
            self._methods[path] = stub
        deadline = self.timeout if timeout is None else timeout
        try:
            response: _M = stub(request, timeout=deadline)
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else None
            details = e.details() if callable(getattr(e, "details", None)) else str(e)
            name = code.name if code is not None else "ERROR"
            raise CriError(f"CRI {method}: {name}: {details}", code) from None
        return response

    def _runtime(self, method: str, request: Message, reply: type[_M], timeout: float | None = None) -> _M:
        return self._call(RUNTIME_SERVICE, method, request, reply, timeout)

    # --- runtime ------------------------------------------------------------------------------------

    def version(self) -> cri.VersionResponse:
        return self._runtime("Version", cri.VersionRequest(version="v1"), cri.VersionResponse)

    def status(self, verbose: bool = False, timeout: float | None = None) -> cri.StatusResponse:
        return self._runtime("Status", cri.StatusRequest(verbose=verbose), cri.StatusResponse, timeout)

    def conditions(self, timeout: float | None = None) -> dict[str, bool]:
        """RuntimeReady, NetworkReady, ... and whether each holds."""
        return {c.type: c.status for c in self.status(timeout=timeout).status.conditions}

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the runtime and its network are ready (the plugin answers ``not initialized`` at first)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                conditions = self.conditions(timeout=min(5.0, max(deadline - time.monotonic(), 0.1)))
                if conditions.get("RuntimeReady") and conditions.get("NetworkReady"):
                    return
                last = f"conditions {conditions}"
            except CriError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise CriError(f"CRI not ready after {timeout:g} s: {last}")
            time.sleep(0.1)

    # --- pod sandboxes --------------------------------------------------------------------------------

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, runtime_handler: str = "",
                        timeout: float | None = None) -> str:
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self._runtime("RunPodSandbox", request, cri.RunPodSandboxResponse, timeout).pod_sandbox_id

    def run_pod(self, name: str, namespace: str = "default", uid: str = "", runtime_handler: str = "",
                *, annotations: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                linux: cri.LinuxPodSandboxConfig | None = None, cgroup_parent: str = "",
                log_directory: str = "", hostname: str | None = None,
                timeout: float | None = None) -> Pod:
        """RunPodSandbox of ``pod_config(...)``: the pod, ready, with its network set up."""
        config = pod_config(name, namespace, uid, hostname=hostname, labels=labels, annotations=annotations,
                            log_directory=log_directory, cgroup_parent=cgroup_parent, linux=linux)
        return Pod(self.run_pod_sandbox(config, runtime_handler, timeout), config)

    def stop_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self._runtime("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                      cri.StopPodSandboxResponse, timeout)

    def remove_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self._runtime("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                      cri.RemovePodSandboxResponse, timeout)

    def remove_pod(self, pod_id: str, timeout: float | None = None) -> None:
        """StopPodSandbox then RemovePodSandbox, as kubelet does (its containers go with it); a pod that
        is already gone is no error."""
        try:
            self.stop_pod_sandbox(pod_id, timeout)
        except CriError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
        self.remove_pod_sandbox(pod_id, timeout)

    def pod_sandbox_status(self, pod_id: str, verbose: bool = False,
                           timeout: float | None = None) -> cri.PodSandboxStatusResponse:
        request = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self._runtime("PodSandboxStatus", request, cri.PodSandboxStatusResponse, timeout)

    def pod_ip(self, pod_id: str) -> str:
        return self.pod_sandbox_status(pod_id).status.network.ip

    def pod_info(self, pod_id: str) -> dict[str, Any]:
        """containerd's verbose ``info`` of the sandbox (pid, netns path, runtime spec, ...)."""
        info = self.pod_sandbox_status(pod_id, verbose=True).info.get("info", "{}")
        decoded: dict[str, Any] = json.loads(info)
        return decoded

    def pod_netns(self, pod_id: str) -> str:
        """The path of the pod's network namespace, from the sandbox's OCI spec in the verbose info
        (containerd 1.6 names it nowhere else); "" for a pod on the node's network."""
        spec = self.pod_info(pod_id).get("runtimeSpec", {})
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network":
                return str(ns.get("path", ""))
        return ""

    def list_pod_sandbox(self, pod_id: str = "", labels: Mapping[str, str] | None = None,
                         timeout: float | None = None) -> list[cri.PodSandbox]:
        request = cri.ListPodSandboxRequest(
            filter=cri.PodSandboxFilter(id=pod_id, label_selector=dict(labels or {})))
        return list(self._runtime("ListPodSandbox", request, cri.ListPodSandboxResponse, timeout).items)

    # --- containers -----------------------------------------------------------------------------------

    def create_container_from(self, pod_id: str, config: cri.ContainerConfig,
                              sandbox_config: cri.PodSandboxConfig, timeout: float | None = None) -> str:
        request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                             sandbox_config=sandbox_config)
        return self._runtime("CreateContainer", request, cri.CreateContainerResponse, timeout).container_id

    def create_container(self, pod_id: str, pod_config: cri.PodSandboxConfig, name: str, image: str,
                         command: Sequence[str] = (), args: Sequence[str] = (), *,
                         timeout: float | None = None, **options: Any) -> str:
        """CreateContainer of ``container_config(name, image, command, args, **options)``."""
        config = container_config(name, image, command, args, **options)
        return self.create_container_from(pod_id, config, pod_config, timeout)

    def start_container(self, container_id: str, timeout: float | None = None) -> None:
        self._runtime("StartContainer", cri.StartContainerRequest(container_id=container_id),
                      cri.StartContainerResponse, timeout)

    def run_container(self, pod: Pod, name: str, image: str, command: Sequence[str] = (),
                      args: Sequence[str] = (), *, timeout: float | None = None, **options: Any) -> str:
        """Create and start a container in ``pod``; its id."""
        cid = self.create_container(pod.id, pod.config, name, image, command, args, timeout=timeout,
                                    **options)
        self.start_container(cid, timeout)
        return cid

    def stop_container(self, container_id: str, grace: int = 0, timeout: float | None = None) -> None:
        """StopContainer: SIGTERM (the image's stop signal), SIGKILL after ``grace`` seconds."""
        request = cri.StopContainerRequest(container_id=container_id, timeout=grace)
        self._runtime("StopContainer", request, cri.StopContainerResponse,
                      self.timeout + grace if timeout is None else timeout)

    def remove_container(self, container_id: str, timeout: float | None = None) -> None:
        self._runtime("RemoveContainer", cri.RemoveContainerRequest(container_id=container_id),
                      cri.RemoveContainerResponse, timeout)

    def list_containers(self, pod_id: str = "", timeout: float | None = None) -> list[cri.Container]:
        request = cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self._runtime("ListContainers", request, cri.ListContainersResponse, timeout).containers)

    def container_status(self, container_id: str, verbose: bool = False,
                         timeout: float | None = None) -> cri.ContainerStatusResponse:
        request = cri.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self._runtime("ContainerStatus", request, cri.ContainerStatusResponse, timeout)

    def update_container_resources(self, container_id: str, linux: cri.LinuxContainerResources,
                                   timeout: float | None = None) -> None:
        request = cri.UpdateContainerResourcesRequest(container_id=container_id, linux=linux)
        self._runtime("UpdateContainerResources", request, cri.UpdateContainerResourcesResponse, timeout)

    def container_stats(self, container_id: str, timeout: float | None = None) -> cri.ContainerStats:
        request = cri.ContainerStatsRequest(container_id=container_id)
        return self._runtime("ContainerStats", request, cri.ContainerStatsResponse, timeout).stats

    def container_pid(self, container_id: str) -> int:
        """The host pid of the container's process, from containerd's verbose info (0 when none)."""
        info = self.container_status(container_id, verbose=True).info.get("info", "{}")
        return int(json.loads(info).get("pid", 0))

    def container_state(self, container_id: str) -> str:
        """CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED or CONTAINER_UNKNOWN."""
        return cri.ContainerState.Name(self.container_status(container_id).status.state)

    def wait_container_state(self, container_id: str, state: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.container_state(container_id)) != state:
            if time.monotonic() >= deadline:
                raise CriError(f"container {container_id} still {current} after {timeout:g} s, not {state}")
            time.sleep(0.1)

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 30) -> ExecResult:
        """Run ``cmd`` in the container, which the runtime kills after ``timeout`` seconds; the gRPC
        deadline allows a little more for the exec's own setup."""
        request = cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        reply = self._runtime("ExecSync", request, cri.ExecSyncResponse, timeout + 30.0)
        return ExecResult(reply.exit_code, reply.stdout.decode(errors="replace"),
                          reply.stderr.decode(errors="replace"))

    def port_forward(self, pod_id: str, ports: Sequence[int], timeout: float | None = None) -> str:
        """The streaming server's URL for forwarding ``ports`` of the pod (tests.support.portforward
        speaks its protocol)."""
        request = cri.PortForwardRequest(pod_sandbox_id=pod_id, port=list(ports))
        return self._runtime("PortForward", request, cri.PortForwardResponse, timeout).url

    # --- images ---------------------------------------------------------------------------------------

    def list_images(self, timeout: float | None = None) -> list[cri.Image]:
        return list(self._call(IMAGE_SERVICE, "ListImages", cri.ListImagesRequest(), cri.ListImagesResponse,
                               timeout).images)

    def pull_image(self, image: str, timeout: float | None = None) -> str:
        """PullImage, as a kubelet does before it creates a container; the image's reference (id)."""
        request = cri.PullImageRequest(image=cri.ImageSpec(image=image))
        return self._call(IMAGE_SERVICE, "PullImage", request, cri.PullImageResponse, timeout).image_ref

    def image_status(self, image: str, timeout: float | None = None) -> cri.Image | None:
        """The image as the CRI plugin knows it (by name, id or digest), None if it has no such image."""
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=image))
        reply = self._call(IMAGE_SERVICE, "ImageStatus", request, cri.ImageStatusResponse, timeout)
        return reply.image if reply.HasField("image") else None

    # --- cleanup --------------------------------------------------------------------------------------

    def remove_all_pods(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Stop and remove every pod (and so its containers) within ``timeout``; what failed."""
        deadline = time.monotonic() + timeout
        problems = []
        for pod in self.list_pod_sandbox(timeout=min(30.0, timeout)):
            left = max(deadline - time.monotonic(), 1.0)
            try:
                self.remove_pod(pod.id, timeout=left)
            except CriError as e:
                problems.append(f"pod {pod.metadata.name} ({pod.id[:12]}): {e}")
        return problems
