"""The handful of agent calls a process monitor makes, encoded with kata.ttrpc.wire.

The monitor (one per container process on the host) must stay small, so it does not load the
protobuf runtime and the generated agent API. Field numbers are those of kata/protocols/agent.proto;
tests/unit/test_agent_lite.py checks every encoding here against the generated classes.
"""

from __future__ import annotations

from kata import ttrpc
from kata.errors import KataError
from kata.ttrpc import wire

AGENT = "grpc.AgentService"
HEALTH = "grpc.Health"
# The agent's answer to a read once the stream has ended (see kata.agent.client.EOF_CODE).
EOF_CODE = ttrpc.Code.OUT_OF_RANGE


class AgentCallError(ttrpc.TTRPCError, KataError):
    """A call failed: a ttrpc status (``code``) that reads as one line for the user."""

    def __init__(self, method: str, error: ttrpc.TTRPCError) -> None:
        super().__init__(error.code, f"agent {method}: {error.message}")

    def __str__(self) -> str:
        return self.message


class StreamEnded(Exception):
    """ReadStdout/ReadStderr: no more data will come."""


class LiteAgent:
    """Calls on one ttrpc client. Blocking calls (wait, reads) have no deadline; others have ``timeout``."""

    def __init__(self, client: ttrpc.Client, timeout: float = 60.0) -> None:
        self.client = client
        self.timeout = timeout

    def _call(self, method: str, payload: bytes, timeout: float | None = -1.0, service: str = AGENT) -> bytes:
        deadline = self.timeout if timeout == -1.0 else timeout
        try:
            return self.client.call_raw(service, method, payload, deadline)
        except ttrpc.TTRPCError as exc:
            raise AgentCallError(method, exc) from None

    def check(self, timeout: float) -> None:
        self._call("Check", b"", timeout, HEALTH)

    def exec_process(self, cid: str, exec_id: str, process_json: bytes) -> None:
        self._call("ExecProcess", wire.encode(((1, cid), (2, exec_id), (3, process_json))))

    def start_container(self, cid: str) -> None:
        self._call("StartContainer", wire.encode(((1, cid),)))

    def signal(self, cid: str, exec_id: str, signum: int) -> None:
        self._call("SignalProcess", wire.encode(((1, cid), (2, exec_id), (3, signum))))

    def wait(self, cid: str, exec_id: str) -> int:
        return self.wait_exit(cid, exec_id)[0]

    def wait_exit(self, cid: str, exec_id: str) -> tuple[int, bool]:
        """(exit status, whether the container was killed for lack of memory)."""
        fields = wire.decode(self._call("WaitProcess", wire.encode(((1, cid), (2, exec_id))), None))
        return wire.last_int(fields, 1, signed32=True), bool(wire.last_int(fields, 2))

    def read(self, stream: str, cid: str, exec_id: str, length: int) -> bytes:
        """The next chunk of "stdout" or "stderr"; raises StreamEnded at the end."""
        method = "ReadStdout" if stream == "stdout" else "ReadStderr"
        try:
            data = self._call(method, wire.encode(((1, cid), (2, exec_id), (3, length))), None)
        except ttrpc.TTRPCError as exc:
            if exc.code == EOF_CODE:
                raise StreamEnded(method) from None
            raise
        return wire.last_bytes(wire.decode(data), 1)

    def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int:
        reply = self._call("WriteStdin", wire.encode(((1, cid), (2, exec_id), (3, data))), None)
        return wire.last_int(wire.decode(reply), 1)

    def close_stdin(self, cid: str, exec_id: str) -> None:
        self._call("CloseStdin", wire.encode(((1, cid), (2, exec_id))))

    def resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        self._call("TtyWinResize", wire.encode(((1, cid), (2, exec_id), (3, rows), (4, cols))))
