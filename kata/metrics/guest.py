"""The guest's figures (the agent's GetMetrics answer), checked before anything is made of them.

The guest is not trusted: its answer is read with kata.ttrpc.wire (no protobuf in the runc path's
monitor), and every name must look like the kernel's, every count of entries is bounded, every number
fits, and no name repeats. Anything else fails the whole answer with one line (GuestMetricsError): a
sandbox whose guest lies has its scrape fail, and nothing the guest wrote reaches the host's text.
Field numbers are those of kata/protocols/agent.proto (tests/unit/test_metrics_figures.py checks them against
the generated classes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from kata import ttrpc
from kata.agent_client.lite import LiteAgent
from kata.metrics import MetricsError
from kata.metrics.figures import ContainerFigures, GuestFigures, ProcessFigures
from kata.ttrpc import wire
from kata.utils.ids import id_problem

V = TypeVar("V")

# How long a scrape waits for the agent: kata-monitor waits a little longer for the whole sandbox.
TIMEOUT = 2.0
# Names as the kernel writes them in /proc/meminfo, cgroup files and /proc/PID/*: "Active(anon)" at most.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_()]{0,63}")
_CPU = re.compile(r"cpu[0-9]{0,4}")
# An interface name as Linux allows it in practice (IFNAMSIZ), without what a label or a log would mangle.
_INTERFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}")
# Far above what a guest has (about 55 meminfo lines, a few CPUs and interfaces), far below what costs.
MAX_FIGURES = 128
MAX_CPUS = 1025  # "cpu" and 1024 CPUs
MAX_INTERFACES = 64
MAX_CONTAINERS = 256
# All figures of one answer: each list has its own bound, but together they could reach ~200,000
# within a ttrpc frame, rendered at every scrape. An idle pod sends about 400.
MAX_TOTAL_FIGURES = 16384
_MAX_VALUE = (1 << 63) - 1
_MAX_CLOCK_TICKS = 100_000
_MAX_LOAD_THOUSANDTHS = 1_000_000_000  # a load of a million


class GuestMetricsError(MetricsError):
    def __init__(self, what: str) -> None:
        super().__init__(f"guest metrics: {what}")


def fetch(agent: LiteAgent, timeout: float = TIMEOUT) -> GuestFigures:
    """Ask the agent, and check its answer."""
    try:
        fields = agent.get_metrics(timeout)
    except ttrpc.TTRPCError as exc:
        raise GuestMetricsError(exc.message) from None
    return decode(fields)


def decode(fields: wire.Fields) -> GuestFigures:
    """A Metrics message's fields (wire.decode), checked; GuestMetricsError for anything out of bounds."""
    try:
        return _metrics(fields)
    except wire.WireError as exc:
        raise GuestMetricsError(str(exc)) from None


def _metrics(f: wire.Fields) -> GuestFigures:
    clock_ticks = _int(f, 1)
    if not 1 <= clock_ticks <= _MAX_CLOCK_TICKS:
        raise GuestMetricsError(f"clock ticks {clock_ticks} per second")
    load = _figures(f, 5, "load")
    if any(v > _MAX_LOAD_THOUSANDTHS for v in load.values()):
        raise GuestMetricsError("a load out of range")
    agent = _messages(f, 8, "agent", 1)
    containers = [_container(m) for m in _messages(f, 9, "containers", MAX_CONTAINERS)]
    _unique([c.id for c in containers], "container")
    figures = GuestFigures(
        clock_ticks=clock_ticks,
        meminfo=_figures(f, 2, "meminfo"),
        cpu=_named(f, 3, "cpu", _CPU, MAX_CPUS),
        stat=_figures(f, 4, "stat"),
        load={k: v / 1000 for k, v in load.items()},
        tasks=_figures(f, 6, "tasks"),
        netdev=_named(f, 7, "netdev", _INTERFACE, MAX_INTERFACES),
        agent=_process(agent[0]) if agent else ProcessFigures(),
        containers=containers,
        scrapes=_int(f, 10),
    )
    agent_figures = figures.agent
    total = (len(figures.meminfo) + len(figures.stat) + len(figures.load) + len(figures.tasks)
             + _count(figures.cpu) + _count(figures.netdev)
             + len(agent_figures.stat) + len(agent_figures.status) + len(agent_figures.io)
             + sum(len(c.cpu) + len(c.memory) + len(c.pids) + len(c.io) for c in containers))
    if total > MAX_TOTAL_FIGURES:
        raise GuestMetricsError(f"{total} figures, more than {MAX_TOTAL_FIGURES}")
    return figures


