"""A hostile agent: it speaks ttrpc on a socket and answers each request the way a seeded generator chose.

A case's plan is a list of replies drawn before the case runs, one per request in arrival order (the
requests after the plan get the connection dropped): well-formed answers carrying hostile values,
error statuses with hostile messages, garbage and mutated envelopes and payloads, invalid UTF-8,
negative, huge and overlong varints, answers to the wrong stream id or of the wrong frame type, floods
of unsolicited frames, oversized and truncated frames, a stream nothing can be parsed in, answers to
requests not yet sent, silence (stall), a peer that stops reading (deaf), and dropped connections.
"""

from __future__ import annotations

import random
import socket
import threading
from collections import deque
from collections.abc import Callable

from kata.protocols import agent_pb2 as pb
from kata.protocols import health_pb2 as hpb
from kata.ttrpc import frame, wire
from kata.ttrpc.envelope import Request
from kata.ttrpc.errors import ProtocolError

STALL = "stall"  # this request is never answered
DEAF = "deaf"  # stop reading and answering (the connection stays open until the harness closes it)
CLOSE = "close"  # drop the connection now
Step = bytes | str
Builder = Callable[[int, bytes], list[Step]]  # (stream id, a well-formed answer) -> what to send

MAX = frame.MAX_MESSAGE_SIZE


# ---- hostile values ---------------------------------------------------------------------------------
def hostile_text(rng: random.Random) -> str:
    return rng.choice([
        "", "fine", "two\nlines", "\r\n\r\n", "\x1b[2J\x1b[H\x1b]0;owned\x07", "\u202eevil", "nul\x00",
        'time="2020-01-01T00:00:00Z" level=error msg="forged"\n', "A" * rng.choice([600, 5000, 70000]),
        "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(1, 80))),
        "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape"),
    ])


def utf8_text(rng: random.Random, limit: int) -> str:
    """hostile_text that a protobuf string field can carry (valid UTF-8; invalid is sent by hand)."""
    return hostile_text(rng)[:limit].encode("utf-8", "replace").decode()


def hostile_bytes(rng: random.Random, limit: int = 300) -> bytes:
    return rng.choice([
        b"", b"\xff\xfe\x80\xc0", hostile_text(rng).encode("utf-8", "surrogateescape"),
        rng.randbytes(rng.randrange(0, limit)), b"\n" * rng.randrange(1, 200),
    ])


def hostile_int(rng: random.Random) -> int:
    return rng.choice([0, 1, 9, 137, 255, 256, -1, -255, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63),
                       rng.randrange(-(2**63), 2**63)])


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        if op == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 1 and out:
            del out[rng.randrange(len(out)):]
        elif op == 2:
            out[rng.randrange(len(out) + 1):0] = rng.randbytes(rng.randrange(1, 12))
        else:
            out += rng.randbytes(rng.randrange(1, 12))
    return bytes(out)


def varint_garbage(rng: random.Random) -> bytes:
    """Fields whose keys, lengths or values no decoder should take as they are."""
    pieces = [
        b"\x08" + b"\xff" * 10 + b"\x01",  # an overlong varint
        b"\x08" + b"\xff" * 9 + b"\x01",  # -1 as a 10-byte varint
        b"\x08\xff\xff\xff\xff\x0f",  # 2**32 - 1 (-1 as int32)
        b"\x08\x80\x80\x80\x80\x08",  # 2**31: past int32
        b"\x0e\x00", b"\x0f\x00",  # wire types 6 and 7
        b"\x00\x01",  # field number 0
        b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
        b"\x0a\x05ab",  # a length past the end, by a little
        b"\xff" * 12,  # a key that never ends
        b"\x0b", b"\x0c",  # groups
        b"\x09" + b"\x00" * 3,  # a fixed64 cut short
        b"\x12\x02\xff\xfe",  # invalid UTF-8 in field 2
        b"\x0a\x03\xc3\x28\x80",  # invalid UTF-8 in field 1
    ]
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 4)))


def status(code: int, message: bytes) -> bytes:
    """A Response with this status (the message as raw bytes, so that it may be invalid UTF-8)."""
    return wire.encode(((1, wire.encode(((1, code), (2, message))) or b""),))


