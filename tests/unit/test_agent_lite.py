"""kata.agent_client.lite encodes exactly what the generated agent API would, over a real ttrpc pair."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.empty_pb2 import Empty

from kata import ttrpc
from kata.agent_client.lite import AgentCallError, LiteAgent, StreamEnded
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
    a.close()


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


class Raw:
    """An answer of arbitrary bytes, as a hostile agent would send."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        return self.data


@pytest.mark.parametrize(("method", "answer", "call"), [
    ("WaitProcess", pb.WaitProcessResponse(status=300), lambda a: a.wait_exit("c", "")),
    ("WaitProcess", pb.WaitProcessResponse(status=-1), lambda a: a.wait("c", "")),
    ("WaitProcess", Raw(b"\x08"), lambda a: a.wait("c", "")),  # a varint cut short
    ("WaitProcess", Raw(b"\x0f\x00"), lambda a: a.wait("c", "")),  # wire type 7 does not exist
    ("ReadStdout", pb.ReadStreamResponse(data=b"x" * 5000), lambda a: a.read("stdout", "c", "", 4096)),
    ("ReadStdout", Raw(b"\x0a\xff\xff\x03"), lambda a: a.read("stdout", "c", "", 4096)),  # field past the end
    ("WriteStdin", pb.WriteStreamResponse(len=4), lambda a: a.write_stdin("c", "", b"abc")),
    ("WriteStdin", Raw(b"\x08" + b"\xff" * 9 + b"\x01"), lambda a: a.write_stdin("c", "", b"abc")),  # -1
    ("SignalProcess", Raw(b"\xff" * 11), lambda a: a.signal("c", "", 9)),  # an overlong varint key
])
def test_answers_no_agent_could_give_fail_the_call(method: str, answer: Any, call: Any) -> None:
    """Whatever the agent answers, LiteAgent raises AgentCallError (a one-line TTRPCError), nothing else."""
    server = ttrpc.Server()
    rtype = {"WaitProcess": pb.WaitProcessRequest, "ReadStdout": pb.ReadStreamRequest,
             "WriteStdin": pb.WriteStreamRequest, "SignalProcess": pb.SignalProcessRequest}[method]
    server.register_service("grpc.AgentService", {method: ttrpc.Method(rtype, lambda ctx, req: answer)})
    a, b = socket.socketpair()
    threading.Thread(target=server.serve, args=(ttrpc.socket_stream(a),), daemon=True).start()
    client = ttrpc.Client(ttrpc.socket_stream(b))
    try:
        with pytest.raises(AgentCallError) as err:
            call(LiteAgent(client, timeout=5))
        assert err.value.code == ttrpc.Code.INTERNAL
        assert str(err.value).startswith(f"agent {method}: ") and str(err.value).isprintable()
    finally:
        client.close()
        server.shutdown()
        a.close()
