"""Shared fixtures: the installed runtime, guest assets, busybox bundles, and leak checks."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

ASSETS = Path("/usr/share/kata-containers")
KERNEL = ASSETS / "vmlinux.container"
IMAGE = ASSETS / "kata-containers.img"


def runtime_bin() -> str:
    return shutil.which("kata-runtime") or str(Path(sys.prefix) / "bin" / "kata-runtime")


def guest_assets_missing() -> str | None:
    for p in (KERNEL, IMAGE):
        if not p.exists():
            return f"guest asset {p} is missing: run `kata-osbuilder build`"
    return None


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    """The smallest config.json the loader accepts, with top-level keys replaced by ``overrides``."""
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/true"], "cwd": "/"},
        "root": {"path": "rootfs"},
    }
    spec.update(overrides)
    return spec


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it no longer runs)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it was reaped between open and read
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def pids_naming(*words: str) -> set[int]:
    """Pids whose command line contains every one of ``words``."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if all(w.encode() in cmd for w in words):
            found.add(int(pid))
    return found


def cgroup_of(pid: int, controller: str) -> str:
    """The cgroup v1 path of ``pid`` in ``controller``'s hierarchy (from /proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"{pid} has no {controller} cgroup")


def wait_for(predicate: Callable[[], T | None], timeout: float = 60.0, what: str = "") -> T:
    """Poll ``predicate`` until it is true, and return what it returned; a test failure after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.2)
    return result


def inspect(cli: Any, name: str) -> dict[str, Any]:
    """``docker inspect`` / ``podman inspect`` of one object (``cli``: a Dockerd or a Podman)."""
    proc = cli.run("inspect", name, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout)[0])


def leftovers(cid: str) -> list[str]:
    """Anything a sandbox called `cid` left on the host: processes, mounts, state directories."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cid in cmd and ("qemu" in cmd or "virtiofsd" in cmd or "kata.runc.monitor" in cmd):
            found.append(f"process {pid}: {cmd[:120]}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if cid in point:
            found.append(f"mount {point}")
    for d in (Path("/run/vc/sbs") / cid, Path("/run/vc/vm") / cid,
              Path("/run/kata-containers/shared/sandboxes") / cid):
        if d.exists():
            found.append(f"directory {d}")
    # the host cgroups named after it (the manager's cgroupsPath ends with the id; kata_overhead/<id>)
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob(f"*/**/{cid}")]
    return found


def config_with(tmp_path: Path, changes: dict[str, dict[str, Any]]) -> Path:
    """A configuration.toml: the one in effect, with some keys changed ({"hypervisor.qemu": {...}})."""
    from kata.config import dump_config, load_config
    from kata.config.toml_out import dumps

    data = dump_config(load_config())
    del data["meta"]
    for section, values in changes.items():
        table = data
        for part in section.split("."):
            table = table.setdefault(part, {})
        table.update(values)
    path = tmp_path / "configuration.toml"
    path.write_text(dumps(data))
    return path


def ci_prerequisites_missing() -> list[str]:
    """What scripts/install.sh and `kata-osbuilder build` should have provided, yet is absent.

    Tests skip when these are missing so that a developer can run a subset anywhere; in CI such a skip would
    hide an install bug behind a green run, so there the session refuses to start instead.
    """
    missing = [r for r in (guest_assets_missing(),) if r]
    if os.geteuid() != 0:
        missing.append("not running as root")
    for path in ("/usr/bin/qemu-system-x86_64", "/bin/busybox",
                 # the CNI plugins of the CRI pods' network (containernetworking-plugins)
                 "/usr/lib/cni/bridge", "/usr/lib/cni/host-local", "/usr/lib/cni/loopback"):
        if not Path(path).exists():
            missing.append(path)
    for tool in ("mkfs.erofs", "fsck.erofs", "cpio", "apt-get", "dpkg-deb", "containerd-shim-runc-v2",
                 # the real daemons and the busybox image of tests/integration/conftest.py
                 "containerd", "ctr", "runc", "dockerd", "docker", "skopeo", "umoci", "nsenter",
                 # the kata shim's port forwarder (tests/unit/test_portforward.py skips without it)
                 "nft"):
        if shutil.which(tool) is None:
            missing.append(tool)
    from kata.hypervisor.host import find_virtiofsd

    if find_virtiofsd() is None:
        missing.append("virtiofsd")
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("CI") and not os.environ.get("KATA_TESTS_ALLOW_MISSING"):
        missing = ci_prerequisites_missing()
        if missing:
            what = ", ".join(missing)
            raise pytest.UsageError(f"CI: test prerequisites missing (fix scripts/install.sh): {what}")
    _stop_shim_zygote()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _stop_shim_zygote()


def _stop_shim_zygote() -> None:
    """The pods' shims start a zygote (kata.shim.zygote) that outlives them by design: the session
    starts without one and leaves none behind."""
    from kata.shim import zygote

    zygote.stop()


def _hang_report_after(item: pytest.Item) -> float | None:
    """When a test's hang report is taken: a minute before pytest-timeout ends it (None: no report
    for tests with short timeouts, which hang in-process)."""
    marker = item.get_closest_marker("timeout")
    try:
        timeout = float(marker.args[0] if marker and marker.args else item.config.getini("timeout") or 0)
    except (TypeError, ValueError):
        return None
    return timeout - 60 if timeout >= 180 else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test that hangs until its timeout shows where every process of the stack waited (CI runs
    on machines we cannot look at)."""
    from tests.support.hang_report import HangWatch

    after = _hang_report_after(item)
    if after is None:
        yield
        return
    with HangWatch(after) as watch:
        yield
    if watch.report:
        item.add_report_section("call", "hang report", watch.report)


@pytest.fixture
def cid() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def needs_guest() -> None:
    reason = guest_assets_missing()
    if reason:
        pytest.skip(reason)