def ok(payload: bytes) -> bytes:
    return b"\x0a\x00" + wire.encode(((2, payload),))


def frame_of(stream_id: int, payload: bytes, msg_type: int = frame.TYPE_RESPONSE, flags: int = 0) -> bytes:
    return frame.HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


# ---- well-formed answers with hostile values ----------------------------------------------------------
def valid_answer(rng: random.Random, method: str, payload: bytes) -> bytes:
    """What the method's response type can carry, with values no honest agent would send."""
    if method == "Check":
        health = hpb.HealthCheckResponse
        serving = rng.choice([health.UNKNOWN, health.SERVING, health.NOT_SERVING])
        return health(status=serving).SerializeToString()
    if method == "Version":
        return hpb.VersionCheckResponse(agent_version=utf8_text(rng, 100000)).SerializeToString()
    if method == "WaitProcess":
        status_ = hostile_int(rng) if rng.random() < 0.4 else rng.randrange(256)
        return wire.encode(((1, status_), (2, rng.randrange(2))))
    if method in ("ReadStdout", "ReadStderr"):
        try:
            asked = pb.ReadStreamRequest.FromString(payload).len
        except Exception:  # noqa: BLE001 - a request we did not expect: any size
            asked = 1024
        size = rng.choice([0, 1, asked, asked, asked + 1, 3 * asked])
        return pb.ReadStreamResponse(data=rng.randbytes(min(size, 1 << 20))).SerializeToString()
    if method == "WriteStdin":
        try:
            sent = len(pb.WriteStreamRequest.FromString(payload).data)
        except Exception:  # noqa: BLE001
            sent = 0
        return wire.encode(((1, rng.choice([sent, sent, 0, sent + 1, hostile_int(rng)])),))
    if method == "ListProcesses":
        return pb.ListProcessesResponse(process_list=hostile_bytes(rng, 5000)).SerializeToString()
    if method == "StatsContainer":
        resp = pb.StatsContainerResponse()
        resp.cgroup_stats.memory_stats.usage.usage = rng.randrange(2**64)
        resp.cgroup_stats.memory_stats.stats[utf8_text(rng, 100) or "k"] = rng.randrange(2**64)
        resp.cgroup_stats.cpu_stats.cpu_usage.percpu_usage.extend(rng.randrange(2**64) for _ in range(3))
        resp.cgroup_stats.pids_stats.current = rng.randrange(2**64)
        return resp.SerializeToString()
    if method == "GetOOMEvent":
        cid = rng.choice(["c1", "c2", "nope", utf8_text(rng, 200)])
        return pb.OOMEvent(container_id=cid).SerializeToString()
    if method == "GetGuestDetails":
        return pb.GuestDetailsResponse(mem_block_size_bytes=rng.randrange(2**64)).SerializeToString()
    return b""  # google.protobuf.Empty


# ---- replies ------------------------------------------------------------------------------------------
# Each kind draws its random parts when the plan is made, and returns what to send for a request.
def _valid(rng: random.Random) -> Builder:
    return lambda sid, good: [frame_of(sid, ok(good))]


def _status(rng: random.Random) -> Builder:
    code = rng.choice([*range(1, 17), 0, -1, 99, 2**31, 2**40, 11, 11])
    message = hostile_bytes(rng, 2000)
    return lambda sid, good: [frame_of(sid, status(code, message))]


def _garbage_payload(rng: random.Random) -> Builder:
    junk = rng.randbytes(rng.choice([1, 5, 40, 300, 5000]))
    return lambda sid, good: [frame_of(sid, ok(junk))]


def _mutated_payload(rng: random.Random) -> Builder:
    seed = rng.random()
    return lambda sid, good: [frame_of(sid, ok(mutate(random.Random(seed), good)))]


def _garbage_envelope(rng: random.Random) -> Builder:
    junk = rng.randbytes(rng.choice([1, 3, 17, 200, 3000]))
    return lambda sid, good: [frame_of(sid, junk)]


def _mutated_envelope(rng: random.Random) -> Builder:
    seed = rng.random()
    return lambda sid, good: [frame_of(sid, mutate(random.Random(seed), ok(good)))]


def _varints(rng: random.Random) -> Builder:
    payload = varint_garbage(rng)
    in_status = rng.random() < 0.3
    return lambda sid, good: [frame_of(sid, status(2, b"x") + payload if in_status else ok(payload))]


