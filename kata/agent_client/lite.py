"""The handful of agent calls a process monitor makes, encoded with kata.ttrpc.wire.

The monitor (one per container process on the host) must stay small, so it does not load the
protobuf runtime and the generated agent API. Field numbers are those of kata/protocols/agent.proto;
tests/unit/test_agent_lite.py checks every encoding here against the generated classes.

The agent is not trusted: whatever it answers, a call returns a checked value or raises AgentCallError
(StreamEnded for the end of a stream), never anything else.
"""

from __future__ import annotations

from kata import ttrpc
from kata.errors import KataError
from kata.protocols.agent_api import AGENT_SERVICE, HEALTH_SERVICE, LONG_POLL_METHODS
from kata.ttrpc import wire

# The agent's answer to a read once the stream has ended (see kata.agent_client.client.EOF_CODE).
EOF_CODE = ttrpc.Code.OUT_OF_RANGE
# An exit status is a byte: the status, or 128 + the signal that ended the process.
_MAX_EXIT_STATUS = 255
_DEFAULT = -1.0


class AgentCallError(ttrpc.TTRPCError, KataError):
    """A call failed: a ttrpc status (``code``) that reads as one line for the user."""

    def __init__(self, method: str, error: ttrpc.TTRPCError) -> None:
        super().__init__(error.code, f"agent {method}: {error.message}")

    def __str__(self) -> str:
        return self.message


class StreamEnded(Exception):
    """ReadStdout/ReadStderr: no more data will come."""


def _bad_answer(method: str, what: str) -> AgentCallError:
    return AgentCallError(method, ttrpc.TTRPCError(ttrpc.Code.INTERNAL, what))


class LiteAgent:
    """Calls on one ttrpc client. Long-poll calls (wait, reads, writes to stdin) have no deadline;
    the others have ``timeout``."""

    def __init__(self, client: ttrpc.Client, timeout: float = 60.0) -> None:
        self.client = client
        self.timeout = timeout

    def _call(self, method: str, payload: bytes, timeout: float | None = _DEFAULT,
              service: str = AGENT_SERVICE) -> wire.Fields:
        """The answer's fields, parsed: a reply that is no protobuf message fails the call."""
        if timeout == _DEFAULT:
            timeout = None if service == AGENT_SERVICE and method in LONG_POLL_METHODS else self.timeout
        try:
            return wire.decode(self.client.call_raw(service, method, payload, timeout))
        except ttrpc.TTRPCError as exc:
            raise AgentCallError(method, exc) from None
        except wire.WireError as exc:
            raise _bad_answer(method, f"malformed response: {exc}") from None

    def check(self, timeout: float) -> None:
        self._call("Check", b"", timeout, HEALTH_SERVICE)

    def exec_process(self, cid: str, exec_id: str, process_json: bytes) -> None:
        self._call("ExecProcess", wire.encode(((1, cid), (2, exec_id), (3, process_json))))

    def start_container(self, cid: str) -> None:
        self._call("StartContainer", wire.encode(((1, cid),)))

    def signal(self, cid: str, exec_id: str, signum: int) -> None:
        self._call("SignalProcess", wire.encode(((1, cid), (2, exec_id), (3, signum))))

    def wait(self, cid: str, exec_id: str) -> int:
        return self.wait_exit(cid, exec_id)[0]

    def wait_exit(self, cid: str, exec_id: str) -> tuple[int, bool]:
        """(exit status, whether the container was killed for lack of memory). A status that no
        process can have is an error: the caller cannot know the real one."""
        fields = self._call("WaitProcess", wire.encode(((1, cid), (2, exec_id))))
        status = wire.last_int(fields, 1, signed32=True)
        if not 0 <= status <= _MAX_EXIT_STATUS:
            raise _bad_answer("WaitProcess", f"exit status {status} is out of range")
        return status, bool(wire.last_int(fields, 2))

    def read(self, stream: str, cid: str, exec_id: str, length: int) -> bytes:
        """The next chunk (at most ``length`` bytes) of "stdout" or "stderr"; StreamEnded at the end."""
        method = "ReadStdout" if stream == "stdout" else "ReadStderr"
        try:
            fields = self._call(method, wire.encode(((1, cid), (2, exec_id), (3, length))))
        except ttrpc.TTRPCError as exc:
            if exc.code == EOF_CODE:
                raise StreamEnded(method) from None
            raise
        data = wire.last_bytes(fields, 1)
        if len(data) > length:
            raise _bad_answer(method, f"{len(data)} bytes for a read of at most {length}")
        return data

    def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int:
        """How much of ``data`` the process's stdin took (all of it, from our agent)."""
        written = wire.last_int(self._call("WriteStdin", wire.encode(((1, cid), (2, exec_id), (3, data)))), 1)
        if not 0 <= written <= len(data):
            raise _bad_answer("WriteStdin", f"{written} bytes written of {len(data)}")
        return written

    def close_stdin(self, cid: str, exec_id: str) -> None:
        self._call("CloseStdin", wire.encode(((1, cid), (2, exec_id))))

    def get_metrics(self, timeout: float) -> wire.Fields:
        """The guest's figures, as fields: kata.metrics.guest checks them."""
        return self._call("GetMetrics", b"", timeout)

    def resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        self._call("TtyWinResize", wire.encode(((1, cid), (2, exec_id), (3, rows), (4, cols))))
