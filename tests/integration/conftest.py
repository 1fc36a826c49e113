"""A real containerd and dockerd for the end-to-end tests, with the locally built busybox image.

    def test_something(docker):                  # module-scoped Dockerd
        proc = docker.run("run", "--rm", "--runtime", "kata", docker.image, "echo", "hi", timeout=120)
        assert proc.stdout == "hi\\n"

    def test_other(containerd):                  # module-scoped Containerd, image in namespace "default"
        proc = containerd.ctr("run", "--rm", containerd.image, "some-id", "echo", "hi")

`docker` has the runtime "kata" (kata-runtime, from PATH) beside runc in its daemon.json; a test module
sets extra arguments for it with a module-level ``KATA_RUNTIME_ARGS = ("--debug", ...)``. Teardown
removes every container, stops the daemons, and fails if a process, mount or directory of theirs is left.

`podman` is tests.support.podman's Podman: podman 4.3 with the runtime "kata", its own storage, configuration
and CNI network, in a network namespace of its own.

`cri_containerd` is a containerd with its CRI plugin, run in a network namespace of its own (the pods' CNI
bridge lives there), the busybox image in namespace "k8s.io", and the runtime handler "runc" plus a test
module's ``CRI_RUNTIMES = {"kata": cri_config.KATA}``; `cri` is a CriClient of it.

dockerd runs without networking (``--bridge=none``) and leaves the host's ip_forward alone, so a
``docker run`` without ``--network none`` gets a netns with only loopback and prints "WARNING: IPv4
forwarding is disabled. Networking will not work." on stderr: pass ``--network none`` to compare stderr.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.daemons import (
    Containerd,
    Dockerd,
    Runtime,
    containerd_daemon,
    cri_missing_tools,
    docker_daemons,
    kata_runtime_path,
    missing_tools,
)
from tests.support.netns import temporary_netns
from tests.support.podman import Podman, podman_missing_tools

if TYPE_CHECKING:
    from tests.support.cri import CriClient


def daemons_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "containerd and dockerd tests need root"
    missing = missing_tools()
    if missing:
        return f"containerd/dockerd tests need {', '.join(missing)} (scripts/install.sh installs them)"
    return None


def _kata_sandboxes() -> set[str]:
    """Sandboxes on the host now, the monitors that stand for containers, and the pods' shims."""
    base = Path("/run/vc/sbs")
    found = {f"sandbox {p.name}" for p in base.iterdir()} if base.is_dir() else set()
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"kata.runc.monitor" in cmd:
            found.add(f"monitor {pid}")
        elif b"containerd-shim-kata-v2" in cmd:
            found.add(f"shim {pid}")
    return found


def _fail_on_leftovers(*daemons: Containerd | Dockerd | Podman, kata_before: set[str] | None = None) -> None:
    left = [item for d in daemons for item in d.leftovers()]
    if kata_before is not None:
        left += sorted(_kata_sandboxes() - kata_before)
    if left:
        pytest.fail("daemon teardown left: " + "; ".join(left))


@pytest.fixture(scope="module")
def docker(request: pytest.FixtureRequest) -> Iterator[Dockerd]:
    reason = daemons_unavailable()
    if reason:
        pytest.skip(reason)
    args = tuple(getattr(request.module, "KATA_RUNTIME_ARGS", ()))
    before = _kata_sandboxes()
    with docker_daemons(runtimes={"kata": Runtime(kata_runtime_path(), args)}) as dockerd:
        yield dockerd
    _fail_on_leftovers(dockerd, dockerd.containerd, kata_before=before)


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    reason = daemons_unavailable()
    if reason:
        pytest.skip(reason)
    before = _kata_sandboxes()
    with containerd_daemon() as daemon:
        yield daemon
    _fail_on_leftovers(daemon, kata_before=before)


@pytest.fixture(scope="module")
def cri_containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    reason = daemons_unavailable()
    missing = cri_missing_tools()
    if reason or missing:
        pytest.skip(reason or f"CRI tests need {', '.join(missing)} (scripts/install.sh installs them)")
    runtimes = dict(getattr(request.module, "CRI_RUNTIMES", {}))
    # Kata's host-wide traces are checked only where a Kata handler runs: with runc alone they could only
    # be another process's.
    before = _kata_sandboxes() if runtimes else None
    # the daemon stops (removing its pods) before its namespace goes
    with temporary_netns("ktcri") as netns, \
            containerd_daemon(cri=True, netns=netns, runtimes=runtimes) as daemon:
        yield daemon
    _fail_on_leftovers(daemon, kata_before=before)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """podman with runtime "kata" (kata-runtime from PATH), its state private, run in a network
    namespace of its own (tests.support.podman)."""
    if os.geteuid() != 0:
        pytest.skip("podman tests need root")
    missing = podman_missing_tools() + [t for t in missing_tools() if t in ("skopeo", "umoci")]
    if missing:
        pytest.skip(f"podman tests need {', '.join(missing)} (scripts/install.sh installs them)")
    before = _kata_sandboxes()
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    with temporary_netns("ktpod") as netns, Podman(kata_runtime_path(), netns) as pm:
        yield pm
    _fail_on_leftovers(pm, kata_before=before)
    left = set(os.listdir("/run/netns")) - netns_before if os.path.isdir("/run/netns") else set()
    if left:
        pytest.fail(f"podman left network namespaces: {', '.join(sorted(left))}")


@pytest.fixture
def cri(cri_containerd: Containerd) -> Iterator[CriClient]:
    with cri_containerd.cri_client() as client:
        yield client
