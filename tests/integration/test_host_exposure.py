"""What a running sandbox exposes on the host to other local users, and how little power its helper
processes hold: every state file, socket and directory is root-only from birth, no host command line
carries the container's argv, the agent is reached through a root-only unix socket (no vsock port),
QEMU runs under its seccomp filter, and virtiofsd in namespaces of its own."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import leftovers, runtime_bin
from tests.support.bundles import make_busybox_bundle

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

SECRET = "hunter2-in-argv"


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def _pids_naming(*words: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if all(w in cmd for w in words):
                found.append(int(entry))
    return sorted(found)


@pytest.fixture
def running(tmp_path: Path, cid: str) -> Iterator[str]:
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", f"sleep 600 # {SECRET}"])
    cli = [runtime_bin(), "--root", str(tmp_path / "root")]
    with open(tmp_path / "out", "wb") as out:  # the monitor keeps these: no pipe to wait on
        subprocess.run([*cli, "create", "--bundle", str(bundle), cid], check=True, stdout=out, stderr=out,
                       stdin=subprocess.DEVNULL, timeout=120)
    try:
        subprocess.run([*cli, "start", cid], check=True, capture_output=True, timeout=60)
        yield cid
    finally:
        subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=60)
        assert leftovers(cid) == []


def test_state_is_root_only_and_argv_stays_private(running: str, tmp_path: Path) -> None:
    dirs = [Path("/run/vc/sbs") / running, Path("/run/vc/vm") / running, tmp_path / "root" / running]
    for top in dirs:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [".", *dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                if os.path.ismount(path):
                    continue  # a pinned network namespace shows nsfs's own mode, inside a 0700 directory
                st = os.lstat(path)
                assert st.st_uid == 0, path
                # Group and others get nothing: a file of any kind, a socket, a directory.
                assert stat.S_IMODE(st.st_mode) & 0o077 == 0 or stat.S_ISLNK(st.st_mode), \
                    f"{path} is {oct(stat.S_IMODE(st.st_mode))}"
    for pid in _pids_naming(running.encode()):
        assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), f"pid {pid} shows the argv"


def test_agent_channel_is_a_root_only_socket(running: str) -> None:
    (qemu,) = _pids_naming(b"qemu-system", f"kata-{running}".encode())
    cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes()
    assert b"vhost-vsock" not in cmdline  # no vsock port any local user could reach
    sock = Path("/run/vc/vm") / running / "agent.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0


def test_qemu_is_confined_by_seccomp_and_virtiofsd_by_namespaces(running: str) -> None:
    (qemu,) = _pids_naming(b"qemu-system", f"kata-{running}".encode())
    assert _status_field(qemu, "Seccomp") == "2"  # filter mode
    assert b"spawn=deny" in Path(f"/proc/{qemu}/cmdline").read_bytes()
    virtiofsd = _pids_naming(b"virtiofsd", f"/{running}/".encode())
    assert virtiofsd, "no virtiofsd for the sandbox"
    ours = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("mnt", "pid", "net")}
    # The namespace sandbox: the process serving the guest lives in mount, pid and network
    # namespaces of its own, where the host's other mounts and interfaces do not exist.
    served = [p for p in virtiofsd
              if all(os.readlink(f"/proc/{p}/ns/{ns}") != ours[ns] for ns in ("mnt", "net"))]
    assert served, "every virtiofsd process shares the host's namespaces"
