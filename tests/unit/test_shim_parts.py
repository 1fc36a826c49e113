"""The shim's pure parts: socket naming and pod grouping, runtime options, log URIs, the agent's
statistics in containerd's metrics type, and the ids every request carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any

from kata import ttrpc
from kata.errors import KataError
from kata.oci.cri_annotations import CONTAINER_TYPE, SANDBOX_ID
from kata.protocols import agent_pb2 as apb
from kata.protocols.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions
from kata.shim import address, events, metrics
from kata.shim.options import config_path_of_any
from kata.shim.service import TaskService, config_path_of
from kata.shim.stdio import binary_argv
from kata.shim.tasks import PodTasks
from kata.specconv import pod_role


def write_spec(bundle: Path, annotations: dict[str, str]) -> Path:
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    return bundle


def test_containers_of_a_pod_find_one_socket(tmp_path: Path) -> None:
    sandbox = write_spec(tmp_path / "p1", {"io.kubernetes.cri.container-type": "sandbox",
                                           "io.kubernetes.cri.sandbox-id": "p1"})
    member = write_spec(tmp_path / "c1", {"io.kubernetes.cri.container-type": "container",
                                          "io.kubernetes.cri.sandbox-id": "p1"})
    alone = write_spec(tmp_path / "x", {})
    assert address.group_of(sandbox, "p1") == address.group_of(member, "c1") == "p1"
    assert address.group_of(alone, "x") == "x"
    path = address.socket_path("/run/containerd/containerd.sock", "k8s.io", "p1")
    assert path.parent == address.SOCKET_DIR and len(path.name) == 64
    assert path == address.socket_path("/run/containerd/containerd.sock", "k8s.io", "p1")
    assert path != address.socket_path("/run/containerd/containerd.sock", "default", "p1")
    assert address.as_address(path) == f"unix://{path}"


def test_config_path_from_runtime_options() -> None:
    opts = runtimeoptions.Options(config_path="/etc/kata-containers/configuration.toml")
    packed = Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
    assert config_path_of(packed) == Path("/etc/kata-containers/configuration.toml")
    assert config_path_of(Any(type_url="containerd.runc.v1.Options")) is None
    assert config_path_of(None) is None
    # `start` reads the same Any, serialized, from its stdin.
    assert config_path_of_any(packed.SerializeToString()) == Path("/etc/kata-containers/configuration.toml")


def test_binary_log_uri_arguments() -> None:
    assert binary_argv("binary:///usr/bin/logger?-tag=web&flag") == ["/usr/bin/logger", "-tag", "web", "flag"]
    assert binary_argv("binary:///opt/my%20logger") == ["/opt/my logger"]


def test_events_are_packed_with_containerds_type_url() -> None:
    from kata.protocols.containerd.api.events import task_pb2

    packed = events.pack(task_pb2.TaskOOM(container_id="c1"))
    assert packed.type_url == "containerd.events.TaskOOM"
    assert task_pb2.TaskOOM.FromString(packed.value).container_id == "c1"


def test_agent_stats_become_cgroup_v1_metrics() -> None:
    stats = apb.StatsContainerResponse(
        cgroup_stats=apb.CgroupStats(
            cpu_stats=apb.CpuStats(cpu_usage=apb.CpuUsage(total_usage=5_000_000, usage_in_usermode=3_000_000,
                                                          usage_in_kernelmode=2_000_000),
                                   throttling_data=apb.ThrottlingData(periods=4, throttled_periods=1)),
            memory_stats=apb.MemoryStats(cache=4096, usage=apb.MemoryData(usage=1 << 20, limit=64 << 20,
                                                                           max_usage=2 << 20),
                                         stats={"anon": 8192, "pgfault": 17, "unknown_v2_key": 1}),
            pids_stats=apb.PidsStats(current=3, limit=100),
            blkio_stats=apb.BlkioStats(io_service_bytes_recursive=[
                apb.BlkioStatsEntry(major=254, minor=0, op="Read", value=512)])),
        network_stats=[apb.NetworkStats(name="eth0", rx_bytes=10, tx_bytes=20)])
    m = metrics.to_metrics(stats)
    assert (m.cpu.usage.total, m.cpu.usage.user, m.cpu.usage.kernel) == (5_000_000, 3_000_000, 2_000_000)
    assert (m.cpu.throttling.periods, m.cpu.throttling.throttled_periods) == (4, 1)
    assert (m.memory.usage.usage, m.memory.usage.limit, m.memory.usage.max) == (1 << 20, 64 << 20, 2 << 20)
    assert (m.memory.cache, m.memory.rss, m.memory.pg_fault) == (4096, 8192, 17)
    assert (m.pids.current, m.pids.limit) == (3, 100)
    assert [(e.major, e.op, e.value) for e in m.blkio.io_service_bytes_recursive] == [(254, "Read", 512)]
    assert [(n.name, n.rx_bytes, n.tx_bytes) for n in m.network] == [("eth0", 10, 20)]
    assert events.pack(m).type_url == "io.containerd.cgroups.v1.Metrics"


def test_delete_response_without_protobuf_matches_the_generated_class() -> None:
    from kata.protocols.containerd.runtime.v2.task import shim_pb2
    from kata.shim.cleanup import delete_response

    decoded = shim_pb2.DeleteResponse.FromString(delete_response(137, 1_700_000_000_123_456_789))
    assert (decoded.pid, decoded.exit_status) == (0, 137)
    assert (decoded.exited_at.seconds, decoded.exited_at.nanos) == (1_700_000_000, 123_456_789)


def test_every_request_with_a_bad_task_or_exec_id_is_an_invalid_argument() -> None:
    """Checked before the pod is asked: an empty pod would answer NotFound (or shut down)."""
    service = TaskService(PodTasks("default", None), on_shutdown=lambda: None, default_config=None)
    checked = 0
    for name, method in service.methods().items():
        fields = method.request_type.DESCRIPTOR.fields_by_name
        for field in ("id", "exec_id"):
            if field not in fields:
                continue
            req = method.request_type(**{"id": "c1", field: "../x"})
            with pytest.raises(ttrpc.TTRPCError) as exc:
                method.handler(None, req)  # type: ignore[arg-type]
            assert exc.value.code == ttrpc.Code.INVALID_ARGUMENT, name
            assert str(exc.value).endswith("invalid id format: ../x"), str(exc.value)
            checked += 1
    assert checked >= 17 + 8  # every request names its task; these also an exec


def test_a_cri_sandbox_id_annotation_is_an_id(tmp_path: Path) -> None:
    annotations = {CONTAINER_TYPE: "container", SANDBOX_ID: "../pod"}
    bundle = write_spec(tmp_path / "b", annotations)
    refused = r"annotation io.kubernetes.cri.sandbox-id: invalid id format: \.\./pod"
    with pytest.raises(KataError, match=refused):
        address.group_of(bundle, "c1")  # shim start
    with pytest.raises(KataError, match=refused):
        pod_role(annotations, "c1")  # Create