def _count(named: dict[str, dict[str, int]]) -> int:
    return sum(len(v) for v in named.values())


def _process(f: wire.Fields) -> ProcessFigures:
    return ProcessFigures(stat=_figures(f, 1, "agent stat"), status=_figures(f, 2, "agent status"),
                          io=_figures(f, 3, "agent io"), open_fds=_int(f, 4))


def _container(f: wire.Fields) -> ContainerFigures:
    cid = _str(f, 1)
    problem = id_problem(cid)
    if problem:
        raise GuestMetricsError(f"a container id: {problem}")
    return ContainerFigures(id=cid, cpu=_figures(f, 2, "container cpu"),
                            memory=_figures(f, 3, "container memory"), pids=_figures(f, 4, "container pids"),
                            io=_figures(f, 5, "container io"))


def _keyed(f: wire.Fields, number: int, what: str, pattern: re.Pattern[str], limit: int,
           value: Callable[[wire.Fields, str], V]) -> dict[str, V]:
    """Repeated messages whose field 1 is a name (matching ``pattern``, each once); ``value`` reads
    the rest of each."""
    out: dict[str, V] = {}
    for m in _messages(f, number, what, limit):
        name = _str(m, 1)
        if not pattern.fullmatch(name):
            raise GuestMetricsError(f"{what}: a name that is not one: {ascii(name[:32])}")
        if name in out:
            raise GuestMetricsError(f"{what}: {name} twice")
        out[name] = value(m, f"{what} {name}")
    return out


def _named(f: wire.Fields, number: int, what: str, pattern: re.Pattern[str], limit: int
           ) -> dict[str, dict[str, int]]:
    """Repeated NamedFigures {name = 1; repeated Figure figures = 2}."""
    return _keyed(f, number, what, pattern, limit, lambda m, w: _figures(m, 2, w))


def _figures(f: wire.Fields, number: int, what: str) -> dict[str, int]:
    """Repeated Figure {name = 1; value = 2}."""
    return _keyed(f, number, what, _NAME, MAX_FIGURES, lambda m, _: _int(m, 2))


def _messages(f: wire.Fields, number: int, what: str, limit: int) -> list[wire.Fields]:
    values = f.get(number, [])
    if len(values) > limit:
        raise GuestMetricsError(f"{what}: {len(values)} entries, more than {limit}")
    out = []
    for v in values:
        if not isinstance(v, bytes):
            raise GuestMetricsError(f"{what}: not a message")
        out.append(wire.decode(v))
    return out


def _int(f: wire.Fields, number: int) -> int:
    values = f.get(number)
    if not values:
        return 0
    value = values[-1]
    if not isinstance(value, int) or value > _MAX_VALUE:
        raise GuestMetricsError(f"field {number}: not a number that fits")
    return value


def _str(f: wire.Fields, number: int) -> str:
    values = f.get(number)
    if not values:
        return ""
    if not isinstance(values[-1], bytes):
        raise GuestMetricsError(f"field {number}: not text")
    try:
        return values[-1].decode("ascii")
    except UnicodeDecodeError:
        raise GuestMetricsError(f"field {number}: not ASCII") from None


def _unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise GuestMetricsError(f"a {what} twice")
