"""A hostile guest, for real: a privileged container (root in the VM) mounts the sandbox's shared
filesystem itself and tries to plant symlinks, files and directories where the host mounts next, at
the top level and beside other containers' shares; then more containers join the pod with volumes.
No host path outside the sandbox's own directories may change, and nothing the guest made may
appear where the host mounts.

The pod is driven through the core (the sandbox service both front ends use), in this process.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.agent_client.client import AgentClient, StreamEOF
from kata.config import load_config
from kata.oci.spec import load_bundle
from kata.sandbox.container import Container
from kata.sandbox.sandbox import Sandbox
from kata.utils.mount import mount_points
from tests.conftest import config_with, leftovers
from tests.support.bundles import make_busybox_bundle

pytestmark = pytest.mark.vm

ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
]

# Every plant is one line: "<name> ok" when it worked, "<name> refused" when it did not. The guest's
# own rootfs is writable by design; everything else must be refused.
ATTACK = r"""
try() { name=$1; shift; if "$@" 2>/dev/null; then echo "$name ok"; else echo "$name refused"; fi; }
plant() {  # $1: a view of the share's top level, $2: a label
  m=$1
  mount -o remount,rw $m 2>/dev/null
  try $2-top-symlink ln -s DECOY $m/victim
  try $2-top-dir mkdir $m/victim2
  try $2-top-file touch $m/evil
  try $2-next-share-symlink ln -s DECOY $m/victim3
  try $2-beside-own-share ln -s DECOY $m/SELF/1-vol
  try $2-beside-own-file touch $m/SELF/planted
  try $2-rename-own-rootfs mv $m/SELF/rootfs $m/SELF/moved
}
# The agent's whole view of the share, through PID 1's root (the container shares the VM's pids).
agent=/proc/1/root/run/kata-containers/shared/containers
[ -d $agent/SELF/rootfs ] && echo "mounted ok"
plant $agent agent
# A mount of its own: 9p shows the whole tree; a virtio-fs mount may come up on a submount's
# superblock (its own rootfs), and is attacked only when it shows the top level.
mkdir -p /own
mount -t virtiofs kataShared /own 2>/dev/null || mount -t 9p -o trans=virtio,version=9p2000.L kataShared /own
[ -d /own/SELF/rootfs ] && plant /own own
try rootfs-symlink ln -s DECOY $agent/SELF/rootfs/escape
ls -la $agent > /dev/null
echo done
"""


def _privileged(spec: dict[str, object]) -> None:
    """All capabilities, nothing masked, and the VM's own pid namespace: root of the guest."""
    process = spec["process"]
    assert isinstance(process, dict)
    process["capabilities"] = {k: list(ALL_CAPS) for k in ("bounding", "effective", "permitted")}
    process["noNewPrivileges"] = False
    linux = spec["linux"]
    assert isinstance(linux, dict)
    linux["maskedPaths"] = []
    linux["readonlyPaths"] = []
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "pid"]  # type: ignore


def _output(agent: AgentClient, cid: str) -> str:
    out = b""
    while True:
        try:
            out += agent.read_stdout(container_id=cid).data
        except StreamEOF:
            return out.decode(errors="replace")


def _run(sandbox: Sandbox, cid: str, bundle: Path) -> tuple[int, str]:
    Container(sandbox, cid, load_bundle(bundle)).create()
    agent = sandbox.require_agent()
    agent.start_container(container_id=cid)
    out = _output(agent, cid)
    return agent.wait_process(container_id=cid).status, out


def _host_view(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every path below ``roots`` with its mode, size and (for a symlink) target: what must not change."""
    seen: dict[str, tuple[int, int, str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                seen[p] = (st.st_mode, st.st_size, os.readlink(p) if os.path.islink(p) else "")
    return seen


@pytest.fixture(params=["virtio-fs", "virtio-9p"])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path, needs_guest: None) -> Iterator[Sandbox]:
    cfg = load_config(config_with(tmp_path, {"hypervisor.qemu": {"shared_fs": request.param}}))
    sid = f"hg-{uuid.uuid4().hex[:8]}"
    sb = Sandbox.create(sid, cfg, {"hostname": "hostile"})
    try:
        yield sb
    finally:
        sb.destroy()
        assert leftovers(sid) == []


def test_guest_root_cannot_plant_where_the_host_mounts(sandbox: Sandbox, tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    (decoy / "dir").mkdir(parents=True)
    (decoy / "precious").write_text("host data")
    vol = tmp_path / "vol"
    vol.mkdir()
    ro_vol = tmp_path / "ro-vol"
    ro_vol.mkdir()
    (ro_vol / "keep").write_text("read-only data")
    watched = (decoy, Path("/etc/kata-containers") if Path("/etc/kata-containers").exists() else decoy)
    before = _host_view(*watched)
    mounts_before = set(mount_points())

    script = ATTACK.replace("DECOY", str(decoy)).replace("SELF", "c1")
    attacker = make_busybox_bundle(tmp_path / "b1", ["sh", "-c", script])
    spec = json.loads((attacker / "config.json").read_text())
    _privileged(spec)
    (attacker / "config.json").write_text(json.dumps(spec))
    status, out = _run(sandbox, "c1", attacker)
    results = dict(line.rsplit(" ", 1) for line in out.splitlines() if " " in line)
    assert results.get("mounted") == "ok", out
    assert results.pop("rootfs-symlink") == "ok", out  # its own rootfs is its to write
    refused = {name: r for name, r in results.items() if name != "mounted"}
    assert len(refused) >= 7 and set(refused.values()) == {"refused"}, out
    assert "done" in out and status == 0, out

    # Containers join the pod, under the very names the guest tried to take, with volumes.
    for cid, volume, options in (("victim", vol, ["rbind", "rw"]), ("victim3", ro_vol, ["rbind", "ro"])):
        bundle = make_busybox_bundle(
            tmp_path / f"b-{cid}", ["sh", "-c", "echo from-guest > /v/new 2>/dev/null; ls /v; echo end"])
        spec = json.loads((bundle / "config.json").read_text())
        spec["mounts"].append({"destination": "/v", "type": "bind", "source": str(volume),
                               "options": options})
        (bundle / "config.json").write_text(json.dumps(spec))
        status, out = _run(sandbox, cid, bundle)
        assert "end" in out, out
    assert (vol / "new").read_text() == "from-guest\n"  # the rw volume is the container's
    assert not (ro_vol / "new").exists() and (ro_vol / "keep").read_text() == "read-only data"

    # Nothing outside the sandbox's directories changed, and every new mount is the sandbox's own.
    assert _host_view(*watched) == before
    base = str(sandbox.paths.shared_base)
    new_mounts = set(mount_points()) - mounts_before
    assert new_mounts and all(p.startswith(base + "/") for p in new_mounts), new_mounts
    # What the host made is exactly what it shares: the guest's plants are nowhere in mounts/.
    made = sorted(p.name for p in sandbox.paths.mounts_dir.iterdir())
    assert made == ["c1", "victim", "victim3"], made
    assert sorted(p.name for p in (sandbox.paths.mounts_dir / "c1").iterdir()) == ["rootfs"]
    assert os.path.islink(tmp_path / "b1" / "rootfs" / "escape")  # its plant stayed in its rootfs
    sandbox.shared.remove("c1")  # removing it never follows the plant
    assert (decoy / "precious").read_text() == "host data"