def _bad_utf8(rng: random.Random) -> Builder:
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"])
    where = rng.randrange(3)
    if where == 0:
        return lambda sid, good: [frame_of(sid, status(5, bad))]
    if where == 1:
        return lambda sid, good: [frame_of(sid, ok(wire.encode(((1, bad),))))]
    return lambda sid, good: [frame_of(sid, wire.encode(((1, wire.encode(((2, bad),))),)))]


def _wrong_id(rng: random.Random, silent: bool) -> Builder:
    pick = rng.randrange(5)
    then_answer = not silent

    def build(sid: int, good: bytes) -> list[Step]:
        other = [sid + 2, sid + 1, 0, 2, 0xFFFFFFFF][pick]
        return [frame_of(other, ok(good)), frame_of(sid, ok(good)) if then_answer else STALL]
    return build


def _wrong_type(rng: random.Random, silent: bool) -> Builder:
    msg_type = rng.choice([frame.TYPE_DATA, frame.TYPE_REQUEST, 0, 0x42, 0xFF])
    flags = rng.randrange(256)
    then_answer = not silent
    return lambda sid, good: [frame_of(sid, ok(good), msg_type, flags),
                              frame_of(sid, ok(good)) if then_answer else STALL]


def _duplicate(rng: random.Random) -> Builder:
    return lambda sid, good: [frame_of(sid, ok(good)), frame_of(sid, ok(b"\xff" + good))]


def _flood(rng: random.Random, silent: bool) -> Builder:
    types = [frame.TYPE_RESPONSE, frame.TYPE_DATA, frame.TYPE_REQUEST, 0x42]
    frames = b"".join(
        frame_of(rng.randrange(2**32), rng.randbytes(rng.randrange(64)), rng.choice(types), rng.randrange(9))
        for _ in range(rng.randrange(10, 300)))
    then_answer = not silent
    return lambda sid, good: [frames, frame_of(sid, ok(good)) if then_answer else STALL]


def _premature(rng: random.Random) -> Builder:
    """Answers the next stream id before its request is sent (stream ids are easy to guess)."""
    return lambda sid, good: [frame_of(sid + 2, ok(good)), frame_of(sid, ok(good))]


def _truncated(rng: random.Random) -> Builder:
    cut = rng.random()
    def build(sid: int, good: bytes) -> list[Step]:
        whole = frame_of(sid, ok(good))
        return [whole[: int(cut * len(whole))], CLOSE]
    return build


def _huge_header(rng: random.Random) -> Builder:
    length = rng.choice([MAX + 1, 2**32 - 1, 2**31])
    msg_type = rng.choice([frame.TYPE_RESPONSE, frame.TYPE_DATA])
    tail = rng.randbytes(rng.randrange(0, 100))
    return lambda sid, good: [frame.HEADER.pack(length, sid, msg_type, 0) + tail, CLOSE]


def _unsyncable(rng: random.Random) -> Builder:
    junk = rng.randbytes(rng.randrange(0, 50))
    return lambda sid, good: [frame.HEADER.pack(2**32 - 1, sid, 0x42, 0) + junk]


def _oversized(rng: random.Random, silent: bool) -> Builder:
    then_answer = not silent
    return lambda sid, good: [frame.HEADER.pack(MAX + 1, sid, frame.TYPE_RESPONSE, 0) + bytes(MAX + 1),
                              frame_of(sid, ok(good)) if then_answer else STALL]


def _close(rng: random.Random) -> Builder:
    return lambda sid, good: [CLOSE]


def _stall(rng: random.Random, silent: bool) -> Builder:
    return lambda sid, good: [STALL]


def _deaf(rng: random.Random, silent: bool) -> Builder:
    return lambda sid, good: [DEAF]


def _eof(rng: random.Random) -> Builder:
    return lambda sid, good: [frame_of(sid, status(11, b"EOF"))]


