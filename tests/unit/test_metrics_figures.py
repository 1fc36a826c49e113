"""kata.metrics without a VM: /proc parsing, the guest's answer checked against a hostile agent, Kata's
families, the per-sandbox socket and kata-monitor's merge, over real sockets and the real agent service."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kata import ttrpc
from kata.agent_client.lite import LiteAgent
from kata.metrics import MetricsError, families
from kata.metrics.discovery import running_sandboxes
from kata.metrics.endpoint import Endpoint, fetch
from kata.metrics.guest import MAX_FIGURES, GuestMetricsError, decode
from kata.metrics.guest import fetch as fetch_guest
from kata.metrics.kata_monitor import Monitor, parse_listen_address
from kata.metrics.sandbox import SandboxMetrics
from kata.protocols import agent_pb2 as pb
from kata.ttrpc import wire
from kata.utils import procfs
from kata.utils.process import ProcessId
from kata.utils.usage import UsageError
from tests.unit.guest_fakes import agent_server, serve_on_socketpair


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of Prometheus text by (name, sorted labels), parsed by prometheus-client's parser."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


# ---- /proc -------------------------------------------------------------------------------------
def test_procfs_reads_this_process() -> None:
    st = procfs.process_stat(os.getpid())
    assert st["num_threads"] >= 1 and "utime" in st and "starttime" in st
    status = procfs.process_status("self")
    assert status["VmRSS"] > 1 << 20 and status["VmRSS"] % 1024 == 0
    assert procfs.open_fds("self") >= 3
    assert procfs.pss_bytes(os.getpid()) > 0
    assert procfs.process_stat(2**22 + 12345) == {} and procfs.open_fds(2**22 + 12345) is None


def test_procfs_parses_the_kernels_formats(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:        2048 kB\nActive(anon):  4 kB\nHugePages_Total:   3\n"
                                      "Broken: x kB\n")
    assert procfs.meminfo(str(tmp_path / "meminfo")) == {"MemTotal": 2 << 20, "Active(anon)": 4096,
                                                         "HugePages_Total": 3}
    (tmp_path / "stat").write_text("cpu  10 0 5 100 1 0 0 0 0 0\ncpu0 10 0 5 100 1 0 0 0 0 0\nintr 5 1 2\n"
                                   "ctxt 77\nprocesses 9\nprocs_running 1\n")
    assert procfs.cpu_times(str(tmp_path / "stat"))["cpu0"]["system"] == 5
    assert procfs.stat_counters(str(tmp_path / "stat")) == {"ctxt": 77, "processes": 9, "procs_running": 1}
    (tmp_path / "loadavg").write_text("0.50 1.25 2.00 3/140 999\n")
    assert procfs.loadavg(str(tmp_path / "loadavg")) == {"load1": 0.5, "load5": 1.25, "load15": 2.0,
                                                         "cur": 3, "max": 140}
    (tmp_path / "dev").write_text("Inter-|\n face |\n  eth0: 100 2 0 0 0 0 0 0 200 3 0 0 0 0 0 0\n")
    assert procfs.netdev(str(tmp_path / "dev"))["eth0"]["sent_bytes"] == 200


# ---- the guest's answer --------------------------------------------------------------------------
def good_metrics() -> pb.Metrics:
    fig = pb.Figure
    return pb.Metrics(
        clock_ticks=100, meminfo=[fig(name="MemTotal", value=512 << 20), fig(name="Active(anon)", value=4096),
                                  fig(name="DirectMap4k", value=8192)],
        cpu=[pb.NamedFigures(name="cpu", figures=[fig(name="user", value=250)]),
             pb.NamedFigures(name="cpu0", figures=[fig(name="user", value=250)])],
        stat=[fig(name="ctxt", value=9)], load=[fig(name="load1", value=1500)],
        tasks=[fig(name="cur", value=1), fig(name="max", value=40)],
        netdev=[pb.NamedFigures(name="eth0", figures=[fig(name="recv_bytes", value=10)])],
        agent=pb.ProcessFigures(stat=[fig(name="utime", value=30), fig(name="stime", value=20)],
                                status=[fig(name="VmRSS", value=30 << 20)], open_fds=12),
        containers=[pb.ContainerFigures(container_id="c1", cpu=[fig(name="usage_usec", value=2_500_000)],
                                        memory=[fig(name="current", value=1 << 20)])],
        scrapes=4)


def test_a_good_answer_becomes_kata_families() -> None:
    g = decode(wire.decode(good_metrics().SerializeToString()))
    text = families.render(families_host(), g)
    got = samples(text)
    assert got[("kata_guest_meminfo", (("item", "mem_total"),))] == 512 << 20
    assert got[("kata_guest_meminfo", (("item", "active_anon"),))] == 4096
    assert got[("kata_guest_meminfo", (("item", "direct_map_4k"),))] == 8192
    assert got[("kata_guest_cpu_time", (("cpu", "total"), ("item", "user")))] == 2.5
    assert got[("kata_guest_cpu_time", (("cpu", "0"), ("item", "user")))] == 2.5
    assert got[("kata_guest_load", (("item", "load1"),))] == 1.5
    assert got[("kata_guest_netdev_stat", (("interface", "eth0"), ("item", "recv_bytes")))] == 10
    assert got[("kata_agent_process_cpu_seconds_total", ())] == 0.5
    assert got[("kata_agent_process_resident_memory_bytes", ())] == 30 << 20
    assert got[("kata_agent_scrape_count_total", ())] == 4
    assert got[("kata_guest_container_cpu_seconds_total", (("container_id", "c1"), ("item", "usage")))] == 2.5
    assert got[("kata_guest_container_memory", (("container_id", "c1"), ("item", "current")))] == 1 << 20
    assert got[("kata_shim_threads", ())] >= 1
    assert got[("kata_shim_process_pss_bytes", ())] > 0


def families_host() -> families.HostFigures:
    from kata.metrics import host

    me = ProcessId.of(os.getpid())
    assert me is not None
    return host.gather({"shim": [me], "hypervisor": [ProcessId(me.pid, me.start_time + 1)]})


def test_a_process_whose_pid_was_reused_is_not_reported() -> None:
    h = families_host()
    assert set(h.processes) == {"shim"} and h.netdev == {}


def _bad(mutate: Callable[[pb.Metrics], None]) -> bytes:
    m = good_metrics()
    mutate(m)
    return m.SerializeToString()


HOSTILE: dict[str, bytes] = {
    "a newline in a name": _bad(lambda m: m.meminfo.add(name="Mem\nTotal", value=1)),
    "a label-breaking name": _bad(lambda m: m.meminfo.add(name='x"}', value=1)),
    "an empty name": _bad(lambda m: m.stat.add(name="", value=1)),
    "a long name": _bad(lambda m: m.meminfo.add(name="A" * 65, value=1)),
    "non-ASCII": _bad(lambda m: m.meminfo.add(name="Mémoire", value=1)),
    "a name twice": _bad(lambda m: m.meminfo.add(name="MemTotal", value=2)),
    "too many figures": _bad(lambda m: [m.meminfo.add(name=f"F{i}", value=i) for i in range(MAX_FIGURES)]),
    "too many CPUs": _bad(lambda m: [m.cpu.add(name=f"cpu{i}") for i in range(1, 1100)]),
    "a CPU that is none": _bad(lambda m: m.cpu.add(name="gpu0")),
    "an interface with a slash": _bad(lambda m: m.netdev.add(name="../eth0")),
    "a value past int64": _bad(lambda m: m.stat.add(name="procs", value=2**64 - 1)),
    "no clock": _bad(lambda m: m.ClearField("clock_ticks")),
    "an absurd clock": _bad(lambda m: setattr(m, "clock_ticks", 10**9)),
    "an absurd load": _bad(lambda m: m.load.add(name="load5", value=10**15)),
    "a container id with a slash": _bad(lambda m: m.containers.add(container_id="../../etc")),
    "a container twice": _bad(lambda m: m.containers.add(container_id="c1")),
    # Each list within its bound, 18,000 figures in all.
    "too many figures in all": _bad(lambda m: [
        m.containers.add(container_id=f"k{i}").cpu.extend(
            [pb.Figure(name=f"F{j}", value=j) for j in range(120)]) for i in range(150)]),
    "a text where a message goes": wire.encode(((1, 100), (2, "MemTotal"))) + b"\x12\x01\xff",
    "a number where a message goes": wire.encode(((1, 100), (2, 5))),
    "a number where a name goes": wire.encode(((1, 100), (2, wire.encode(((1, 7),))))),
    "a text where a number goes": wire.encode(((1, "100"),)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_answer_fails_in_one_line(case: str) -> None:
    with pytest.raises(GuestMetricsError) as exc:
        decode(wire.decode(HOSTILE[case]))
    assert "\n" not in str(exc.value) and str(exc.value).startswith("guest metrics: ")


def hostile_agent(answer: bytes | ttrpc.TTRPCError | None) -> tuple[LiteAgent, Callable[[], None]]:
    """A ttrpc server that answers every call with ``answer`` (None: never answers)."""
    server = ttrpc.Server()
    server.set_fallback(lambda ctx, payload, reply: reply(answer) if answer is not None else None)
    a, b = socket.socketpair()
    threading.Thread(target=server.serve, args=(ttrpc.socket_stream(a),), daemon=True).start()
    client = ttrpc.Client(ttrpc.socket_stream(b))

    def close() -> None:
        client.close()
        server.shutdown()
        a.close()

    return LiteAgent(client, timeout=5), close


@pytest.mark.parametrize("answer", [b"\xff\xff\xff", HOSTILE["a newline in a name"],
                                    ttrpc.TTRPCError(ttrpc.Code.INTERNAL, "boom\nforged log line"), None])
def test_a_hostile_agent_fails_the_fetch_cleanly(answer: bytes | ttrpc.TTRPCError | None) -> None:
    agent, close = hostile_agent(answer)
    try:
        start = time.monotonic()
        with pytest.raises(MetricsError) as exc:
            fetch_guest(agent, timeout=0.5)
        assert time.monotonic() - start < 3
        assert "\n" not in str(exc.value)
    finally:
        close()


# ---- the real agent service, end to end in-process -------------------------------------------------
@pytest.fixture
def real_agent(tmp_path: Path) -> Iterator[LiteAgent]:
    server, _ = agent_server(tmp_path, max_workers=4)
    host, guest = serve_on_socketpair(server)
    client = ttrpc.Client(host)
    try:
        yield LiteAgent(client, timeout=10)
    finally:
        client.close()
        server.shutdown()
        guest.close()


def test_the_agents_answer_becomes_a_sandboxs_text(real_agent: LiteAgent) -> None:
    me = ProcessId.of(os.getpid())
    assert me is not None
    text = SandboxMetrics({"hypervisor": [me]}, lambda: real_agent).render()
    got = samples(text)
    assert got[("kata_guest_meminfo", (("item", "mem_total"),))] == procfs.meminfo()["MemTotal"]
    assert got[("kata_hypervisor_process_cpu_seconds_total", ())] > 0
    assert got[("kata_agent_scrape_count_total", ())] == 1
    again = samples(SandboxMetrics({}, lambda: real_agent).render())
    assert again[("kata_agent_scrape_count_total", ())] == 2
    with pytest.raises(MetricsError, match="not connected"):
        SandboxMetrics({}, lambda: None).render()


# ---- the socket ----------------------------------------------------------------------------------
Serve = Callable[[str, Callable[[], bytes]], Endpoint]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    endpoints: list[Endpoint] = []

    def start(name: str, render: Callable[[], bytes]) -> Endpoint:
        path = tmp_path / name / "metrics.sock"
        path.parent.mkdir(parents=True, exist_ok=True)
        endpoint = Endpoint(path, render)
        endpoint.start()
        endpoints.append(endpoint)
        return endpoint

    yield start
    for e in endpoints:
        e.close()


def test_the_socket_serves_and_reports_failures(serve: Serve) -> None:
    def failing() -> bytes:
        raise RuntimeError("the agent said no\nforged")

    ok = serve("ok", lambda: b"up 1\n")
    bad = serve("bad", failing)
    assert stat.S_IMODE(ok.path.stat().st_mode) & 0o077 == 0  # root only
    assert fetch(ok.path, 2.0) == b"up 1\n"
    with pytest.raises(MetricsError, match=r"^the agent said no$"):
        fetch(bad.path, 2.0)
    # A client that connects and says nothing holds its slot, not the socket.
    idle = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    for s in idle:
        s.connect(str(ok.path))
    assert fetch(ok.path, 2.0) == b"up 1\n"
    for s in idle:
        s.close()
    ok.close()
    assert not ok.path.exists()
    with pytest.raises(MetricsError):
        fetch(ok.path, 1.0)


def test_kata_monitor_labels_each_sandbox_and_skips_a_slow_one(
        tmp_path: Path, serve: Serve) -> None:
    import json

    sbs = tmp_path / "sbs"
    serve("sbs/pod-a", lambda: b"# TYPE kata_guest_load gauge\nkata_guest_load{item=\"load1\"} 1.0\n")
    serve("sbs/ctr-b", lambda: b"# TYPE kata_guest_load gauge\nkata_guest_load{item=\"load1\"} 2.0\n")
    serve("sbs/slow", lambda: time.sleep(3) or b"")
    (sbs / "not an id!").mkdir()
    annotations = {"io.kubernetes.cri.sandbox-name": "web", "io.kubernetes.cri.sandbox-namespace": "default",
                   "io.kubernetes.cri.sandbox-uid": "u-1"}
    (sbs / "pod-a" / "pod.json").write_text(json.dumps({"config": "", "annotations": annotations}))
    found = running_sandboxes(tmp_path)
    assert [f.id for f in found] == ["ctr-b", "pod-a", "slow"]
    monitor = Monitor(scrape_timeout=0.5, root=tmp_path)
    start = time.monotonic()
    got = samples(monitor.metrics())
    assert time.monotonic() - start < 2.0
    assert got[("kata_guest_load", (("cri_name", "web"), ("cri_namespace", "default"), ("cri_uid", "u-1"),
                                    ("item", "load1"), ("sandbox_id", "pod-a")))] == 1.0
    assert got[("kata_guest_load", (("item", "load1"), ("sandbox_id", "ctr-b")))] == 2.0
    assert not any(dict(labels).get("sandbox_id") == "slow" for _, labels in got)
    assert got[("kata_monitor_running_shim_count", ())] == 3
    assert got[("kata_monitor_scrape_failed_count_total", ())] == 1


def test_kata_monitor_flags() -> None:
    assert parse_listen_address("127.0.0.1:8090") == ("127.0.0.1", 8090)
    for bad in ("8090", "host:", "h:99999", ":80"):
        with pytest.raises(UsageError):
            parse_listen_address(bad)


def test_the_typed_client_gets_the_agents_figures_as_sent(tmp_path: Path) -> None:
    from kata.agent_client.client import AgentClient

    server, _ = agent_server(tmp_path, max_workers=4)
    host, guest = serve_on_socketpair(server)
    try:
        with AgentClient(host, timeout=10.0) as client:
            answer = client.get_metrics()
        assert answer.clock_ticks == procfs.clock_ticks() and answer.scrapes == 1
        assert answer.agent.open_fds > 0 and not answer.containers
        assert {f.name for f in answer.meminfo} >= {"MemTotal", "MemAvailable"}
    finally:
        server.shutdown()
        guest.close()
