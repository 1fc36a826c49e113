"""kata.oci.versions: the runtime-spec versions read, the one the guest's crun is told, and the
fields of newer specs the guest cannot honour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kata.oci import versions
from kata.oci.spec import Bundle, OCIError, validate_process, validate_spec
from tests.conftest import minimal_spec


@pytest.mark.parametrize("version", ["1.0.0", "1.0.2", "1.0.2-dev", "1.1.0", "1.1.0-rc.1", "1.1.0+dev",
                                     "1.2.0", "1.2.1", "1.2.1+dev", "1.2.7"])
def test_versions_read(version: str) -> None:
    assert versions.version_problem(version) is None


@pytest.mark.parametrize(("version", "message"), [
    (None, "ociVersion must be set"),
    ("", "ociVersion must be set"),
    (1.2, "ociVersion must be set"),
    ("1.3.0", "ociVersion 1.3.0 is not a version this runtime reads (1.0.x to 1.2.x)"),
    ("1.10.0", "ociVersion 1.10.0 is not a version this runtime reads (1.0.x to 1.2.x)"),
    ("2.0.0", "ociVersion 2.0.0 is not a version this runtime reads (1.0.x to 1.2.x)"),
    ("1.2", "ociVersion 1.2 is not a version this runtime reads"),
    ("1.02.0", "ociVersion 1.02.0 is not a version this runtime reads"),
    ("1.2.0\nx", "ociVersion 1.2.0\\x0ax is not a version this runtime reads"),
])
def test_versions_refused_in_one_line(version: Any, message: str) -> None:
    problem = versions.version_problem(version)
    assert problem is not None and problem.startswith(message) and "\n" not in problem


@pytest.mark.parametrize(("version", "told"), [
    # crun 1.8.1 takes "1.0*" and "1.1.0*" only (measured: "1.1.1" and "1.2.0" are "unknown version").
    ("1.0.0", "1.0.0"), ("1.0.2-dev", "1.0.2-dev"),
    ("1.1.0", "1.1.0"), ("1.1.0-rc.1", "1.1.0"),
    ("1.2.0", "1.1.0"), ("1.2.1", "1.1.0"), ("1.2.1+dev", "1.1.0"),
])
def test_the_guest_is_told_a_version_its_crun_takes(version: str, told: str) -> None:
    assert versions.guest_version(version) == told
    assert told.startswith("1.0") or told.startswith("1.1.0")


def test_relative_destinations_from_1_2_on() -> None:
    assert not versions.relative_destinations("1.0.2")
    assert not versions.relative_destinations("1.1.0")
    assert versions.relative_destinations("1.2.0")
    with pytest.raises(ValueError, match="not a runtime-spec version"):
        versions.minor("banana")


def _proc(**fields: Any) -> dict[str, Any]:
    return {"args": ["true"], "cwd": "/", **fields}


# What containerd 2.x / runc 1.2 write for each field (runtime-spec's config.md and config-linux.md).
UNHONOURED: list[tuple[dict[str, Any], str]] = [
    ({"process": _proc(scheduler={"policy": "SCHED_BATCH", "nice": 5})},
     "process.scheduler is not supported: the guest's crun (1.8.1) cannot apply it"),
    ({"process": _proc(ioPriority={"class": "IOPRIO_CLASS_IDLE", "priority": 4})},
     "process.ioPriority is not supported: the guest's crun (1.8.1) cannot apply it"),
    ({"process": _proc(execCPUAffinity={"initial": "0", "final": "0-1"})},
     "process.execCPUAffinity is not supported: host CPUs mean nothing in the VM"),
    ({"linux": {"intelRdt": {"closID": "guaranteed", "schemata": ["L3:0=7f"], "enableMonitoring": True}}},
     "linux.intelRdt is not supported: the VM has no Intel RDT (resctrl)"),
    ({"linux": {"memoryPolicy": {"mode": "MPOL_BIND", "nodes": "0"}}},
     "linux.memoryPolicy is not supported: the guest's crun (1.8.1) cannot apply it"),
    ({"linux": {"netDevices": {"eth1": {"name": "eth1"}}}},
     "linux.netDevices is not supported: a host network device cannot be moved into the VM"),
    ({"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                 {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "idmap"],
                  "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}]},
     "mounts[1]: option 'idmap' is not supported: the guest kernel cannot idmap its mounts"),
    ({"mounts": [{"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "ridmap"]}]},
     "mounts[0]: option 'ridmap' is not supported"),
]


@pytest.mark.parametrize(("change", "message"), UNHONOURED)
def test_a_field_the_guest_cannot_honour_is_refused_by_name(change: dict[str, Any], message: str) -> None:
    spec = minimal_spec(ociVersion="1.2.1", **change)
    with pytest.raises(OCIError) as e:
        validate_spec(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_same_fields_as_null_are_absent() -> None:
    spec = minimal_spec(ociVersion="1.2.0", process=_proc(scheduler=None, ioPriority=None),
                        linux={"intelRdt": None, "netDevices": None})
    validate_spec(spec)


@pytest.mark.parametrize("field", ["scheduler", "ioPriority", "execCPUAffinity"])
def test_an_exec_process_with_such_a_field_is_refused(field: str) -> None:
    """docker exec's --process file and the shim's Exec spec go through validate_process too."""
    with pytest.raises(OCIError, match=f"^exec process.{field} is not supported"):
        validate_process(_proc(**{field: {}}), "exec process")


def test_a_1_2_spec_with_a_relative_destination_is_read() -> None:
    spec = minimal_spec(ociVersion="1.2.1", mounts=[
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "run/x", "type": "tmpfs", "source": "tmpfs"},  # relative: allowed from 1.2 on
    ])
    validate_spec(spec)
    assert [m.destination for m in Bundle(Path("/b"), spec).mounts] == ["/proc", "run/x"]


def test_a_relative_destination_before_1_2_is_refused() -> None:
    spec = minimal_spec(ociVersion="1.1.0", mounts=[{"destination": "run/x", "type": "tmpfs"}])
    with pytest.raises(OCIError, match=r"^mounts\[0\]: destination must be an absolute path, got 'run/x'"):
        validate_spec(spec)