Kind = Callable[[random.Random], Builder]
SilentKind = Callable[[random.Random, bool], Builder]  # silent: the real answer never follows
# (kind, weight)
KINDS: list[tuple[Kind, float]] = [
    (_valid, 22), (_status, 10), (_eof, 6), (_garbage_payload, 8), (_mutated_payload, 8),
    (_garbage_envelope, 6), (_mutated_envelope, 6), (_varints, 6), (_bad_utf8, 4), (_duplicate, 3),
    (_premature, 2), (_truncated, 3), (_huge_header, 2), (_unsyncable, 2), (_close, 3),
]
# Kinds that answer after something else, or (silent) never while the connection stays open.
SILENT_KINDS: list[tuple[SilentKind, float]] = [
    (_wrong_id, 4), (_wrong_type, 4), (_flood, 2), (_oversized, 0.2), (_stall, 0), (_deaf, 0),
]
# In a plan that goes silent, how its silent reply is picked.
_SILENT_WEIGHTS = [3, 3, 2, 0.5, 4, 2]


class Reply:
    __slots__ = ("kind", "build")

    def __init__(self, kind: str, build: Builder) -> None:
        self.kind = kind
        self.build = build

    def steps(self, sid: int, good: bytes) -> list[Step]:
        return self.build(sid, good)


def make_plan(rng: random.Random, length: int, stall: bool = False) -> list[Reply]:
    """``length`` replies; with ``stall``, one of the first two (which every case reaches) never comes."""
    plan = []
    for _ in range(length):
        name, kind, _ = rng.choices(_CHOICES, weights=[c[2] for c in _CHOICES])[0]
        plan.append(Reply(name, kind(random.Random(rng.random()), False)))
    if stall:
        silent = rng.choices([k for k, _ in SILENT_KINDS], weights=_SILENT_WEIGHTS)[0]
        build = silent(random.Random(rng.random()), True)
        plan[rng.randrange(min(2, length))] = Reply(_name(silent) + " (silent)", build)
    return plan


def _talking(kind: Kind) -> SilentKind:
    return lambda rng, silent: kind(rng)


def _name(kind: Callable[..., Builder]) -> str:
    return kind.__name__.strip("_")


# Every kind an ordinary plan draws from: (name, how to build it, weight).
_CHOICES: list[tuple[str, SilentKind, float]] = [
    *((_name(k), _talking(k), w) for k, w in KINDS), *((_name(k), k, w) for k, w in SILENT_KINDS)]


# ---- the peer -------------------------------------------------------------------------------------------
class HostileAgent:
    """Serves one connection with a plan; ``stalled`` is set once a request was left unanswered."""

    def __init__(self, sock: socket.socket, plan: list[Reply], rng: random.Random) -> None:
        self.sock = sock
        self.plan = deque(plan)
        self.rng = rng
        self.stalled = threading.Event()
        self.closing = threading.Event()
        # (method, kind of reply, the well-formed answer it was built from), in order of the requests.
        self.replies: list[tuple[str, str, bytes]] = []
        self.thread = threading.Thread(target=self._run, name="hostile-agent", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Drop the connection (a read blocked in our thread wakes up); the thread then ends."""
        self.closing.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def join(self) -> None:
        self.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the hostile agent's thread did not end"
        self.sock.close()

    def _run(self) -> None:
        stream = _Unowned(self.sock)
        reader = frame.FrameReader(stream)  # type: ignore[arg-type]
        try:
            while True:
                f = reader.next()
                if f is None or self.closing.is_set():
                    return
                if f.type != frame.TYPE_REQUEST:
                    continue
                req = Request.FromString(f.payload)
                reply = self.plan.popleft() if self.plan else None
                good = valid_answer(self.rng, req.method, req.payload)
                self.replies.append((req.method, reply.kind if reply else "close", good))
                steps = reply.steps(f.stream_id, good) if reply else [CLOSE]
                for step in steps:
                    if step == CLOSE:
                        self.close()
                        return
                    if step == STALL:
                        self.stalled.set()
                    elif step == DEAF:
                        self.stalled.set()
                        self.closing.wait()
                        return
                    else:
                        assert isinstance(step, bytes)
                        self.sock.sendall(step)
        except (ProtocolError, OSError):
            return
        finally:
            self.close()  # whatever ended the thread (a harness bug too), the peer sees the end


class _Unowned:
    """Reads from a socket this stream does not own (the agent closes it after its thread ended)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, n: int) -> bytes:
        return self._sock.recv(n)
