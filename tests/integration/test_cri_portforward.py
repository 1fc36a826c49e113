"""`kubectl port-forward` into a pod, as the kubelet does it: the CRI's PortForward, then Kubernetes'
port-forward protocol (WebSocket, tests.support.portforward) to containerd's streaming server, which
dials ``localhost:PORT`` inside the pod's network namespace. runc's pods are the reference; a kata
pod's server runs in its VM, reached through the shim's forwarder (kata.sandbox.portforward).

One pod per handler: a page and a 1 MiB file from busybox httpd, intact; a port nothing listens on
ends at once with an error; with kata, the forwarder listens only on the pod's loopback, and after
StopPodSandbox and RemovePodSandbox nothing of it (nor of the pod) is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.config.load import find_config
from kata.network.loopback_redirect import TABLE
from tests.support.cri import CriClient, CriError, Pod
from tests.support.cri_config import KATA
from tests.support.daemons import Containerd
from tests.support.netns import call_in_netns, in_netns
from tests.support.portforward import Forwarded, forward_once

# The kata handler's configuration: the one in effect (KATA_CONF_FILE, /etc, the defaults).
KATA_CONFIG = Path("/run/kata-cri-portforward-configuration.toml")
CRI_RUNTIMES = {"kata": dataclasses.replace(KATA, options={"ConfigPath": str(KATA_CONFIG)})}
HANDLERS = ["runc", pytest.param("kata", marks=pytest.mark.vm)]
PORT = 8080
CLOSED_PORT = 8081
PAGE = "hello-through-port-forward"
SERVER = ["sh", "-c", f"mkdir -p /www && echo {PAGE} > /www/index.html && "
          "head -c 1048576 /dev/urandom > /www/big && exec httpd -f -p 8080 -h /www"]
START_TIMEOUT = 30.0


@pytest.fixture(scope="module", autouse=True)
def kata_config() -> Iterator[Path]:
    KATA_CONFIG.write_text(find_config().read_text())
    yield KATA_CONFIG
    KATA_CONFIG.unlink(missing_ok=True)


def _run_pod(cri: CriClient, containerd: Containerd, handler: str) -> Pod:
    uid = uuid.uuid4().hex[:12]
    return cri.run_pod("fwd", "default", uid, handler, cgroup_parent=containerd.cgroup_parent,
                       log_directory=str(containerd.base / "pod-logs" / f"default_fwd_{uid}"))


def _forward(cri: CriClient, containerd: Containerd, pod: Pod, port: int, request: bytes,
             timeout: float = 30.0) -> Forwarded:
    """One forward, as `kubectl port-forward` makes per connection: a fresh URL (its token is good for
    one use), reached from containerd's network namespace (its streaming server is on loopback there)."""
    url = cri.port_forward(pod.id, [port])
    assert containerd.netns is not None

    def connect(host: str, p: int, t: float) -> socket.socket:
        return call_in_netns(containerd.netns or "", lambda: socket.create_connection((host, p), timeout=t))

    return forward_once(url, port, request, timeout=timeout, connect=connect)


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.0\r\n\r\n".encode()


def _body(result: Forwarded) -> bytes:
    head, _, body = result.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], result
    return body


def _first_page(cri: CriClient, containerd: Containerd, pod: Pod) -> Forwarded:
    """The page, once httpd listens (it starts with the container): refused forwards are retried."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        result = _forward(cri, containerd, pod, PORT, _get("/"))
        if result.data or time.monotonic() >= deadline:
            return result
        time.sleep(0.5)


def _listening(netns: str) -> list[str]:
    """The TCP listeners' addresses in the namespace at ``netns``."""
    out = in_netns(netns, "ss", "-Htln").stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("handler", HANDLERS)
def test_port_forward_reaches_the_pods_server(cri: CriClient, cri_containerd: Containerd, handler: str,
                                              request: pytest.FixtureRequest) -> None:
    if handler == "kata":
        request.getfixturevalue("needs_guest")
    pod = _run_pod(cri, cri_containerd, handler)
    try:
        server = cri.run_container(pod, "web", cri_containerd.image, SERVER)
        page = _first_page(cri, cri_containerd, pod)
        assert _body(page) == f"{PAGE}\n".encode() and page.error == "", page

        # A megabyte of random bytes, intact (the relay's framing, in both directions of the forward).
        big = _forward(cri, cri_containerd, pod, PORT, _get("/big"))
        digest = cri.exec_sync(server, ["sha256sum", "/www/big"]).stdout.split()[0]
        assert hashlib.sha256(_body(big)).hexdigest() == digest and len(_body(big)) == 1 << 20

        # Nothing listens on this port in the pod: the forward ends at once, with the server's error.
        closed = _forward(cri, cri_containerd, pod, CLOSED_PORT, _get("/"), timeout=20)
        assert closed.data == b"" and str(CLOSED_PORT) in closed.error, closed
        assert closed.seconds < 5.0, closed

        netns = cri.pod_netns(pod.id)
        if handler == "kata":
            # The forwarder listens on the pod's loopback only: the pod's address exposes nothing new.
            listening = _listening(netns)
            assert listening and all(a.startswith(("127.0.0.1:", "[::1]:")) for a in listening), listening
            assert "redirect to" in in_netns(netns, "nft", "list", "table", "inet", TABLE).stdout

        cri.stop_pod_sandbox(pod.id)
        assert not os.path.exists(netns)
        with pytest.raises(CriError):  # a stopped pod forwards nothing
            cri.port_forward(pod.id, [PORT])
        cri.remove_pod_sandbox(pod.id)
        assert cri_containerd.traces_of(pod.id) == []
    finally:
        cri.remove_pod(pod.id)

