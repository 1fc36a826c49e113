"""Our client against containerd's own Go ttrpc server: the runc shim v2 binary, serving its task API.

The shim is started the way containerd starts its daemon half (listening socket inherited as fd 3); no
task is created, so it only answers Connect, error statuses and Shutdown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import StringValue

from kata.ttrpc import Client, Code, TTRPCError, socket_stream

SHIM = shutil.which("containerd-shim-runc-v2")
TASK = "containerd.task.v2.Task"

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(SHIM is None, reason="containerd-shim-runc-v2 is not installed"),
]

ShimClient = tuple[Client, "subprocess.Popen[bytes]"]


@pytest.fixture
def shim_client(tmp_path: Path) -> Iterator[ShimClient]:
    assert SHIM is not None
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    os.mkfifo(bundle / "log")

    def drain_log() -> None:  # the shim opens its log fifo for writing and needs a reader
        with open(bundle / "log", "rb") as f:
            while f.read(4096):
                pass

    threading.Thread(target=drain_log, daemon=True).start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "shim.sock"))
    listener.listen()
    dead_end = str(tmp_path / "containerd.sock")  # events have nowhere to go; none are sent here
    argv = [SHIM, "-namespace", "ttrpctest", "-id", "interop", "-address", dead_end]
    argv += ["-publish-binary", "/bin/true"]
    proc = subprocess.Popen(
        argv,
        cwd=bundle,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TTRPC_ADDRESS": dead_end},
        # fd 3 is where the shim looks for its listener; close_fds would close it again after preexec_fn.
        preexec_fn=lambda: os.dup2(listener.fileno(), 3),
        close_fds=False,
    )
    listener.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(tmp_path / "shim.sock"))
    client = Client(socket_stream(sock))
    try:
        yield client, proc
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def test_calls_against_containerd_go_ttrpc_server(shim_client: ShimClient) -> None:
    client, proc = shim_client
    # ConnectResponse field 1 is shim_pid; an Empty keeps it as an unknown field, so read the raw bytes.
    raw = client.call(TASK, "Connect", Empty(), Empty, timeout=10).SerializeToString()
    assert raw[0] == 0x08 and _varint(raw[1:]) == proc.pid

    with pytest.raises(TTRPCError) as err:
        client.call(TASK, "NoSuchMethod", Empty(), Empty, timeout=10)
    assert err.value.code == Code.UNIMPLEMENTED

    # StateRequest.id is field 1, a string, like StringValue.value.
    with pytest.raises(TTRPCError) as err:
        client.call(TASK, "State", StringValue(value="nope"), Empty, timeout=10, metadata={"k": "v"})
    assert err.value.code == Code.NOT_FOUND

    results: list[bytes] = []

    def connect() -> None:
        results.append(client.call(TASK, "Connect", Empty(), Empty, timeout=10).SerializeToString())

    threads = [threading.Thread(target=connect) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [raw] * 16

    # Shutdown makes the shim exit: the client must notice the closed connection.
    try:
        client.call(TASK, "Shutdown", StringValue(value="interop"), Empty, timeout=10)
    except TTRPCError as exc:
        assert exc.code == Code.UNAVAILABLE  # the shim may exit before its answer is written
    proc.wait(10)
    for _ in range(100):
        if client.closed:
            break
        threading.Event().wait(0.05)
    assert client.closed


def _varint(data: bytes) -> int:
    value = shift = 0
    for b in data:
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return value
