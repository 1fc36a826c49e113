"""kata.agent.lite encodes exactly what the generated agent API would, over a real ttrpc pair."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.empty_pb2 import Empty

from kata import ttrpc
from kata.agent.lite import LiteAgent, StreamEnded
from kata.protocols import agent_pb2 as pb
from kata.protocols import health_pb2 as hpb


class Recorder:
    """An agent that records each request as the generated class parsed it."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def method(self, rtype: type, answer: Any) -> ttrpc.Method[Any]:
        def handler(ctx: ttrpc.Context, req: Any) -> Any:
            self.seen.append(req)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return ttrpc.Method(rtype, handler)


@pytest.fixture
def pair() -> Iterator[tuple[LiteAgent, Recorder]]:
    rec = Recorder()
    server = ttrpc.Server()
    eof = ttrpc.TTRPCError(ttrpc.Code.OUT_OF_RANGE, "EOF")
    server.register_service("grpc.AgentService", {
        "ExecProcess": rec.method(pb.ExecProcessRequest, Empty()),
        "StartContainer": rec.method(pb.StartContainerRequest, Empty()),
        "SignalProcess": rec.method(pb.SignalProcessRequest, Empty()),
        "WaitProcess": rec.method(pb.WaitProcessRequest, pb.WaitProcessResponse(status=137, oom_killed=True)),
        "ReadStdout": rec.method(pb.ReadStreamRequest, pb.ReadStreamResponse(data=b"out")),
        "ReadStderr": rec.method(pb.ReadStreamRequest, eof),
        "WriteStdin": rec.method(pb.WriteStreamRequest, pb.WriteStreamResponse(len=3)),
        "CloseStdin": rec.method(pb.CloseStdinRequest, Empty()),
        "TtyWinResize": rec.method(pb.TtyWinResizeRequest, Empty()),
    })
    server.register_service("grpc.Health", {"Check": rec.method(hpb.CheckRequest, hpb.HealthCheckResponse())})
    a, b = socket.socketpair()
    threading.Thread(target=server.serve, args=(ttrpc.socket_stream(a),), daemon=True).start()
    client = ttrpc.Client(ttrpc.socket_stream(b))
    yield LiteAgent(client, timeout=5), rec
    client.close()
    server.shutdown()


def test_every_call_parses_as_the_generated_message(pair: tuple[LiteAgent, Recorder]) -> None:
    agent, rec = pair
    agent.check(1.0)
    agent.exec_process("c", "e1", b'{"args":["true"]}')
    agent.start_container("c")
    agent.signal("c", "", 15)
    assert agent.wait_exit("c", "e1") == (137, True)
    assert agent.read("stdout", "c", "", 4096) == b"out"
    with pytest.raises(StreamEnded):
        agent.read("stderr", "c", "", 4096)
    assert agent.write_stdin("c", "e1", b"abc") == 3
    agent.close_stdin("c", "e1")
    agent.resize("c", "e1", 24, 80)
    assert rec.seen == [
        hpb.CheckRequest(),
        pb.ExecProcessRequest(container_id="c", exec_id="e1", oci_process_json=b'{"args":["true"]}'),
        pb.StartContainerRequest(container_id="c"),
        pb.SignalProcessRequest(container_id="c", signal=15),
        pb.WaitProcessRequest(container_id="c", exec_id="e1"),
        pb.ReadStreamRequest(container_id="c", len=4096),
        pb.ReadStreamRequest(container_id="c", len=4096),
        pb.WriteStreamRequest(container_id="c", exec_id="e1", data=b"abc"),
        pb.CloseStdinRequest(container_id="c", exec_id="e1"),
        pb.TtyWinResizeRequest(container_id="c", exec_id="e1", row=24, column=80),
    ]
